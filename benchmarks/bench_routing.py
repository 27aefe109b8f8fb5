"""Routing probe: GPU cost, CPU memory flat in tokens, heatmap build time and size (issue 24).

    # GPU (P6 style, as benchmarks/capture_overhead.py): Mixtral-8x7B-shape stack, 4 layers, bf16,
    # one 2048-token prefill; plain forward vs the same forward inside wb.capture(RoutingProbe)
    python benchmarks/bench_routing.py --part gpu --out benchmarks/results/routing_gpu_DEVICE_DATE.json
    # CPU: peak RSS of profiling 4k and 64k tokens of zoo:topk-moe (fresh process each), and the
    # 4,096-token x 64-expert heatmap figure's build time and serialised size
    python benchmarks/bench_routing.py --part cpu --out benchmarks/results/routing_cpu_DATE.json
    # toy shapes on the CPU, end to end (tests/benchmarks/test_bench_routing.py)
    python benchmarks/bench_routing.py --smoke-cpu --out /tmp/x.json

The GPU part imports neither plotly nor scipy (the GPU machine has neither).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from workbench._timing import timed_ms

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or None


# -- GPU: probe cost vs the plain forward ---------------------------------------------------------

def _mixtral_stack(layers: int, smoke: bool, device: str):
    import transformers as tf

    if smoke:
        kw = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512)
    else:  # Mixtral-8x7B shape
        kw = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=32000)
    cfg = tf.MixtralConfig(num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.MixtralModel(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    return model, cfg


def cuda_timed(fn, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of fn, by CUDA events around each call."""
    return timed_ms(fn, reps, "cuda")


def cpu_timed(fn, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of fn, by the wall clock."""
    return timed_ms(fn, reps, "cpu")


def _count_ops(fn) -> int:
    """PyTorch ops dispatched while running fn() (TorchDispatchMode: every aten op, views too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def part_gpu(args) -> dict:
    import workbench as wb

    device = "cpu" if args.smoke_cpu else "cuda"
    model, cfg = _mixtral_stack(args.layers, args.smoke_cpu, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=g).to(device)
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def fwd():
        model(input_ids=ids, attention_mask=mask)

    timed = cuda_timed if device == "cuda" else cpu_timed

    for _ in range(3):
        fwd()
    modes = {"routing-probe": lambda: [wb.RoutingProbe(budget=args.budget)],
             "routing-probe-no-sample": lambda: [wb.RoutingProbe(budget=0)],
             "routing-probe-cuda-graphs": lambda: [wb.RoutingProbe(budget=args.budget, cuda_graphs=True)]}
    base: list[float] = []
    times: dict[str, list[float]] = {m: [] for m in modes}
    errors: dict[str, str] = {}  # a mode that fails is reported and dropped; the others still run
    finalize = []
    for _ in range(args.rounds):
        base += timed(fwd, args.reps)
        for mode, make in list(modes.items()):
            try:
                with wb.capture(model, probes=make()) as run:
                    fwd()  # warm-up inside the capture: the first call shape is counted eagerly,
                    fwd()  # the second makes the CUDA graph that later calls replay
                    times[mode] += timed(fwd, args.reps)
                    t0 = time.perf_counter()
                finalize.append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # noqa: BLE001 - recorded in the results
                errors[mode] = f"{type(exc).__name__}: {exc}"
                del modes[mode], times[mode]
    b = statistics.median(base)
    # PyTorch ops the probe dispatches per router call (each one a kernel launch or a view): one
    # forward under an op counter, with the capture minus without, over the routers
    ops = {}
    plain = _count_ops(fwd)
    for mode, make in modes.items():
        with wb.capture(model, probes=make()) as run2:
            fwd()
            fwd()
            ops[mode] = (_count_ops(fwd) - plain) / len(run2.meta["routers"])
    import transformers as tf

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test)",
        "torch": torch.__version__, "transformers": tf.__version__,
        "rows": [{"measure": "routing probe cost", "shape": f"{args.layers}x{cfg.hidden_size}x{cfg.intermediate_size}x8e top-2",
                  "dtype": "bf16" if device == "cuda" else "fp32", "tokens": args.tokens, "mode": mode,
                  "baseline_ms": b, "ms": statistics.median(t), "overhead": statistics.median(t) / b,
                  "target": 1.05, "ms_min_max": [min(t), max(t)], "baseline_ms_min_max": [min(base), max(base)]}
                 for mode, t in times.items()],
        "finalize_ms_median": statistics.median(finalize),
        "errors": errors,
        "probe_ops_per_router_call": ops,
        "routers": len(run.meta["routers"]),
    }


# -- CPU: peak memory flat in tokens ---------------------------------------------------------------

def _child_profile(args) -> dict:
    """One fresh process: profile `--tokens` tokens of the model with a RoutingProbe; peak RSS."""
    import workbench as wb

    torch.set_num_threads(1)
    if args.smoke_cpu:
        from tests import tiny

        model = tiny.build_router("mixtral")
        g = torch.Generator().manual_seed(0)
        flat = torch.randint(2, 97, (args.tokens,), generator=g)
    else:
        from workbench.models.corpus import load_split

        model = wb.load_model("zoo:topk-moe", dtype=torch.float32)
        tok, ids = model.tokenizer, []
        for doc in load_split("train"):
            ids += tok(doc.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(ids) >= args.tokens:
                break
        flat = torch.tensor(ids[: args.tokens])
    seq = args.seq
    n = -(-args.tokens // seq)
    ids = torch.full((n * seq,), 1, dtype=torch.long)
    ids[: flat.numel()] = flat
    mask = (torch.arange(n * seq) < flat.numel()).long()
    ids, mask = ids.reshape(n, seq), mask.reshape(n, seq)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    probe = wb.RoutingProbe(budget=args.budget)
    t0 = time.perf_counter()
    run = wb.profile(model, ids, attention_mask=mask, batch_size=args.batch, probes=[probe], progress=False)
    secs = time.perf_counter() - t0
    state = sum(v.numel() * v.element_size() for v in run.tensors.values())
    return {"tokens": int(run.meta["data"]["n_tokens"]), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_profile_mib": before / 1024, "probe_state_bytes": state, "seconds": secs}


def part_memory(args) -> dict:
    rows = []
    for n in args.memory_tokens:
        cmd = [sys.executable, __file__, "--part", "memory-child", "--tokens", str(n), "--seq", str(args.seq),
               "--batch", str(args.batch), "--budget", str(args.budget)] + (["--smoke-cpu"] if args.smoke_cpu else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    lo, hi = rows[0], rows[-1]
    return {"model": "tests.tiny mixtral" if args.smoke_cpu else "zoo:topk-moe (fp32)", "rows": rows,
            "peak_ratio": hi["peak_rss_mib"] / lo["peak_rss_mib"], "target_ratio_max": 1.10,
            "probe_state_equal": hi["probe_state_bytes"] == lo["probe_state_bytes"],
            "batch": args.batch, "seq": args.seq, "budget": args.budget}


# -- CPU: the heatmap figure -----------------------------------------------------------------------

def part_heatmap(args) -> dict:
    import numpy as np
    import pandas as pd
    from workbench.widgets import figures_routing as fr

    from workbench.metrics.routing import Sample

    t, e = args.heatmap_tokens, args.heatmap_experts
    rng = np.random.default_rng(0)
    w = rng.random((t, e)).astype(np.float32) * (rng.random((t, e)) < 0.1)
    s = Sample(0, w, w > 0, pd.DataFrame({"text": [f" tok{i}" for i in range(t)]}))
    fr.routing_heatmap_figure(s)  # warm-up (imports, plotly validators)
    times, size = [], 0
    for _ in range(args.heatmap_reps):
        t0 = time.perf_counter()
        fig = fr.routing_heatmap_figure(s)
        times.append(time.perf_counter() - t0)
        size = len(fig.to_json().encode())
    t0 = time.perf_counter()
    fig.to_json()
    return {"tokens": t, "experts": e, "build_s_median": statistics.median(times), "build_s_max": max(times),
            "serialise_s": time.perf_counter() - t0, "json_bytes": size, "columns": len(fig.data[0].x),
            "title": fig.layout.title.text, "target_build_s": 0.3, "target_bytes": 2_000_000}


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["gpu", "cpu", "memory", "heatmap", "memory-child"], default=None)
    ap.add_argument("--smoke-cpu", action="store_true", help="toy shapes on the CPU, every part")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--memory-tokens", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heatmap-tokens", type=int, default=4096)
    ap.add_argument("--heatmap-experts", type=int, default=64)
    ap.add_argument("--heatmap-reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke_cpu and args.part != "memory-child":
        args.tokens, args.rounds, args.reps, args.layers = 64, 1, 2, 2
        args.memory_tokens, args.seq, args.batch, args.budget = [256, 1024], 32, 4, 64
        args.heatmap_tokens, args.heatmap_experts, args.heatmap_reps = 1024, 16, 2
    return args


def main() -> None:
    args = parse_args()
    if args.part == "memory-child":
        print(json.dumps(_child_profile(args)))
        return
    parts = {"gpu": ["gpu"], "cpu": ["memory", "heatmap"], "memory": ["memory"], "heatmap": ["heatmap"],
             None: ["gpu", "memory", "heatmap"] if args.smoke_cpu else ["gpu"]}[args.part]
    result = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(),
              "command": "python benchmarks/bench_routing.py " + " ".join(sys.argv[1:]),
              "machine": f"{os.cpu_count()} CPU cores" + (", smoke test" if args.smoke_cpu else "")}
    for p in parts:
        result[p] = {"gpu": part_gpu, "memory": part_memory, "heatmap": part_heatmap}[p](args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
