"""`workbench zoo list` and `workbench zoo train NAME`.

``add_zoo_parser(subparsers)`` adds the ``zoo`` command to an argparse subparsers object (the
workbench CLI wires it in); ``python -m workbench.models.zoo_cli list|train NAME`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: the files `zoo train` writes into its output directory (any of them there: a model to keep)
MODEL_FILES = ("config.json", "model.safetensors", "metrics.json", "README.md", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json")
#: recipe keys the trainer reads when present, though no shipped recipe sets them
OPTIONAL_KEYS = {"activation_threshold": 0.0}


def _list(args) -> int:
    from workbench.models import zoo

    have = set(zoo.available())
    for name, s in zoo.SPECS.items():
        line = f"{name:15s} {s.family:9s} "
        if name in have:
            try:
                m = zoo.card_metrics(name)
                v = m["validation"]
                line += f"params {m['params']:>9,}  val ppl {v['ppl']:7.3f}  unigram {v['unigram_ppl']:7.1f}"
                sp = v.get("sparsity")
                if sp:
                    line += f"  TLS {100 * sp['tls']:5.1f}%  CLS_8 {100 * sp['cls_8']:5.1f}%"
            except Exception as e:  # a damaged model still gets listed, with the reason
                line += f"DAMAGED: {e}"
        else:
            line += f"not built (run: workbench zoo train {name})"
        print(line)
    return 0


def _overrides(name: str, text: str | None) -> dict:
    """`--set k=v,...` checked against the model's recipe: known keys, values of the key's type."""
    from workbench.cli import fail
    from workbench.models import zoo

    recipe = {**OPTIONAL_KEYS, **zoo.spec(name).recipe}
    settable = sorted(k for k, v in recipe.items() if type(v) in (int, float))
    out = {}
    for kv in (text or "").split(","):
        if not kv.strip():
            continue
        key, eq, raw = (part.strip() for part in kv.partition("="))
        if not eq or not key or not raw:
            fail(f"--set {kv!r} is not KEY=VALUE; e.g. --set lr=0.002,steps=500")
        if key not in recipe:
            fail(f"--set {key}: {name}'s recipe has no key {key!r}; settable keys: {', '.join(settable)}")
        want = type(recipe[key])
        if want not in (int, float):
            fail(f"--set {key}: a {want.__name__} cannot be set on the command line; settable keys: "
                 f"{', '.join(settable)}")
        try:
            out[key] = int(raw) if want is int else float(raw)
        except ValueError:
            fail(f"--set {key}={raw}: {key} takes {'an integer' if want is int else 'a number'} "
                 f"(the recipe has {recipe[key]!r})")
    return out


def _check_train_out(name: str, out: str | None, overwrite: bool) -> None:
    """Refuse to write over a model (the shipped one by default) without --overwrite."""
    from workbench.cli import fail
    from workbench.models import zoo

    target = Path(out) if out is not None else zoo.ZOO_DIR / name
    where = f"--out {out}" if out is not None else f"{target} (the default output)"
    if target.exists() and not target.is_dir():
        fail(f"--out {out} is a file; choose a directory for the model")
    have = [f for f in MODEL_FILES if (target / f).exists()]
    if out is not None and not have and target.is_dir() and any(target.iterdir()):
        fail(f"--out {out} holds files that are not a model; refusing to write into it: choose another --out")
    if have and not overwrite:
        what = f"the zoo model {name!r}" if out is None else "a model"
        fail(f"{where} already holds {what} ({', '.join(have)}); pass --overwrite to replace it, "
             "or --out DIR to train into another directory")


def _train(args) -> int:
    from workbench.cli import check_device, fail, positive_int
    from workbench.models import zoo

    zoo.spec(args.name)  # an unknown name: a ModelLoadError listing the zoo
    check_device(args.device)
    positive_int(args.steps, "--steps")
    if args.time_budget is not None and not args.time_budget > 0:
        fail(f"--time-budget must be > 0 seconds (got {args.time_budget})")
    overrides = _overrides(args.name, args.set)
    if overrides.get("steps", 1) < 1:
        fail(f"--set steps must be >= 1 (got {overrides['steps']})")
    _check_train_out(args.name, args.out, args.overwrite)
    from workbench.models.train import train

    m = train(
        args.name,
        device=args.device,
        seed=args.seed,
        out=args.out,
        steps=args.steps,
        overrides=overrides,
        time_budget=args.time_budget,
        log=lambda s: print(s, flush=True),
    )
    v = m["validation"]
    print(json.dumps({"name": m["name"], "val_ppl": v["ppl"], "unigram_ppl": v["unigram_ppl"]}))
    return 0


def add_zoo_parser(subparsers) -> argparse.ArgumentParser:
    """Add `zoo list` and `zoo train NAME [--device] [--seed] [--out] [--overwrite]` to `subparsers`."""
    zp = subparsers.add_parser("zoo", help="the offline model zoo: list, train")
    zsub = zp.add_subparsers(dest="zoo_cmd", required=True)
    lp = zsub.add_parser("list", help="zoo models, whether built, and their card figures")
    lp.set_defaults(func=_list)
    tp = zsub.add_parser("train", help="(re)build a zoo model from its recipe (seeded)")
    tp.add_argument("name")
    tp.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--out", default=None, help="output directory (default: data/zoo/NAME)")
    tp.add_argument("--overwrite", action="store_true",
                    help="replace the model already there (by default the shipped data/zoo/NAME)")
    tp.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    tp.add_argument("--set", default=None, help="recipe overrides, e.g. l1=0.5,lr=0.002 (numeric recipe keys)")
    tp.add_argument("--time-budget", type=float, default=None, help="cap steps to fit N seconds")
    tp.set_defaults(func=_train)
    return zp


def main(argv: list[str] | None = None) -> int:
    """`python -m workbench.models.zoo_cli ARGS` = `workbench zoo ARGS` (same errors, same exit codes)."""
    from workbench.cli import main as cli_main

    return cli_main(["zoo", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
