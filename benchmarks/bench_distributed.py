"""Distributed profiles: the merged Run equals one process, and what the distributed path costs.

CPU (default; the zoo model, gloo):
    python benchmarks/bench_distributed.py --tokens 16384
  one process (`wb.profile`), then 2 ranks under torchrun (`profile_corpus`, gloo): tokens/s of
  each and whether the merged Run equals the single-process one (counts exact; float64 sums
  compared exactly and within 1e-12).

GPU (a 7B-shape Llama, 32 layers, hidden 4096, d_ff 11008, bf16, ReLU, random weights):
    python benchmarks/bench_distributed.py --device cuda
  relaunches itself under torchrun with one rank (NCCL) and times, alternately in the same
  process, the plain `wb.profile` and the distributed path (`profile_corpus` with the NCCL world:
  the rank agreement, the data hashing, the gather to rank 0 and the fold), medians of --repeats.
  Criterion: distributed / plain <= 1.02.

--smoke-cpu: the GPU measurement at a toy shape on the CPU (gloo), for the test suite.
Writes benchmarks/results/distributed_<cpu|gpu|smoke>.json (or --out DIR) with device, date,
git commit, command and the figures. No panel/plotly/scipy import (GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
SHAPE_TOY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def _command() -> str:
    return " ".join(["python", "benchmarks/bench_distributed.py", *sys.argv[1:]])


def _write(args, name: str, doc: dict) -> Path:
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "bench_distributed", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "git_commit": _commit(), "command": os.environ.get("WB_BENCH_COMMAND") or _command(), **doc}
    path = out / f"distributed_{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))
    return path


def _torchrun(nproc: int, argv: list[str], env=None) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), str(Path(__file__).resolve()), *argv]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if r.returncode:
        raise SystemExit(f"torchrun failed ({r.returncode}): {' '.join(cmd)}")


# ------------------------------------------------------------------------- CPU: 2 gloo ranks
def _zoo_data(tokens: int, seq_len: int):
    import workbench as wb
    from workbench.data import validation_tokens

    model = wb.load_model("zoo:relu-llama")
    ids, mask, _ = validation_tokens(model, tokens, seq_len)
    return model, ids, mask


def cpu_main(args) -> None:
    import workbench as wb
    from workbench.capture.distributed import compare_runs

    model, ids, mask = _zoo_data(args.tokens, args.seq_len)
    kw = dict(attention_mask=mask, batch_size=args.batch_size, probes=["neuron_stats", "abs_sketch"],
              progress=False)
    wb.profile(model, ids[: args.batch_size], attention_mask=mask[: args.batch_size], batch_size=args.batch_size,
               progress=False)  # warm-up
    t = time.perf_counter()
    ref = wb.profile(model, ids, **kw)
    one_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        _torchrun(2, ["--worker-cpu", "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
                      "--batch-size", str(args.batch_size), "--out", tmp],
                  env={"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))})
        run = wb.Run.load(Path(tmp) / "run")
        exact = compare_runs(ref, run, rtol=0)
        close = compare_runs(ref, run, rtol=1e-12)
    n = ref.meta["data"]["n_tokens"]
    sc = run.meta["scale"]
    _write(args, "cpu", {
        "device": _device_name("cpu"), "model": "zoo:relu-llama", "tokens": n, "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "one_process": {"wall_s": round(one_s, 3), "tokens_per_s": round(n / one_s, 1)},
        "two_ranks_gloo": {"wall_s": sc["wall_s"], "tokens_per_s": sc["tokens_per_s"],
                           "tokens_per_s_per_rank": round(sc["tokens_per_s"] / 2, 1)},
        "merged_equals_one_process_exactly": not exact, "differences_exact": exact,
        "merged_equals_within_1e-12": not close,
        "note": "2 ranks share the machine's cores; the wall time includes every rank reading and "
                "hashing all batches, the gather to rank 0 and the fold"})


def cpu_worker(args) -> None:
    from workbench.capture.distributed import init_distributed, profile_corpus, shutdown

    world = init_distributed("gloo")
    try:
        model, ids, mask = _zoo_data(args.tokens, args.seq_len)
        profile_corpus(model, ids, attention_mask=mask, batch_size=args.batch_size,
                       probes=["neuron_stats", "abs_sketch"], world=world, progress=False,
                       out=Path(args.out) / "run")
    finally:
        shutdown(world)


# ------------------------------------------------------------------------- GPU: world size 1
def _build(shape: dict, device: str, dtype):
    import transformers as tf

    cfg = tf.LlamaConfig(**shape, hidden_act="relu", max_position_embeddings=4096)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def world1_worker(args) -> None:
    import workbench as wb
    from workbench.capture.distributed import (
        compare_runs,
        init_distributed,
        profile_corpus,
        shutdown,
    )

    device = "cpu" if args.smoke_cpu else args.device
    world = init_distributed("gloo" if device == "cpu" else "nccl")
    try:
        shape = SHAPE_TOY if args.smoke_cpu else SHAPE_7B
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = _build(shape, f"cuda:{world.local_rank}" if device == "cuda" else "cpu", dtype)
        g = torch.Generator().manual_seed(0)
        n_seq = -(-args.tokens // args.seq_len)
        ids = torch.randint(0, shape["vocab_size"], (n_seq, args.seq_len), generator=g)
        kw = dict(batch_size=args.batch_size, probes=["neuron_stats"], progress=False)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def plain():
            return wb.profile(model, ids, **kw)

        def dist():
            return profile_corpus(model, ids, world=world, **kw)

        plain()
        dist()  # warm-up (kernels, allocator)
        times = {"plain": [], "distributed": []}
        runs = {}
        for r in range(args.repeats):
            order = (("plain", plain), ("distributed", dist)) if r % 2 == 0 else (("distributed", dist), ("plain", plain))
            for name, fn in order:
                sync()
                t = time.perf_counter()
                runs[name] = fn()
                sync()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        n = runs["plain"].meta["data"]["n_tokens"]
        ratio = med["distributed"] / med["plain"]
        _write(args, "smoke" if args.smoke_cpu else "gpu", {
            "device": _device_name(device), "backend": world.backend, "world_size": world.size,
            "model": ("toy" if args.smoke_cpu else "7B-shape") + f" Llama {shape}, "
                     f"{'fp32' if dtype == torch.float32 else 'bf16'}, ReLU, random weights",
            "tokens": n, "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats,
            "plain_s": [round(x, 4) for x in times["plain"]],
            "distributed_s": [round(x, 4) for x in times["distributed"]],
            "plain_tokens_per_s": round(n / med["plain"], 1),
            "distributed_tokens_per_s": round(n / med["distributed"], 1),
            "cost_ratio_median": round(ratio, 4), "criterion": "cost_ratio_median <= 1.02",
            "criterion_met": ratio <= 1.02,
            "runs_equal_exactly": not compare_runs(runs["plain"], runs["distributed"], rtol=0),
            "runs_equal_within_1e-12": not compare_runs(runs["plain"], runs["distributed"], rtol=1e-12)})
    finally:
        shutdown(world)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--smoke-cpu", action="store_true", help="the GPU measurement at a toy shape on the CPU")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--worker-cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-world1", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu_like = args.device == "cuda" or args.smoke_cpu
    defaults = {"tokens": 2048 if args.smoke_cpu else 262144 if gpu_like else 16384,
                "seq_len": 128 if args.smoke_cpu else 2048 if gpu_like else 256,
                "batch_size": 4 if args.smoke_cpu else 8}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    os.environ.setdefault("WB_BENCH_COMMAND", _command())
    if args.worker_cpu:
        return cpu_worker(args)
    if args.worker_world1:
        return world1_worker(args)
    if gpu_like:
        argv = ["--worker-world1", "--device", args.device, "--tokens", str(args.tokens), "--seq-len",
                str(args.seq_len), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        if args.smoke_cpu:
            argv.append("--smoke-cpu")
        if args.out:
            argv += ["--out", args.out]
        return _torchrun(1, argv)
    return cpu_main(args)


if __name__ == "__main__":
    main()
