"""`workbench` command line: profile (and zoo, from the zoo module)."""

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
    import torch

    import workbench as wb
    from workbench.data import validation_tokens

    source = args.source or default_source()
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    from workbench.capture import distributed

    if distributed.scale_requested(args):
        out = Path(args.out) if args.out else _fresh_dir(Path("runs"), "profile-" + source.replace(":", "-").replace("/", "-"))
        run = distributed.cli_profile(args, source, out, probes=["neuron_stats", "abs_sketch"])
        if run is None:  # ranks > 0
            return 0
        return _print_profile(run, source, out, t0)
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
    return _print_profile(run, source, out, t0)


def _print_profile(run, source: str, out: Path, t0: float) -> int:
    import pandas as pd

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
    sc = pr.add_argument_group("scale (docs/scaling.md)")
    sc.add_argument("--corpus", help="a corpus streamed from disk: text file, .jsonl, .arrow or a datasets save_to_disk folder")
    sc.add_argument("--text-field", default="text", help="JSONL key / dataset column of the text (default text)")
    sc.add_argument("--split", help="split of a saved DatasetDict")
    sc.add_argument("--max-tokens", type=int, help="stop after this many tokens of --corpus / --text")
    sc.add_argument("--distributed", action="store_true", help="under torchrun: each rank profiles its shard, rank 0 writes the Run")
    sc.add_argument("--save-every", type=int, help="checkpoint the merged state every N tokens into --out")
    sc.add_argument("--resume", action="store_true", help="continue the checkpointed profile in --out")
    sc.add_argument("--device-map", help="accelerate device_map for models larger than one GPU (e.g. auto)")
    pr.set_defaults(func=cmd_profile)
    try:
        from workbench.models.zoo_cli import add_zoo_parser
    except ImportError:
        add_zoo_parser = None
    if add_zoo_parser is not None:
        add_zoo_parser(sub)
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
