"""Does one P5 mode's run change the next one's timing in the same process (KERNEL_NOTES v19 item 3)?

    PYTHONPATH=$PWD python3 benchmarks/diag_p5_order.py [--layers 32] [--seq SEQ]

Builds bench_decode.py's P5 model once (7B shape, bf16, FATReLU at the 0.9 quantile, width-1024
predictors), then, inside one compiled_non_ffn block (as bench_decode.py --compile on), runs
decode_benchmark for each step of SEQ in order, e.g. "predictor,exact,predictor,empty:predictor":
a step "empty:MODE" calls torch.cuda.empty_cache() first (the caching allocator hands its free
blocks back, so the next allocations land afresh); "measure:MODE" runs the handle's eager
`measure` (16 tokens, as bench_decode.py does once per mode) before the decode; "perlayer:MODE"
runs bench_decode.py's per_layer_error (each FFN alone on 8 calibration tokens, one call each, as
bench_decode.py does for exact mode) before the decode. Prints ms a token per step, dense and
accelerated, and the allocator's reserved / allocated memory before each step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import torch  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.accel.decode import compiled_non_ffn  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", default="predictor,exact,predictor,empty:predictor,exact,empty:exact")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    model, prompt, _, preds, xs = bd.p5_setup(args.layers)
    gen = torch.Generator().manual_seed(3)  # measure's tokens
    with compiled_non_ffn(model):
        for step in args.seq.split(","):
            mode = step.split(":")[-1]
            if step.startswith("empty:"):
                torch.cuda.empty_cache()
            mem = (torch.cuda.memory_reserved() / 2**30, torch.cuda.memory_allocated() / 2**30)
            h = wb.accelerate(model, mode=mode, predictors=preds if mode == "predictor" else None)
            h.off()
            if step.startswith("measure:"):
                mids = torch.randint(0, bd.SHAPE["vocab"], (1, 16), generator=gen)
                with torch.compiler.set_stance("force_eager"):
                    h.measure(mids, reps=3, warmup=1)
            if step.startswith("perlayer:"):
                bd.log("per-layer FFN error:", bd.per_layer_error(model, h, xs))
            try:
                r = wb.decode_benchmark(model, prompt, new_tokens=args.new_tokens, handle=h, warmup=2,
                                        reps=3, compile_non_ffn=True)
            finally:
                h.off()
            s = r["summary"]
            bd.log(f"{step:>16s}: dense {s['ms_per_token_dense']:.3f} ms, accelerated "
                   f"{s['ms_per_token_accel']:.3f} ms, {s['speedup']:.3f}x (reserved {mem[0]:.1f} GiB, "
                   f"allocated {mem[1]:.1f} GiB before the step)")
            del h, r


if __name__ == "__main__":
    main()
