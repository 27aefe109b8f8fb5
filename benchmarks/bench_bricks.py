"""Bricks benchmarks: co-activation cost on one 7B-shape layer (GPU) and the whole zoo analysis (CPU).

GPU (the issue's budget: co-activation <= 1.5x the layer's FFN forward over the same tokens):

    python benchmarks/bench_bricks.py --device cuda            # d_model 4096, d_ff 11008, bf16, 64k tokens

Times, over the same `--tokens` tokens in calls of `--chunk` tokens: (a) the layer's gated FFN
forward down(relu(gate x) * up x), (b) the CoActivation probe's update on that FFN's activation
(the real probe code: mask, M^T M, accumulate), with CUDA events, median of `--reps`. Memory:
the probe state (int32 [d_ff, d_ff]) and the peak extra memory of one update. The counts are
checked against a float64 reference on a slice.

CPU (the issue's budget: the whole brick analysis of zoo:relu-llama in under 60 s):

    OMP_NUM_THREADS=2 python benchmarks/bench_bricks.py --zoo relu-llama    # or silu-llama

runs `wm.brick_analysis` (scores, co-activation, partitions, ablation matrix, top-5 % ablation)
with the notebook's settings and records the wall time per stage and the summary tables.
`--smoke-cpu` runs the layer benchmark at a toy shape on the CPU (the test suite does).

Writes one JSON under --out (default benchmarks/results/) with device, date, commit, command.
scipy / scikit-learn are imported only by --zoo (the GPU machine has neither).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


class _Site:
    """The bits of an FFNSite the probe reads."""

    def __init__(self, d_ff):
        self.layer, self.name, self.kind, self.d_ff = 0, "layer0", "gated", d_ff


def _time(fn, reps, device):
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def layer_bench(args) -> dict:
    from workbench.capture.bricks import CoActivation
    from workbench.capture.probes import Batch, ProbeContext
    from workbench.capture.rules import Rule

    device = torch.device(args.device)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    d, f, n, c = args.d_model, args.d_ff, args.tokens, args.chunk
    w_gate = torch.randn(f, d, device=device, dtype=dt, generator=g) / d ** 0.5
    w_up = torch.randn(f, d, device=device, dtype=dt, generator=g) / d ** 0.5
    w_down = torch.randn(d, f, device=device, dtype=dt, generator=g) / f ** 0.5
    xs = [torch.randn(min(c, n - i), d, device=device, dtype=dt, generator=g) for i in range(0, n, c)]
    with torch.no_grad():
        acts = [torch.relu(x @ w_gate.t()) * (x @ w_up.t()) for x in xs]
    site, ctx = _Site(f), ProbeContext(rule=Rule(), down_norms={})

    def ffn():
        with torch.no_grad():
            for x in xs:
                (torch.relu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()

    probe = CoActivation()

    def coact():
        for a in acts:
            probe.update(site, Batch(a=a, g=None, valid=None, seqs=1), ctx)

    coact()  # allocate the state, warm up
    ffn()
    t_ffn = _time(ffn, args.reps, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t_co = _time(coact, args.reps, device)
    # the update's temporaries beyond its state: the mask and the fp32 product of one call
    peak_extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda" else None
    # exactness: the accumulated counts of one more pass over the first chunk vs float64
    probe2 = CoActivation()
    probe2.update(site, Batch(a=acts[0], g=None, valid=None, seqs=1), ctx)
    sl = slice(0, min(f, 512))
    m = (acts[0][:, sl] != 0).double()
    exact = bool(torch.equal(probe2.state["layer0"]["counts"][sl, sl].double(), m.t() @ m))
    state = probe.state["layer0"]["counts"]
    sparsity = float(sum(int((a == 0).sum()) for a in acts)) / (n * f)
    return {"d_model": d, "d_ff": f, "tokens": n, "chunk": c, "dtype": args.dtype, "reps": args.reps,
            "ffn_forward_s": t_ffn, "coactivation_s": t_co, "ratio": t_co / t_ffn, "budget_ratio": 1.5,
            "within_budget": t_co / t_ffn <= 1.5, "activation_sparsity": sparsity,
            "state_mib": state.numel() * state.element_size() / 2 ** 20, "state_dtype": str(state.dtype),
            "peak_extra_mib_during_update": peak_extra, "counts_exact_vs_fp64": exact}


def zoo_bench(args) -> dict:
    import workbench as wb
    from workbench.metrics.bricks import brick_analysis, zoo_documents

    t0 = time.perf_counter()
    model = wb.load_model(f"zoo:{args.zoo}")
    train, val = zoo_documents()
    t_load = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    res = brick_analysis(model, train, eval_data=val, k=args.k, seeds=args.seeds, max_length=128,
                         eval_max_length=64, baseline_ablation=False)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    r = lambda df: json.loads(df.round(5).to_json(orient="records"))  # noqa: E731
    return {"model": f"zoo:{args.zoo}", "rule": res.rule, "k": args.k, "seeds": args.seeds,
            "train_docs": len(train), "eval_docs": len(val), "load_s": t_load, "analysis_wall_s": total,
            "analysis_cpu_s": cpu, "threads": torch.get_num_threads(), "budget_s": 60.0,
            "within_budget_wall": total < 60.0, "within_budget_cpu": cpu < 60.0, "stages_cpu_s": res.timings,
            "summary": r(res.summary), "summary_selective": r(res.selective),
            "top_ablation": r(res.top_ablation.groupby(["target", "function"], as_index=False)[["delta", "rel"]].mean()),
            "quality": r(res.quality)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke-cpu", action="store_true", help="toy layer shape on the CPU")
    ap.add_argument("--zoo", default=None, help="time the whole analysis of zoo:NAME on the CPU instead")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.smoke_cpu:
        args.device, args.d_model, args.d_ff, args.tokens, args.chunk, args.reps = "cpu", 64, 96, 2048, 512, 2
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": _commit(), "command": " ".join(sys.argv),
           "torch": torch.__version__}
    if args.zoo:
        doc["device"] = f"cpu ({torch.get_num_threads()} threads)"
        doc["zoo"] = zoo_bench(args)
        name = f"bricks_zoo_{args.zoo}_cpu.json"
        print(json.dumps({k: doc["zoo"][k] for k in ("analysis_wall_s", "analysis_cpu_s", "stages_cpu_s")}, indent=1))
    else:
        dev = torch.device(args.device)
        doc["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test)"
        doc["layer"] = layer_bench(args)
        tag = "".join(ch if ch.isalnum() else "_" for ch in doc["device"].lower()).strip("_")
        name = f"bricks_coactivation_{tag}_{time.strftime('%Y-%m-%d')}.json" if not args.smoke_cpu else "bricks_smoke.json"
        print(json.dumps(doc["layer"], indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(doc, indent=1))
    print("wrote", out / name)


if __name__ == "__main__":
    main()
