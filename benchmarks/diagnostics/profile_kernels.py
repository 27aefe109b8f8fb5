"""A few eager launches of the sparse kernels and their dense cuBLAS counterparts, for Nsight
Compute (run under `ncu`, see benchmarks/run_device.sh): duration, DRAM bytes, occupancy."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_kernels.py
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import K, exact_active, rand_w, sign_rows  # noqa: E402


def main():
    dt = torch.float16
    for d, f, s in [
        (4096, 11008, 0.9),
        (4096, 11008, 0.95),
        (2048, 8192, 0.95),
        (2048, 8192, 0.9),
        (4096, 11008, 0.5),
    ]:
        wt = rand_w(f, d, dt)
        wd = wt.t().contiguous()
        a = torch.randn(1, f, device="cuda").to(dt) * exact_active(f, s).to(dt)
        K.sparse_down(a, wt)  # compile
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(f"P1 {d}x{f} s={s}")
        K.sparse_down(a, wt)
        F.linear(a, wd)
        torch.cuda.nvtx.range_pop()
    d, f = 4096, 11008
    wg, wu, wdt = (rand_w(f, d, dt) for _ in range(3))
    x = torch.randn(1, d, device="cuda").to(dt)
    wg = sign_rows(wg, x[0], exact_active(f, 0.9))
    K.sparse_ffn(x, wg, wu, wdt)
    torch.cuda.synchronize()
    K.sparse_ffn(x, wg, wu, wdt)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
