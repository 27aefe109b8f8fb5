"""Eager launches of the one-launch up+down kernel (P2 exact, P3 predicted; 4096x11008, s = 0.9,
one token) and of the MoE expert kernels (T = 8, CLS 0.8), for Nsight Compute:

    ncu --clock-control none -k 'regex:updown|expert' --section SpeedOfLight --section Occupancy \
        --section LaunchStats python3 benchmarks/profile_v7.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_kernels import K, exact_active, rand_w, sign_rows, solve_rows, union_mask  # noqa: E402


def main():
    dt = torch.float16
    d, f = 4096, 11008
    wg, wu, wdt = (rand_w(f, d, dt) for _ in range(3))
    x = torch.randn(1, d, device="cuda").to(dt)
    wg = sign_rows(wg, x[0], exact_active(f, 0.9))
    w1 = rand_w(1024, d, dt)
    w2 = sign_rows(rand_w(f, 1024, dt), torch.relu(torch.nn.functional.linear(x, w1))[0],
                   exact_active(f, 0.9))
    for _ in range(2):  # compile, then the profiled launch
        K.sparse_ffn(x, wg, wu, wdt)
        K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2)
    t, e = 8, f // 256
    xt = torch.randn(t, d, device="cuda").to(dt)
    wr = solve_rows(xt, union_mask(t, e, 0.8), dt)
    nw = (torch.rand(e, device="cuda") + 0.5).to(dt)
    for _ in range(2):
        K.moe_blocks(xt, wr, nw, wu, wdt)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
