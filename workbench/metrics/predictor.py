"""Activation predictors (Deja Vu arXiv 2310.17157 / ProSparse arXiv 2402.13516 style).

Per FFN layer, a small MLP maps the FFN input hidden state x [tokens, d_model] to logits
[tokens, d_ff]: ``logits = W2 relu(W1 x + b1) + b2`` with W1 [width, d_model], W2 [d_ff, width].
Trained with BCE on labels ``Rule.active(a, ...)`` (default rule `zero`: 1[a_i != 0]) captured
from the model on valid (non-padding) tokens; evaluated on held-out sequences: recall (true
actives predicted active), precision, predicted sparsity and true sparsity per layer.
Default width: min(1024, d_model // 4) (at least 1).

A neuron is predicted active when sigmoid(logit) >= threshold (ProSparse: 0.5). With
`target_recall` set, each layer's threshold is instead the largest one whose recall on that
layer's training tokens is >= target_recall (calibration; no held-out token is used).

File format (what `workbench.kernels` predictor mode loads) -- a directory with two files:

``predictor.safetensors``
    per layer, with ``<name>`` the FFN's module path (e.g. ``model.layers.3.mlp``):
    ``<name>.w1`` [width, d_model], ``<name>.b1`` [width], ``<name>.w2`` [d_ff, width],
    ``<name>.b2`` [d_ff], float32. The decision threshold is FOLDED into b2
    (b2 = b2_trained - logit(threshold)), so a neuron is predicted active iff ``logits > 0``,
    exactly `kernels/predictor/reference.predictor_logits(x, w1, w2, b1, b2) > 0`.
``predictor.json``
    ``{"format": "workbench-predictor", "version": 1, "width": int (default width used),
    "threshold": float (the requested sigmoid threshold), "decision": "logits > 0",
    "threshold_folded": true, "rule": Rule.to_json() of the labels, "model": {...provenance},
    "layers": [{"layer": int, "name": str, "d_model": int, "d_ff": int, "width": int,
    "threshold": float (this layer's sigmoid threshold, folded into b2), "recall": float,
    "precision": float, "predicted_sparsity": float, "true_sparsity": float,
    "keys": {"w1": "<name>.w1", "b1": ..., "w2": ..., "b2": ...}}]}``

`save_predictors(pred, path)` writes it, `load_predictors(path)` reads it back (also from a Run
directory where `Predictors.store(run)` put the same tensors under
``metrics/predictor/<name>.w1`` and the JSON under ``run.meta["metrics"]["predictor"]["info"]``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.adapters import GATED
from workbench.capture.rules import Rule
from workbench.capture.run import Run
from workbench.errors import CaptureError, RunError, WorkbenchError
from workbench.metrics._data import collect, ffn_sites, model_device, split_batches, token_batches
from workbench.metrics.store import store

FORMAT = "workbench-predictor"
VERSION = 1
WEIGHTS = "predictor.safetensors"
CONFIG = "predictor.json"


def default_width(d_model: int) -> int:
    """min(1024, d_model // 4), at least 1."""
    return max(1, min(1024, d_model // 4))


class LayerPredictor(nn.Module):
    """Linear(d_model, width) - ReLU - Linear(width, d_ff); `threshold` is the sigmoid cut."""

    def __init__(self, d_model: int, d_ff: int, width: int, threshold: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(d_model, width)
        self.fc2 = nn.Linear(width, d_ff)
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """logits [..., d_ff] (before the threshold)."""
        return self.fc2(F.relu(self.fc1(x)))

    @property
    def logit_threshold(self) -> float:
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return math.log(t / (1 - t))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask [..., d_ff] of neurons predicted active."""
        return self(x) >= self.logit_threshold


def prediction_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """recall, precision, predicted_sparsity, true_sparsity of boolean masks [tokens, d_ff]."""
    tp = int((pred & true).sum())
    n_true, n_pred, n = int(true.sum()), int(pred.sum()), true.numel()
    return {"recall": tp / n_true if n_true else float("nan"),
            "precision": tp / n_pred if n_pred else float("nan"),
            "predicted_sparsity": 1 - n_pred / n if n else float("nan"),
            "true_sparsity": 1 - n_true / n if n else float("nan")}


@dataclass
class Predictors:
    """Trained predictors of one model: `layers[name]`, their layer indices and the eval table."""

    layers: dict[str, LayerPredictor]
    layer_index: dict[str, int]
    rule: Rule = field(default_factory=Rule)
    width: int | None = None
    threshold: float = 0.5
    metrics: pd.DataFrame | None = None
    model_info: dict = field(default_factory=dict)

    def predict(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.layers[name].predict(x)

    # -- format ----------------------------------------------------------------------------
    def _tensors_and_config(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, layers = {}, []
        by_name = {}
        if self.metrics is not None:
            by_name = {r["name"]: r for r in self.metrics.to_dict("records")}
        for name, p in self.layers.items():
            keys = {k: f"{name}.{k}" for k in ("w1", "b1", "w2", "b2")}
            tensors[keys["w1"]] = p.fc1.weight.detach().float().cpu().contiguous()
            tensors[keys["b1"]] = p.fc1.bias.detach().float().cpu().contiguous()
            tensors[keys["w2"]] = p.fc2.weight.detach().float().cpu().contiguous()
            tensors[keys["b2"]] = (p.fc2.bias.detach().double() - p.logit_threshold).float().cpu().contiguous()
            m = by_name.get(name, {})
            layers.append({"layer": self.layer_index[name], "name": name, "d_model": p.fc1.in_features,
                           "d_ff": p.fc2.out_features, "width": p.fc1.out_features, "threshold": p.threshold,
                           **{k: _f(m.get(k)) for k in ("recall", "precision", "predicted_sparsity", "true_sparsity")},
                           "keys": keys})
        cfg = {"format": FORMAT, "version": VERSION, "width": self.width, "threshold": self.threshold,
               "decision": "logits > 0", "threshold_folded": True, "rule": self.rule.to_json(),
               "model": self.model_info, "layers": layers}
        return tensors, cfg

    def save(self, path: str | os.PathLike) -> Path:
        return save_predictors(self, path)

    def store(self, run: Run, name: str = "predictor") -> None:
        """Put the predictor (tensors + config) and its evaluation table into `run`."""
        tensors, cfg = self._tensors_and_config()
        df = self.metrics if self.metrics is not None else pd.DataFrame()
        store(run, name, df, tensors=tensors, info={"config": cfg})


def _f(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def save_predictors(pred: Predictors, path: str | os.PathLike) -> Path:
    """Write `pred` to directory `path` (predictor.safetensors + predictor.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, cfg = pred._tensors_and_config()
    save_file(tensors, str(path / WEIGHTS), metadata={"format": FORMAT})
    (path / CONFIG).write_text(json.dumps(cfg, indent=2))
    return path


def _from(tensors: dict[str, torch.Tensor], cfg: dict, where: str) -> Predictors:
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("version"), int) or cfg["version"] > VERSION:
        raise RunError(f"{where}: not a {FORMAT} v<={VERSION} config (format {cfg.get('format')!r}, "
                       f"version {cfg.get('version')!r})")
    layers, index, rows = {}, {}, []
    for L in cfg["layers"]:
        k = L["keys"]
        missing = [v for v in k.values() if v not in tensors]
        if missing:
            raise RunError(f"{where}: layer {L['layer']} ({L['name']}) lacks tensors {missing}; the file is damaged")
        p = LayerPredictor(L["d_model"], L["d_ff"], L["width"], threshold=0.5)
        with torch.no_grad():
            p.fc1.weight.copy_(tensors[k["w1"]])
            p.fc1.bias.copy_(tensors[k["b1"]])
            p.fc2.weight.copy_(tensors[k["w2"]])
            p.fc2.bias.copy_(tensors[k["b2"]])  # threshold folded: predict() at 0.5 == logits >= 0
        layers[L["name"]] = p
        index[L["name"]] = int(L["layer"])
        rows.append({kk: L.get(kk) for kk in ("layer", "name", "width", "threshold", "recall", "precision",
                                               "predicted_sparsity", "true_sparsity")})
    return Predictors(layers, index, rule=Rule.from_json(cfg["rule"]), width=cfg.get("width"),
                      threshold=float(cfg.get("threshold", 0.5)), metrics=pd.DataFrame(rows),
                      model_info=cfg.get("model", {}))


def load_predictors(path: str | os.PathLike) -> Predictors:
    """Read a predictor directory (or a saved Run that stored one) written by this module."""
    path = Path(path)
    if (path / CONFIG).is_file():
        try:
            cfg = json.loads((path / CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{path / CONFIG} is not valid JSON ({exc})") from exc
        if not (path / WEIGHTS).is_file():
            raise RunError(f"{path / WEIGHTS} is missing; re-save the predictor")
        return _from(load_file(str(path / WEIGHTS)), cfg, str(path))
    if (path / "run.json").is_file():
        run = Run.load(path)
        entry = run.meta.get("metrics", {}).get("predictor")
        if entry is None:
            raise RunError(f"run {path} holds no predictor; train one and call .store(run) before saving")
        prefix = "metrics/predictor/"
        tensors = {k[len(prefix):]: v for k, v in run.tensors.items() if k.startswith(prefix)}
        return _from(tensors, entry["info"]["config"], str(path))
    raise RunError(f"{path} holds neither {CONFIG} nor a run.json; save predictors with save_predictors")


def train_predictors(model: nn.Module, data, *, eval_data=None, rule="zero", width: int | None = None,
                     threshold: float = 0.5, target_recall: float | None = None, holdout: float = 0.25,
                     max_tokens: int | None = 8192, epochs: int = 30, lr: float = 3e-3,
                     batch_tokens: int = 512, weight_decay: float = 0.0, seed: int = 0,
                     tokenizer=None, batch_size: int = 8, max_length: int | None = 256,
                     layers: list[int] | None = None, device=None) -> Predictors:
    """Train one predictor per FFN layer on captured activations and evaluate it on held-out tokens.

    data: training texts/Documents/ids (+ `eval_data` for the held-out set; if None the last
    `holdout` fraction of the sequences of `data` is held out). rule: what "active" means for the
    labels (any pinned rule, e.g. the CETT `Rule.magnitude(thresholds)` for SiLU models).
    Returns Predictors with `.metrics`: layer, name, width, threshold, recall, precision,
    predicted_sparsity, true_sparsity, train_tokens, eval_tokens.
    """
    rule = Rule.parse(rule)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    sites = ffn_sites(model)
    if layers is not None:
        sites = [s for s in sites if s.layer in set(layers)]
    batches = token_batches(data, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    if eval_data is None:
        train_b, eval_b = split_batches(batches, holdout)
    else:
        train_b = batches
        eval_b = token_batches(eval_data, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    dev = torch.device(device) if device is not None else model_device(model)
    want_g = any(rule.needs_gate_act(s.kind == GATED) for s in sites)
    tr = collect(model, train_b, sites=sites, want_x=True, want_g=want_g, max_tokens=max_tokens, store_device=dev)
    ev = collect(model, eval_b, sites=sites, want_x=True, want_g=want_g, max_tokens=max_tokens, store_device=dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    preds, index, rows = {}, {}, []
    for s in sites:
        w = width or default_width(s.d_model)
        norms = s.down_column_norms().to(dev) if rule.needs_down_norms() else None

        def labels(d, s=s, norms=norms):
            return rule.active(d["a"], d.get("g"), layer=s.layer, gated=s.kind == GATED, down_norms=norms)

        y_tr, y_ev = labels(tr[s.name]), labels(ev[s.name])
        x_tr, x_ev = tr[s.name]["x"].float(), ev[s.name]["x"].float()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        p = LayerPredictor(s.d_model, s.d_ff, w, threshold).to(dev)
        _fit(p, x_tr, y_tr.float(), epochs=epochs, lr=lr, batch_tokens=batch_tokens,
             weight_decay=weight_decay, gen=gen, where=f"layer {s.layer} ({s.name})")
        if target_recall is not None:
            p.threshold = _threshold_for_recall(p, x_tr, y_tr, target_recall)
        with torch.no_grad():
            m = prediction_metrics(p.predict(x_ev), y_ev)
        preds[s.name], index[s.name] = p.cpu().eval(), s.layer
        rows.append({"layer": s.layer, "name": s.name, "width": w, "threshold": p.threshold, **m,
                     "train_tokens": int(x_tr.shape[0]), "eval_tokens": int(x_ev.shape[0])})
    info = {"source": getattr(model, "wb_source", None), "class": type(model).__name__,
            "model_type": getattr(getattr(model, "config", None), "model_type", None)}
    return Predictors(preds, index, rule=rule, width=width, threshold=threshold,
                      metrics=pd.DataFrame(rows), model_info=info)


def _fit(p: LayerPredictor, x: torch.Tensor, y: torch.Tensor, *, epochs, lr, batch_tokens, weight_decay, gen, where):
    if x.shape[0] == 0:
        raise CaptureError(f"{where}: no training tokens for the predictor (empty dataset?)")
    opt = torch.optim.AdamW(p.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    steps = epochs * max(1, math.ceil(n / batch_tokens))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    p.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for i in range(0, n, batch_tokens):
            idx = perm[i:i + batch_tokens]
            loss = F.binary_cross_entropy_with_logits(p(x[idx]), y[idx])
            if not torch.isfinite(loss):
                raise WorkbenchError(f"{where}: predictor loss became NaN/Inf; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    p.eval()


def _threshold_for_recall(p: LayerPredictor, x: torch.Tensor, y: torch.Tensor, target: float) -> float:
    """Largest sigmoid threshold with training recall >= target."""
    with torch.no_grad():
        prob = torch.sigmoid(p(x).double())[y]
    if prob.numel() == 0:
        return p.threshold
    # recall(th) = mean(prob >= th); the (1 - target) quantile of the positives' probabilities
    n = prob.numel()
    k = min(n, max(1, int(math.floor((1 - target) * n)) + 1))
    return float(prob.reshape(-1).kthvalue(k).values)
