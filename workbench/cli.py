"""`workbench` command line: profile (and zoo, from the zoo module; serve and report from widgets/)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_TOKENS = 4096


def default_source() -> str:
    """zoo:relu-llama when the zoo is on disk, else the seeded builtin stand-in."""
    from workbench.models import zoo

    try:
        zoo.resolve(zoo.DEFAULT_MODEL)
        return f"zoo:{zoo.DEFAULT_MODEL}"
    except Exception:
        return "builtin:tiny-relu-llama"


def _fresh_dir(base: Path, stem: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stem}-{stamp}"
    i = 1
    while path.exists():
        path = base / f"{stem}-{stamp}-{i}"
        i += 1
    return path


def cmd_profile(args) -> int:
    import pandas as pd
    import torch

    import workbench as wb
    from workbench.data import validation_tokens

    source = args.source or default_source()
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    model = wb.load_model(source, device=args.device, dtype=args.dtype)
    torch.manual_seed(0)
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
        texts = [p.strip() for p in text.split("\n\n") if p.strip()]
        data, mask, info = texts, None, {"text_file": str(Path(args.text).resolve())}
    else:
        data, mask, desc = validation_tokens(model, args.tokens, args.seq_len)
        info = {"tokens_requested": args.tokens, "text": desc}
    run = wb.profile(model, data, attention_mask=mask, batch_size=args.batch_size, max_length=args.seq_len,
                     rule=args.rule, probes=["neuron_stats", "abs_sketch"], progress=not args.quiet,
                     data_info=info)
    out = Path(args.out) if args.out else _fresh_dir(Path("runs"), "profile-" + source.replace(":", "-").replace("/", "-"))
    run.save(out, overwrite=args.overwrite)
    summary = run.summary()
    summary.to_csv(out / "summary.csv", index=False)
    cols = ["layer", "name", "d_ff", "tokens", "token_sparsity", "dead_neurons", "mean_abs", "abs_p50", "abs_p99"]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"model {source} ({run.meta['model']['class']}, {run.meta['model']['n_params']:,} params), "
              f"rule {run.rule}, {run.meta['data']['n_tokens']} tokens")
        print(summary[[c for c in cols if c in summary]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        print(f"mean token sparsity {summary['token_sparsity'].mean():.4f}")
    print(f"run saved to {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="LLM activation-sparsity workbench")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("profile", help="capture FFN activation statistics and print a per-layer summary")
    pr.add_argument("source", nargs="?", help="zoo:NAME, a local model directory or a hub id "
                    "(default: zoo:relu-llama, or builtin:tiny-relu-llama before the zoo exists)")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file; paragraphs (blank-line separated) are the sequences")
    src.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                     help=f"profile the first N tokens of the bundled validation text (default {DEFAULT_TOKENS})")
    pr.add_argument("--out", help="run directory to write (default: a fresh runs/profile-MODEL-TIME)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    pr.add_argument("--rule", default="zero", help="zero | fat(T) | topk(k) | magnitude(t) (default zero)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (and text truncation)")
    pr.add_argument("--device", default=None)
    pr.add_argument("--dtype", default=None, help="e.g. float32, bfloat16")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_profile)
    try:
        from workbench.models.zoo_cli import add_zoo_parser
    except ImportError:
        add_zoo_parser = None
    if add_zoo_parser is not None:
        add_zoo_parser(sub)
    from workbench.widgets.cli import add_parsers as add_widget_parsers

    add_widget_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from workbench.errors import WorkbenchError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WorkbenchError as exc:
        print(f"workbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
