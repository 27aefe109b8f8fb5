"""When do the MoE-block layer's three kernels run inside a CUDA graph? (P4 moe, 4096x11008 as 43
experts x 256, fp16, the library defaults.) The kernels of the graph replays are traced (torch
profiler, CUPTI; or Nsight Systems where installed), then turned into a per-layer timeline: start
and end of the router, the expert up and the expert down kernel relative to the router's start,
medians over the layers, and the period between two layers' routers (what a graph-replay benchmark
measures per call).

    python3 benchmarks/profile_moe_timeline.py --plan $OUT/plan.json --trace $OUT/trace.json
    python3 benchmarks/profile_moe_timeline.py --plan $OUT/plan.json --summarize $OUT/trace.json

or, with Nsight Systems:

    nsys profile --cuda-graph-trace=node -o $OUT/moe python3 benchmarks/profile_moe_timeline.py \
        --plan $OUT/plan.json
    nsys stats -r cuda_gpu_trace -f csv -o $OUT/moe $OUT/moe.nsys-rep
    python3 benchmarks/profile_moe_timeline.py --plan $OUT/plan.json --summarize \
        $OUT/moe_cuda_gpu_trace.csv

The weights rotate over 3 copies (as in bench_kernels.py, more than the L2 between two uses), 40
layer calls a graph, replayed 3 times, cases separated by a 20 ms pause.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = [(8, 0.7), (8, 0.8), (32, 0.7), (32, 0.8)]  # (tokens, CLS)
CALLS = 40
ROUTER, UP, DOWN = "router", "_expert_up_kernel", "_expert_down_kernel"


def drive(plan_path: str, trace: str | None) -> None:
    import contextlib

    import torch
    from bench_kernels import K, rand_w, solve_rows, union_mask

    d, f, d_e, nw, dt = 4096, 11008, 256, 3, torch.float16
    e = f // d_e
    wu = [rand_w(f, d, dt) for _ in range(nw)]
    wdt = [rand_w(f, d, dt) for _ in range(nw)]
    plan, graphs = [], []
    for t, cls in CASES:
        xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        wr = [solve_rows(xs[i], union_mask(t, e, cls), dt) for i in range(nw)]
        nwt = [(torch.rand(e, device="cuda") + 0.5).to(dt) for _ in range(nw)]
        for i in range(nw):  # compile and warm outside the graph
            K.moe_blocks(xs[i], wr[i], nwt[i], wu[i], wdt[i])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            with torch.cuda.graph(g):
                for c in range(CALLS):
                    i = c % nw
                    K.moe_blocks(xs[i], wr[i], nwt[i], wu[i], wdt[i])
        g.replay()  # once untraced
        torch.cuda.synchronize()
        graphs.append((g, xs, wr, nwt))
        plan.append({"tokens": t, "cls": cls, "calls": CALLS, "replays": 3})
    if trace:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CUDA])
    else:
        prof = contextlib.nullcontext()
    with prof:
        for (g, *_), p in zip(graphs, plan):
            for _ in range(p["replays"]):
                g.replay()
            torch.cuda.synchronize()
            time.sleep(0.02)
            print(f"T={p['tokens']} CLS {p['cls']}: {CALLS} layer calls x 3 replays", flush=True)
    if trace:
        prof.export_chrome_trace(trace)
    Path(plan_path).write_text(json.dumps(plan, indent=1))


def summarize(trace_csv: str, plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    rows = []

    def add(name, start_ns, dur_ns):
        kind = ROUTER if "router" in name else UP if UP in name else DOWN if DOWN in name else None
        if kind:
            rows.append((start_ns, start_ns + dur_ns, kind))

    if trace_csv.endswith(".json"):  # chrome trace of the torch profiler: kernel events in us
        for ev in json.loads(Path(trace_csv).read_text())["traceEvents"]:
            if ev.get("cat") == "kernel":
                add(ev.get("name", ""), float(ev["ts"]) * 1e3, float(ev["dur"]) * 1e3)
    else:  # nsys stats cuda_gpu_trace CSV, ns
        with open(trace_csv) as fh:
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
    graphs = []
    for seg in segs:  # layers: a router followed by an up and a down kernel
        ls = [seg[i:i + 3] for i in range(len(seg) - 2)
              if [k for _, _, k in seg[i:i + 3]] == [ROUTER, UP, DOWN]]  # fmt: skip
        if len(ls) >= CALLS:  # the graph replays (warm-up segments have 3 layers)
            graphs.append(ls)
    if len(graphs) != len(plan):
        print(f"found {len(graphs)} replay segments, expected {len(plan)}")
    for p, chunk in zip(plan, graphs):
        rel = {key: [] for key in ("router_end", "up_start", "up_end", "down_start", "down_end")}
        period = []
        for j, (ro, up, dn) in enumerate(chunk):
            t0 = ro[0]
            rel["router_end"].append(ro[1] - t0)
            rel["up_start"].append(up[0] - t0)
            rel["up_end"].append(up[1] - t0)
            rel["down_start"].append(dn[0] - t0)
            rel["down_end"].append(dn[1] - t0)
            if j + 1 < len(chunk) and (j + 1) % p["calls"]:
                period.append(chunk[j + 1][0][0] - t0)
        med = {key: statistics.median(v) / 1e3 for key, v in rel.items()}
        print(
            f"T={p['tokens']} CLS {p['cls']} ({len(chunk)} layers; us from the router's start, "
            f"medians): router 0-{med['router_end']:.2f} | up {med['up_start']:.2f}-"
            f"{med['up_end']:.2f} | down {med['down_start']:.2f}-{med['down_end']:.2f} | "
            f"next router after {statistics.median(period) / 1e3:.2f}"
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--plan", required=True, help="JSON file: written when driving, read to summarise")
    p.add_argument("--trace", help="write a torch-profiler chrome trace of the replays here")
    p.add_argument("--summarize", metavar="TRACE",
                   help="a chrome trace (.json) or nsys stats cuda_gpu_trace CSV")  # fmt: skip
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.plan)
    else:
        drive(args.plan, args.trace)


if __name__ == "__main__":
    main()
