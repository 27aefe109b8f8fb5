"""Where the time goes: each stage of the P2/P3/P4 layers timed alone (graph replays, rotated
weights as in bench_kernels.py), and one eager launch of each for Nsight Compute.

    python3 benchmarks/diagnostics/diag_kernels.py            # stage timings
    ncu ... python3 benchmarks/diagnostics/diag_kernels.py --ncu   # one launch per stage
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_kernels.py
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import (  # noqa: E402
    K,
    bench,
    exact_active,
    rand_w,
    rotating,
    sign_rows,
    solve_rows,
    union_mask,
)
from workbench.kernels.sparse_ffn.triton import fused_gate_up, launch_rows  # noqa: E402


def stage_times(name, stages, sets, ncu):
    out = []
    for sname, fn in stages:
        if ncu:
            fn(*sets[0])
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(f"{name}:{sname}")
            fn(*sets[0])
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            continue
        t = bench(rotating(fn, sets), 10)
        out.append(f"{sname} {t * 1e3:.2f} us")
    if not ncu:
        print(f"{name}: " + ", ".join(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true")
    args = ap.parse_args()
    dt = torch.float16
    d, f, nw = 4096, 11008, 3
    wu = [rand_w(f, d, dt) for _ in range(nw)]
    wdt = [rand_w(f, d, dt) for _ in range(nw)]
    # P2, T = 1, s = 0.9
    xs = [torch.randn(1, d, device="cuda").to(dt) for _ in range(nw)]
    wg = [sign_rows(rand_w(f, d, dt), xs[i][0], exact_active(f, 0.9)) for i in range(nw)]
    gates = [F.linear(xs[i], wg[i]) for i in range(nw)]
    acts = [K.gated_up(xs[i], gates[i], wu[i]) for i in range(nw)]
    stage_times(
        "P2 T=1 s=0.9",
        [
            ("gate cuBLAS", lambda x, g, u, dd, gt, a: F.linear(x, g)),
            ("up rows kernel", lambda x, g, u, dd, gt, a: K.gated_up(x, gt, u)),
            ("fused gate+up kernel", lambda x, g, u, dd, gt, a: fused_gate_up(x, g, u)),
            ("down kernel", lambda x, g, u, dd, gt, a: K.sparse_down(a, dd)),
            ("whole", lambda x, g, u, dd, gt, a: K.sparse_ffn(x, g, u, dd)),
        ],
        list(zip(xs, wg, wu, wdt, gates, acts)),
        args.ncu,
    )
    # P3, T = 1, s = 0.9, width 1024
    w1 = [rand_w(1024, d, dt) for _ in range(nw)]
    hs = [torch.relu(F.linear(xs[i], w1[i]))[0] for i in range(nw)]
    w2 = [sign_rows(rand_w(f, 1024, dt), hs[i], exact_active(f, 0.9)) for i in range(nw)]
    lgs = [K.predictor_logits(xs[i], w1[i], w2[i]) for i in range(nw)]
    stage_times(
        "P3 T=1 s=0.9",
        [
            ("predictor (2 cuBLAS + relu)", lambda x, g, u, p, q, lg: K.predictor_logits(x, p, q)),
            ("gate+up rows kernel", lambda x, g, u, p, q, lg: K.gate_up_predicted(x, lg, g, u)),
        ],
        list(zip(xs, wg, wu, w1, w2, lgs)),
        args.ncu,
    )
    # P4 exact, T = 32, CLS = 0.5 and T = 8
    for t in (8, 32):
        xt = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        wgt = [solve_rows(xt[i], union_mask(t, f, 0.5), dt) for i in range(nw)]
        gt = [F.linear(xt[i], wgt[i]) for i in range(nw)]
        at = [K.gated_up(xt[i], gt[i], wu[i]) for i in range(nw)]
        stage_times(
            f"P4 exact T={t} CLS=0.5",
            [
                ("gate cuBLAS", lambda x, g, u, dd, gg, a: F.linear(x, g)),
                ("up rows kernel", lambda x, g, u, dd, gg, a: K.gated_up(x, gg, u)),
                (
                    "up rows single-slice",
                    lambda x, g, u, dd, gg, a: K.gated_up(
                        x, gg, u, config={"DS": 4096, "BR": 32, "BK": 32, "BD": 128}
                    ),
                ),
                ("down kernel", lambda x, g, u, dd, gg, a: K.sparse_down(a, dd)),
                (
                    "down kernel CHUNK=2048",
                    lambda x, g, u, dd, gg, a: K.sparse_down(
                        a, dd, config={"CHUNK": 2048, "BN": 256, "BK": 32, "num_warps": 8}
                    ),
                ),
                (
                    "down dense-read (dense_fraction=0.01)",
                    lambda x, g, u, dd, gg, a: K.sparse_down(
                        a, dd, config={"dense_fraction": 0.01}
                    ),
                ),
                ("cuBLAS down GEMM (reference)", lambda x, g, u, dd, gg, a: a @ dd),
            ],
            list(zip(xt, wgt, wu, wdt, gt, at)),
            args.ncu,
        )
    # P4 MoE, T = 8, CLS = 0.8
    t, e = 8, f // 256
    xt = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
    wr = [solve_rows(xt[i], union_mask(t, e, 0.8), dt) for i in range(nw)]
    nwt = [(torch.rand(e, device="cuda") + 0.5).to(dt) for _ in range(nw)]
    a0 = [F.linear(xt[i], wr[i]).contiguous() for i in range(nw)]
    am = [launch_rows(2, xt[i], a0[i], wu[i], norm_weight=nwt[i], d_e=256) for i in range(nw)]
    stage_times(
        "P4 moe T=8 CLS=0.8",
        [
            ("router cuBLAS", lambda x, r, n, u, dd, a0_, a: F.linear(x, r)),
            (
                "up rows kernel (mode 2)",
                lambda x, r, n, u, dd, a0_, a: launch_rows(2, x, a0_, u, norm_weight=n, d_e=256),
            ),
            ("down kernel", lambda x, r, n, u, dd, a0_, a: K.sparse_down(a, dd)),
            ("whole", lambda x, r, n, u, dd, a0_, a: K.moe_blocks(x, r, n, u, dd)),
        ],
        list(zip(xt, wr, nwt, wu, wdt, a0, am)),
        args.ncu,
    )


if __name__ == "__main__":
    main()
