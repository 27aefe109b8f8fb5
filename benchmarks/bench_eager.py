"""Eager decoding (no harness, no CUDA graph of the step) dense vs wb.accelerate, with the swapped
modules' per-call graphs on and off: what a notebook user sees from `model.generate`.

    PYTHONPATH=$PWD python3 benchmarks/bench_eager.py --out $OUT [--layers 32] [--new-tokens 32]

Models: the P5 7B-shape ReLU Llama (bench_decode.p5_setup: FATReLU thresholds at the 0.9 quantile,
exact mode) and the OPT-6.7B shape of bench_decode_plain (fc1 biases lowered for 90 % zeros).
Per model: greedy `model.generate` of `--new-tokens` tokens (min = max, no sampling), timed with a
synchronisation at each end, medians of `--reps`, dense / accelerated with call_graphs=True /
accelerated with call_graphs=False, in alternation in one process, each side switched on and then
generating twice (the first run after the switch captures the per-call graphs, the second is the
steady state); and measure()'s eager step times. Eager decoding of a 7B shape is bound by the host (Python and launch work), so these
figures depend on the machine's CPU as much as on the GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import workbench as wb  # noqa: E402


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def generate_s(model, prompt, new_tokens) -> tuple[float, list[int]]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out[0, prompt.shape[1]:].tolist()


def run_model(name, model, prompt, args) -> dict:
    sides = {"dense": None,
             "accel_call_graphs": wb.accelerate(model, mode="exact", backend="triton"),
             "accel_direct": None}
    sides["accel_call_graphs"].off()
    sides["accel_direct"] = wb.accelerate(model, mode="exact", backend="triton", call_graphs=False)
    sides["accel_direct"].off()
    # per side and rep: switched on, then two generates: the first after the switch (the per-call
    # graphs are captured in it: on() drops them, as the weights' storage changes with the layout),
    # the second with the handle left on (what a user decoding again and again sees)
    times: dict[str, list[float]] = {f"{s}_{k}": [] for s in sides for k in ("first", "steady")}
    tokens = {}
    for rep in range(args.reps + 1):  # rep 0: warm-up (kernels compiled)
        for side, h in sides.items():
            if h is not None:
                h.on()
            try:
                dt1, toks = generate_s(model, prompt, args.new_tokens)
                dt2, _ = generate_s(model, prompt, args.new_tokens)
            finally:
                if h is not None:
                    h.off()
            tokens.setdefault(side, toks)
            if rep:
                times[f"{side}_first"].append(dt1)
                times[f"{side}_steady"].append(dt2)
    med = {s: statistics.median(v) * 1e3 / args.new_tokens for s, v in times.items()}
    out = {"model": name, "new_tokens": args.new_tokens, "reps": args.reps, "ms_per_token": med,
           "speedup_call_graphs_steady": med["dense_steady"] / med["accel_call_graphs_steady"],
           "speedup_call_graphs_first": med["dense_first"] / med["accel_call_graphs_first"],
           "speedup_direct_steady": med["dense_steady"] / med["accel_direct_steady"],
           "tokens_match_call_graphs": tokens["accel_call_graphs"] == tokens["dense"],
           "tokens_match_direct": tokens["accel_direct"] == tokens["dense"],
           "runs_s": times}
    for key, cg in (("measure_call_graphs", True), ("measure_direct", False)):
        with wb.accelerate(model, mode="exact", backend="triton", call_graphs=cg) as h:
            m = h.measure(prompt, reps=10, warmup=3)
        out[key] = {k: m.summary[k] for k in ("step_dense_ms", "step_ms", "step_speedup", "logits_rel_rms")}
        out[key]["ffn_speedup_median"] = float(m.layers["speedup"].median())
    log(name, {k: v for k, v in out.items() if k != "runs_s"})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/wb_out"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["llama", "opt"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        gen = torch.Generator().manual_seed(2)
        if name == "llama":
            from benchmarks.bench_decode import p5_setup

            model, prompt, *_ = p5_setup(args.layers)
        else:
            from benchmarks.bench_decode_plain import SHAPE, build, sparsify

            model = build(args.layers, "cuda")
            sparsify(model, torch.randint(0, SHAPE["vocab"], (1, 128), generator=gen).cuda(), 0.9)
            prompt = torch.randint(0, SHAPE["vocab"], (1, 16), generator=gen).cuda()
        results.append(run_model(name, model, prompt, args))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    commit = os.environ.get("WB_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {"device": torch.cuda.get_device_name(), "date": _dt.date.today().isoformat(), "commit": commit,
           "command": "PYTHONPATH=$PWD python3 benchmarks/bench_eager.py " + " ".join(sys.argv[1:]),
           "torch": torch.__version__, "layers": args.layers, "results": results}
    (out / "eager.json").write_text(json.dumps(doc, indent=1) + "\n")
    log("wrote", out / "eager.json")


if __name__ == "__main__":
    main()
