"""Eager launches of the chunk path's kernels (gate GEMM, union, gathered up, gathered down) for
Nsight Compute, between cudaProfilerStart/Stop so that compilation and warm-up stay outside:

    ncu --profile-from-start off --metrics ... python3 benchmarks/profile_chunk.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_kernels import K, rand_w, solve_rows, union_mask  # noqa: E402


def main():
    dt = torch.float16
    d, f = 4096, 11008
    wu, wdt = rand_w(f, d, dt), rand_w(f, d, dt)
    cases = []
    for t, cls in [(8, 0.5), (8, 0.8), (32, 0.5), (32, 0.8)]:
        x = torch.randn(t, d, device="cuda").to(dt)
        wg = solve_rows(x, union_mask(t, f, cls), dt)
        K.chunk_ffn(x, wg, wu, wdt)  # compile, workspaces
        cases.append((t, cls, x, wg))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for t, cls, x, wg in cases:
        torch.cuda.nvtx.range_push(f"T={t} CLS={cls}")
        K.chunk_ffn(x, wg, wu, wdt)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
