"""The metrics figures on the zoo, from one command (CPU is enough):

    python -m workbench.metrics.zoo_report --out metrics-report

writes results.json (every number below) and one HTML + JSON plotly figure per analysis:
rules (layer x sparsity per rule, relu-llama vs silu-llama), cett (CETT vs activation ratio),
ppl (the PPL-1% outer search), thresholds (activation ratio per layer, zero vs CETT), ppl_bar
(PPL-1% sparsity per model), cls (CLS_L curves, blockffn vs blockffn-null vs relu-llama
neurons) and predictor (recall vs predicted sparsity on held-out tokens). The acceptance tests
(tests/metrics/test_zoo_acceptance.py) use the same data and settings (`zoo_batches`, `SETTINGS`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from workbench.metrics._data import token_batches

#: Data and search settings shared by the report, the acceptance tests and notebook 02.
SETTINGS = {
    "eval_docs": 48,          # validation documents for perplexity and sparsity
    "max_length": 192,        # tokens per document (truncated)
    "calib_tokens": 4096,     # CETT calibration tokens (from the same documents)
    "n_candidates": 65536,    # inner-search candidates (Sparsing Law public code)
    "p": 1.0,                 # PPL-1%
    "lengths": (1, 2, 4, 8, 16, 32, 64),
    "predictor_train_docs": 240,   # train-split documents (evenly spaced) for predictor training
    "predictor_eval_docs": 60,     # validation documents: the held-out tokens
    # predictors: train_predictors' defaults (the ProSparse recipe: weighted BCE, no biases, the
    # residual stream entering the FFN block, width min(1024, d_model), threshold 0.5, the first
    # 8192 training tokens, 30 epochs)
}


def zoo_docs(n: int, offset: int = 0, split: str = "validation"):
    """`n` documents of the zoo corpus: validation ones in the committed order from `offset`;
    train ones evenly spaced over the split (so every domain is represented)."""
    from workbench.models.corpus import load_split

    docs = load_split(split)
    if split == "train":
        return docs[:: max(1, len(docs) // n)][:n]
    return docs[offset:offset + n]


def zoo_batches(model, n_docs: int | None = None, max_length: int | None = None, offset: int = 0,
                batch_size: int = 8, split: str = "validation"):
    """Token batches (ids, mask) of zoo corpus documents for `model`'s tokenizer."""
    n_docs = n_docs or SETTINGS["eval_docs"]
    max_length = max_length or SETTINGS["max_length"]
    return token_batches(zoo_docs(n_docs, offset, split), tokenizer=model.tokenizer, batch_size=batch_size,
                         max_length=max_length)


def load(name: str):
    import workbench as wb

    torch.manual_seed(0)
    return wb.load_model(f"zoo:{name}")


def ppl_result(name: str, **overrides):
    from workbench.metrics.sparsity import ppl_sparsity

    model = load(name)
    batches = zoo_batches(model)
    return ppl_sparsity(model, batches, p=overrides.get("p", SETTINGS["p"]),
                        max_calib_tokens=overrides.get("calib_tokens", SETTINGS["calib_tokens"]),
                        n_candidates=overrides.get("n_candidates", SETTINGS["n_candidates"]))


def cls_result(name: str, units: str = "auto") -> pd.DataFrame:
    from workbench.metrics.chunks import chunk_table

    model = load(name)
    return chunk_table(model, zoo_batches(model), units=units, lengths=SETTINGS["lengths"])


def predictor_result(name: str = "relu-llama", rule="zero", **kwargs):
    """Predictors trained at train_predictors' defaults on train-split tokens, evaluated on held-out
    validation documents (`kwargs` go to train_predictors, e.g. recipe="plain")."""
    from workbench.metrics.predictor import train_predictors

    model = load(name)
    train = zoo_batches(model, n_docs=SETTINGS["predictor_train_docs"], split="train")
    held_out = zoo_batches(model, n_docs=SETTINGS["predictor_eval_docs"])
    return train_predictors(model, train, eval_data=held_out, rule=rule, **kwargs)


def main(argv=None) -> dict:
    from workbench.metrics.cett import cett_curve
    from workbench.metrics.sparsity import sparsity_table
    from workbench.widgets import figures as F

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="metrics-report")
    ap.add_argument("--only", nargs="*", default=None, help="subset of: rules cett ppl cls predictor")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    want = set(args.only or ["rules", "cett", "ppl", "cls", "predictor"])
    res: dict = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()},
                 "machine": {"device": "cpu", "threads": torch.get_num_threads()}}
    figs = {}
    t0 = time.time()
    if "rules" in want or "cett" in want:
        frames, cett_frames = [], []
        for name in ("relu-llama", "silu-llama"):
            model = load(name)
            b = zoo_batches(model)
            if "rules" in want:
                df = sparsity_table(model, b, rules=["zero", "fat(0.01)", "topk(64)"])
                df.insert(0, "model", name)
                frames.append(df)
            if "cett" in want:
                df = cett_curve(model, b, max_tokens=SETTINGS["calib_tokens"], n_candidates=SETTINGS["n_candidates"])
                df.insert(0, "model", name)
                cett_frames.append(df)
        if frames:
            rules = pd.concat(frames, ignore_index=True)
            res["rules"] = rules.to_dict("records")
            figs["rules"] = F.rule_sparsity_figure(rules)
        if cett_frames:
            cett = pd.concat(cett_frames, ignore_index=True)
            res["cett"] = cett.to_dict("records")
            figs["cett"] = F.cett_curve_figure(cett)
    if "ppl" in want:
        curves, per_layer, bars = [], [], []
        for name in ("relu-llama", "silu-llama"):
            r = ppl_result(name)
            res.setdefault("ppl", {})[name] = {**r.summary(), "thresholds": r.thresholds,
                                               "per_layer": r.per_layer.to_dict("records"),
                                               "curve": r.curve.to_dict("records")}
            c = r.curve.copy()
            c.insert(0, "model", name)
            curves.append(c)
            pl = r.per_layer.copy()
            pl.insert(0, "model", name)
            per_layer.append(pl)
            bars.append({"model": name, "sparsity": r.sparsity, "activation_ratio": r.activation_ratio,
                         "zero_activation_ratio": r.zero_activation_ratio})
            figs[f"thresholds_{name}"] = F.threshold_figure(r.per_layer, title=f"{name}: activation ratio per layer")
        figs["ppl"] = F.ppl_curve_figure(pd.concat(curves, ignore_index=True), goal=1 + SETTINGS["p"] / 100,
                                         tolerance=0.1 * SETTINGS["p"] / 100)
        figs["ppl_bar"] = F.model_bar_figure(pd.DataFrame(bars), y="sparsity", title="PPL-1% sparsity")
    if "cls" in want:
        frames = []
        for name, units in (("blockffn", "experts"), ("blockffn-null", "experts"), ("relu-llama", "neurons")):
            df = cls_result(name, units)
            df.insert(0, "model", f"{name} ({units})")
            frames.append(df)
        cls = pd.concat(frames, ignore_index=True)
        res["cls"] = cls.to_dict("records")
        figs["cls"] = F.cls_curve_figure(cls[cls.layer == -1])
    if "predictor" in want:
        pred = predictor_result("relu-llama")
        res["predictor"] = pred.metrics.to_dict("records")
        pred.save(out / "predictor-relu-llama")
        figs["predictor"] = F.predictor_figure(pred.metrics)
    res["seconds"] = round(time.time() - t0, 1)
    for k, fig in figs.items():
        fig.write_html(out / f"{k}.html", include_plotlyjs="cdn")
        (out / f"{k}.json").write_text(fig.to_json())
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    return res


if __name__ == "__main__":
    main()
