"""`workbench` command line: profile (and zoo, from the zoo module; serve and report from widgets/).

Every mistake a user can make ends in one line `workbench: error: <cause and fix>` on stderr and
exit status 2, never a traceback. The plumbing is here, in one place, for every subcommand:

- argparse's own usage errors (unknown flag, bad int) go through `Parser.error`;
- a command raises `CLIError` (or calls `fail(...)`) for a bad argument, naming the flag;
- a `WorkbenchError` from the library (a model that cannot load, a damaged run) takes the same path.

A new subcommand: `add_parser` on the subparsers of `build_parser()`, `set_defaults(func=...)`,
validate its arguments with `fail(...)` / `positive_int(...)` before doing any expensive work.
Heavy modules (torch, transformers, the workbench itself) are imported inside the commands, so
`workbench --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

DEFAULT_TOKENS = 4096
EXIT_USAGE = 2


class CLIError(Exception):
    """A usage mistake: `main` prints `workbench: error: MESSAGE` (after `usage`, if given) and
    exits with status 2."""

    def __init__(self, message: str, usage: str | None = None):
        super().__init__(message)
        self.usage = usage


def fail(message: str) -> NoReturn:
    """Stop the command with `workbench: error: message` and exit status 2."""
    raise CLIError(message)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors take the CLIError path (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message, usage=self.format_usage())


def positive_int(value: int | None, flag: str) -> None:
    """Refuse a count below 1, naming the flag (`--tokens must be >= 1`)."""
    if value is not None and value < 1:
        fail(f"{flag} must be >= 1 (got {value})")


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


def read_text_arg(path: str, flag: str = "--text") -> str:
    """The UTF-8 text of `path`, or a CLIError naming the flag (missing, a folder, binary, empty)."""
    p = Path(path)
    if not p.exists():
        fail(f"{flag} {path}: no such file; pass a UTF-8 text file")
    if not p.is_file():
        fail(f"{flag} {path} is not a file; pass a UTF-8 text file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        fail(f"{flag} {path} cannot be read ({exc.strerror})")
    nul = raw.find(b"\0")
    if nul >= 0:
        fail(f"{flag} {path} is a binary file (NUL byte at offset {nul}); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{flag} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
             "convert it to UTF-8 or pass another file")
    if not text.strip():
        fail(f"{flag} {path} is empty; pass a file with text")
    return text


def parse_dtype(name: str | None, flag: str = "--dtype"):
    """torch dtype from a name (float32, bfloat16, fp16, ...), or a CLIError listing the choices."""
    if name is None:
        return None
    from workbench.models.loading import DTYPE_CHOICES, DTYPE_NAMES

    key = name.lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        fail(f"{flag} {name!r} is not a dtype; use one of {DTYPE_CHOICES}")
    import torch

    return getattr(torch, DTYPE_NAMES[key])


def check_device(spec: str | None, flag: str = "--device") -> str | None:
    """Refuse a device this machine does not have, before any model is loaded."""
    if spec is None:
        return None
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        fail(f"{flag} {spec!r} is not a device; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            fail(f"{flag} {spec}: CUDA is not available on this machine (torch {torch.__version__}, {build}); "
                 "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                 f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        fail(f"{flag} {spec}: MPS is not available on this machine; use --device cpu")
    return spec


def check_out_dir(out: str | None, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an --out that Run.save would refuse, before the expensive work (mirrors Run.save)."""
    if out is None:
        return
    p = Path(out)
    if not p.exists():
        return
    if not p.is_dir():
        fail(f"{flag} {out} is a file; choose a directory for the run")
    if any(p.iterdir()):
        from workbench.capture.distributed import checkpoint_tokens

        done = checkpoint_tokens(p)
        if done is not None and not (p / "run.json").is_file():
            fail(f"{flag} {out} holds an unfinished profile (checkpoint at {done} tokens): add --resume to "
                 f"continue it, or choose another {flag}")
        is_run = (p / "run.json").is_file()
        if is_run and not overwrite:
            fail(f"{flag} {out} already holds a run; pass --overwrite to replace it, or choose another {flag}")
        if not is_run:
            fail(f"{flag} {out} holds files that are not a workbench run; refusing to overwrite them even "
                 f"with --overwrite: choose another {flag}")


def cmd_profile(args) -> int:
    # every argument is checked before the model is loaded (seconds to minutes on a large model)
    if args.text is not None and args.corpus is not None:
        raise CLIError("--text and --corpus both given: --text profiles one file in memory, --corpus streams a "
                       "corpus from disk (any size); pass one of them")
    if args.corpus is not None and args.tokens is not None:
        raise CLIError("--tokens counts tokens of the bundled validation text; with --corpus cap the tokens "
                       "with --max-tokens N")
    given = [f for f, v in (("--split", args.split), ("--text-field", args.text_field)) if v is not None]
    if given and args.corpus is None:
        raise CLIError(f"{' and '.join(given)} describe a --corpus (a .jsonl / dataset on disk); pass --corpus "
                       "F with them, or leave them out")
    args.tokens = DEFAULT_TOKENS if args.tokens is None else args.tokens
    args.text_field = "text" if args.text_field is None else args.text_field
    if args.text is None:
        positive_int(args.tokens, "--tokens")
    positive_int(args.batch_size, "--batch-size")
    positive_int(args.seq_len, "--seq-len")
    positive_int(args.max_tokens, "--max-tokens")
    positive_int(args.save_every, "--save-every")
    text = read_text_arg(args.text) if args.text is not None else None
    dtype = parse_dtype(args.dtype)
    check_device(args.device)
    if not getattr(args, "resume", False):  # a resumed profile's --out holds its checkpoint
        check_out_dir(args.out, args.overwrite)
    from workbench.capture.rules import Rule

    rule = Rule.parse(args.rule)  # a WorkbenchError names the rule and the accepted forms

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
        try:
            run = distributed.cli_profile(args, source, out, probes=["neuron_stats", "abs_sketch"], dtype=dtype)
        except KeyboardInterrupt as exc:
            done = distributed.checkpoint_tokens(out) if out.is_dir() else None
            if done is not None:
                exc.wb_note = (f"the last checkpoint ({done} tokens) is in {out}: run the same command "
                               "with --resume to continue")
            raise
        if run is None:  # ranks > 0
            return 0
        return _print_profile(run, source, out, t0)
    model = wb.load_model(source, device=args.device, dtype=dtype)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and args.seq_len > max_pos:
        fail(f"--seq-len {args.seq_len} is longer than the model's max_position_embeddings ({max_pos}); "
             f"pass --seq-len {max_pos} or less")
    torch.manual_seed(0)
    if text is not None:
        texts = [p.strip() for p in text.split("\n\n") if p.strip()]
        data, mask, info = texts, None, {"text_file": str(Path(args.text).resolve())}
    else:
        data, mask, desc = validation_tokens(model, args.tokens, args.seq_len)
        info = {"tokens_requested": args.tokens, "text": desc}
    run = wb.profile(model, data, attention_mask=mask, batch_size=args.batch_size, max_length=args.seq_len,
                     max_tokens=args.max_tokens, rule=rule, probes=["neuron_stats", "abs_sketch"], progress=not args.quiet,
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
    p = Parser(prog="workbench", description="LLM activation-sparsity workbench")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pr = sub.add_parser("profile", help="capture FFN activation statistics and print a per-layer summary")
    pr.add_argument("source", nargs="?", help="zoo:NAME, a local model directory or a hub id "
                    "(default: zoo:relu-llama, or builtin:tiny-relu-llama before the zoo exists)")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file; paragraphs (blank-line separated) are the sequences")
    src.add_argument("--tokens", type=int, default=None,
                     help=f"profile the first N tokens of the bundled validation text (default {DEFAULT_TOKENS})")
    pr.add_argument("--out", help="run directory to write (default: a fresh runs/profile-MODEL-TIME)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    pr.add_argument("--rule", default="zero", help="zero | fat(T) | topk(k) | magnitude(t) (default zero)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (and text truncation)")
    pr.add_argument("--device", default=None)
    pr.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    sc = pr.add_argument_group("scale (docs/scaling.md)")
    sc.add_argument("--corpus", help="a corpus streamed from disk: text file, .jsonl, .arrow or a datasets save_to_disk folder")
    sc.add_argument("--text-field", default=None, help="JSONL key / dataset column of the text (default text)")
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
    from workbench.widgets.cli import add_parsers as add_widget_parsers

    add_widget_parsers(sub)
    return p


def error_exit(exc: BaseException) -> int:
    """Print `workbench: error: ...` (after the usage line of an argparse error) and return 2."""
    usage = getattr(exc, "usage", None)
    if usage:
        sys.stderr.write(usage)
    print(f"workbench: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    from workbench.errors import WorkbenchError

    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (CLIError, WorkbenchError) as exc:
        return error_exit(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, where to pick up, status 130 (128 + SIGINT)
        note = getattr(exc, "wb_note", None)
        print("workbench: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `workbench zoo list | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 141  # 128 + SIGPIPE, as a shell tool would


if __name__ == "__main__":
    sys.exit(main())
