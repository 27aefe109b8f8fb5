"""Where an eager OPT decode step spends its host time, dense vs accelerated (per-call graphs on).

    PYTHONPATH=$PWD python3 benchmarks/diag_opt_step.py [--layers 32]

OPT-6.7B shape (bench_decode_plain: fc1 biases lowered for 90 % zeros), one token a step with a
DynamicCache: host time of one decoder layer's call and of one whole step (no synchronisation in
the timed loops, medians), then a torch.profiler table of one step's CPU time by operator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import workbench as wb  # noqa: E402
from benchmarks.bench_decode_plain import SHAPE, build, sparsify  # noqa: E402


def host_ms(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(ts)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(2)
    model = build(args.layers, "cuda")
    sparsify(model, torch.randint(0, SHAPE["vocab"], (1, 128), generator=gen).cuda(), 0.9)
    prompt = torch.randint(0, SHAPE["vocab"], (1, 16), generator=gen).cuda()
    tok = prompt[:, -1:]
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True)
    base = cache.get_seq_length()

    def step():
        model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache.crop(base)

    layer = model.model.decoder.layers[0]
    h0 = torch.randn(1, 1, SHAPE["hidden"], device="cuda", dtype=torch.bfloat16)

    def one_layer():
        layer(h0, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False)

    h = wb.accelerate(model, mode="exact", backend="triton").off()
    hd = wb.accelerate(model, mode="exact", backend="triton", call_graphs=False).off()
    x2 = h0.reshape(-1, SHAPE["hidden"])
    a = layer.activation_fn(layer.fc1(x2))
    # order: does a side's cost persist into the next one?
    for side in ("dense", "accel", "dense", "accel_direct", "dense", "accel", "dense"):
        h.off()
        hd.off()
        if side == "accel":
            h.on()
        elif side == "accel_direct":
            hd.on()
        parts = {"fc1 (whole FFN when on)": lambda: layer.fc1(x2), "act": lambda: layer.activation_fn(a), "fc2": lambda: layer.fc2(a),
                 "self_attn_layer_norm": lambda: layer.self_attn_layer_norm(h0)}
        print(f"{side:12s} one layer (no cache) host {host_ms(one_layer) * 1e3:7.1f} us, "
              f"one step host+wait {host_ms(step):7.2f} ms; parts (host us): "
              + ", ".join(f"{k} {host_ms(f) * 1e3:.1f}" for k, f in parts.items()))
    import cProfile
    import pstats

    h.on()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        one_layer()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(16)
    for side in ("dense", "accel"):
        (h.on if side == "accel" else h.off)()
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"--- {side}: CPU time of 3 steps by operator")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    h.off()


if __name__ == "__main__":
    main()
