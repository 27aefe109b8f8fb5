"""`workbench zoo list` and `workbench zoo train NAME`.

``add_zoo_parser(subparsers)`` adds the ``zoo`` command to an argparse subparsers object (the
workbench CLI wires it in); ``python -m workbench.models.zoo_cli list|train NAME`` runs it alone.
"""

from __future__ import annotations

import argparse
import json


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


def _train(args) -> int:
    from workbench.models.train import _parse_set, train

    m = train(
        args.name,
        device=args.device,
        seed=args.seed,
        out=args.out,
        steps=args.steps,
        overrides=_parse_set(args.set),
        time_budget=args.time_budget,
        log=lambda s: print(s, flush=True),
    )
    v = m["validation"]
    print(json.dumps({"name": m["name"], "val_ppl": v["ppl"], "unigram_ppl": v["unigram_ppl"]}))
    return 0


def add_zoo_parser(subparsers) -> argparse.ArgumentParser:
    """Add `zoo list` and `zoo train NAME [--device] [--seed] [--out]` to `subparsers`."""
    zp = subparsers.add_parser("zoo", help="the offline model zoo: list, train")
    zsub = zp.add_subparsers(dest="zoo_cmd", required=True)
    lp = zsub.add_parser("list", help="zoo models, whether built, and their card figures")
    lp.set_defaults(func=_list)
    tp = zsub.add_parser("train", help="(re)build a zoo model from its recipe (seeded)")
    tp.add_argument("name")
    tp.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--out", default=None, help="output directory (default: data/zoo/NAME)")
    tp.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    tp.add_argument("--set", default=None, help="recipe overrides, e.g. l1=0.5,lr=0.002")
    tp.add_argument("--time-budget", type=float, default=None, help="cap steps to fit N seconds")
    tp.set_defaults(func=_train)
    return zp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.models.zoo_cli")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_zoo_parser(sub)
    args = p.parse_args(["zoo", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
