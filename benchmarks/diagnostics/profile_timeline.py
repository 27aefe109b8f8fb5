"""When do a layer's kernels run inside a CUDA graph? The kernels of graph replays are traced (torch
profiler, CUPTI; or Nsight Systems where installed) and turned into a per-layer timeline: each
kernel's start and end relative to the layer's first kernel, medians over the layers, and the period
between two layers' first kernels (what a graph-replay benchmark measures per call).

--layer moe: P4's MoE-block layer (4096x11008 as 43 experts x 256, fp16, library defaults):
    router, expert up, expert down; T = 8 / 32 at CLS 0.7 / 0.8.
--layer p3: P3's predicted FFN (4096x11008 fp16, width-1024 predictor, library defaults):
    the predictor's first layer (dense Triton GEMV) and the one-launch updown kernel with the
    predictor's second layer fused; s = 0.9 / 0.8.

    python3 benchmarks/diagnostics/profile_timeline.py --layer moe --plan $OUT/plan.json --trace $OUT/trace.json
    python3 benchmarks/diagnostics/profile_timeline.py --plan $OUT/plan.json --summarize $OUT/trace.json

or, with Nsight Systems:

    nsys profile --cuda-graph-trace=node -o $OUT/moe python3 benchmarks/diagnostics/profile_timeline.py \
        --layer moe --plan $OUT/plan.json
    nsys stats -r cuda_gpu_trace -f csv -o $OUT/moe $OUT/moe.nsys-rep
    python3 benchmarks/diagnostics/profile_timeline.py --plan $OUT/plan.json --summarize \
        $OUT/moe_cuda_gpu_trace.csv

The weights rotate over several copies (as in bench_kernels.py, more than the L2 between two
uses), 40 layer calls a graph, replayed 3 times, cases separated by a 20 ms pause. --timing also
times the same graphs untraced (events) and with bench_kernels.py's method: compare the period
with those before reading the timeline. On the H100 the torch profiler's tracing left the MoE
layer's period as it was but made the P3 layer 0.76 us faster than untraced in the same process
(KERNEL_NOTES v17 item 8).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_kernels.py

CALLS = 40
LAYERS = {  # name -> (the kernels of one layer in launch order: name fragments, the cases)
    "moe": (("router", "_expert_up_kernel", "_expert_down_kernel"),
            [{"tokens": t, "cls": c} for t in (8, 32) for c in (0.7, 0.8)]),
    "p3": (("_gemv_kernel", "_updown_kernel"), [{"tokens": 1, "s": s} for s in (0.9, 0.8)]),
}  # fmt: skip


def _moe_sets(case, nw=3):
    import torch
    from bench_kernels import rand_w, solve_rows, union_mask

    d, f, d_e, dt = 4096, 11008, 256, torch.float16
    e = f // d_e
    t = case["tokens"]
    xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
    return [(xs[i], solve_rows(xs[i], union_mask(t, e, case["cls"]), dt),
             (torch.rand(e, device="cuda") + 0.5).to(dt), rand_w(f, d, dt), rand_w(f, d, dt))
            for i in range(nw)]  # fmt: skip


def _p3_sets(case, nw=6):
    import torch
    from bench_kernels import exact_active, rand_w, sign_rows

    d, f, width, dt = 4096, 11008, 1024, torch.float16
    sets = []
    for _ in range(nw):
        x = torch.randn(1, d, device="cuda").to(dt)
        w1 = rand_w(width, d, dt)
        h = torch.relu(torch.nn.functional.linear(x, w1))[0]
        w2 = sign_rows(rand_w(f, width, dt), h, exact_active(f, case["s"]))
        sets.append((x, rand_w(f, d, dt), rand_w(f, d, dt), rand_w(f, d, dt), w1, w2))
    return sets


def drive(layer: str, plan_path: str, trace: str | None, timing: bool = False) -> None:
    import contextlib

    import torch
    from bench_kernels import K

    call = K.moe_blocks if layer == "moe" else K.sparse_ffn_predicted
    kinds, cases = LAYERS[layer]
    plan, graphs = [], []
    for case in cases:
        sets = (_moe_sets if layer == "moe" else _p3_sets)(case)
        for st in sets:  # compile and warm outside the graph
            call(*st)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(torch.cuda.Stream()):
            with torch.cuda.graph(g):
                for c in range(CALLS):
                    call(*sets[c % len(sets)])
        g.replay()  # once untraced
        torch.cuda.synchronize()
        graphs.append((g, sets))
        plan.append({**case, "layer": layer, "kernels": list(kinds), "calls": CALLS, "replays": 3})
    if timing:  # the graph replays timed with events, beside bench_kernels.py's method
        from bench_kernels import bench, rotating

        for (g, sets), p in zip(graphs, plan):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            per = []
            for _ in range(5):
                ev[0].record()
                g.replay()
                ev[1].record()
                torch.cuda.synchronize()
                per.append(ev[0].elapsed_time(ev[1]) * 1e3 / CALLS)
            ms = bench(rotating(call, sets), 10)
            print(f"{p}: graph of {CALLS} calls {sorted(per)[2]:.2f} us a call (median of 5 "
                  f"replays); do_bench_cudagraph {ms * 1e3:.2f} us", flush=True)
    if trace:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CUDA])
    else:
        prof = contextlib.nullcontext()
    with prof:
        for (g, _), p in zip(graphs, plan):
            for _ in range(p["replays"]):
                g.replay()
            torch.cuda.synchronize()
            time.sleep(0.02)
            print(f"{p}: replayed", flush=True)
    if trace:
        prof.export_chrome_trace(trace)
    Path(plan_path).write_text(json.dumps(plan, indent=1))


def summarize(trace_path: str, plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    kinds = plan[0].get("kernels", list(LAYERS["moe"][0]))
    rows = []

    def add(name, start_ns, dur_ns):
        for k in kinds:
            if k in name:
                rows.append((start_ns, start_ns + dur_ns, k))
                return

    if trace_path.endswith(".json"):  # chrome trace of the torch profiler: kernel events in us
        for ev in json.loads(Path(trace_path).read_text())["traceEvents"]:
            if ev.get("cat") == "kernel":
                add(ev.get("name", ""), float(ev["ts"]) * 1e3, float(ev["dur"]) * 1e3)
    else:  # nsys stats cuda_gpu_trace CSV, ns
        with open(trace_path) as fh:
            for r in csv.DictReader(fh):
                add(r.get("Name", ""), float(r["Start (ns)"]), float(r["Duration (ns)"]))
    rows.sort()
    # segments of the trace separated by pauses (> 2 ms): the warm-up calls, each case's replays
    segs, cur = [], []
    for r in rows:
        if cur and r[0] - cur[-1][1] > 2e6:
            segs.append(cur)
            cur = []
        cur.append(r)
    segs.append(cur)
    n = len(kinds)
    graphs = []
    for seg in segs:  # layers: the layer's kernels in launch order
        ls = [seg[i:i + n] for i in range(len(seg) - n + 1)
              if [k for _, _, k in seg[i:i + n]] == kinds]  # fmt: skip
        if len(ls) >= CALLS:  # the graph replays (warm-up segments are short)
            graphs.append(ls)
    if len(graphs) != len(plan):
        print(f"found {len(graphs)} replay segments, expected {len(plan)}")
    for p, chunk in zip(plan, graphs):
        spans = [([], []) for _ in kinds]
        period = []
        for j, layer in enumerate(chunk):
            t0 = layer[0][0]
            for (starts, ends), (a, b, _) in zip(spans, layer):
                starts.append(a - t0)
                ends.append(b - t0)
            if j + 1 < len(chunk) and (j + 1) % p["calls"]:
                period.append(chunk[j + 1][0][0] - t0)
        case = " ".join(f"{'T' if k == 'tokens' else k}={v}" for k, v in p.items()
                        if k in ("tokens", "cls", "s"))  # fmt: skip
        parts = [f"{k.strip('_')} {statistics.median(a) / 1e3:.2f}-{statistics.median(b) / 1e3:.2f}"
                 for k, (a, b) in zip(kinds, spans)]  # fmt: skip
        print(f"{case} ({len(chunk)} layers; us from the first kernel's start, medians): "
              + " | ".join(parts) + f" | next layer after {statistics.median(period) / 1e3:.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layer", choices=sorted(LAYERS), default="moe")
    p.add_argument("--plan", required=True, help="JSON file: written when driving, read to summarise")
    p.add_argument("--trace", help="write a torch-profiler chrome trace of the replays here")
    p.add_argument("--timing", action="store_true",
                   help="also time the graphs with events and with bench_kernels.py's method")  # fmt: skip
    p.add_argument("--summarize", metavar="TRACE",
                   help="a chrome trace (.json) or nsys stats cuda_gpu_trace CSV")  # fmt: skip
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.plan)
    else:
        drive(args.layer, args.plan, args.trace, args.timing)


if __name__ == "__main__":
    main()
