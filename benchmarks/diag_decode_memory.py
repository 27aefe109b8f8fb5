"""Does decode_benchmark leave device memory behind? (KERNEL_NOTES v19 item 5)

    PYTHONPATH=$PWD python3 benchmarks/diag_decode_memory.py [--layers 8] [--calls 4]

bench_decode.py's P5 model (7B shape, bf16, FATReLU at the 0.9 quantile); decode_benchmark called
`--calls` times without a handle and then with an exact-mode handle, with and without compiled
non-FFN modules; torch.cuda.memory_allocated() after each call, before and after gc.collect().
Before the fix of v19 item 5 every call added 32 MiB a decoder (a cuBLAS workspace for each new
warm-up stream); since then the figure stays where the first call left it.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import torch  # noqa: E402

import workbench as wb  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    model, prompt, *_ = bd.p5_setup(args.layers)
    mib = 2**20
    for compiled in (False, True):
        for handle in (False, True):
            for i in range(args.calls):
                h = wb.accelerate(model, mode="exact") if handle else None
                if h is not None:
                    h.off()
                wb.decode_benchmark(model, prompt, new_tokens=16, handle=h, warmup=1, reps=1,
                                    compile_non_ffn=compiled)
                del h
                a = torch.cuda.memory_allocated() / mib
                gc.collect()
                b = torch.cuda.memory_allocated() / mib
                bd.log(f"compiled={compiled} handle={handle} call {i}: allocated {a:.0f} MiB, after gc {b:.0f} MiB")


if __name__ == "__main__":
    main()
