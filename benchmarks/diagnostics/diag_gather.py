"""Floor of a random-row gather on the GPU (the access pattern of every sparse kernel here): read
`na` rows of W [11008, 4096] fp16 (8 KB each) given as a device index list, sum them per program
into one fp32 (no ranking, no atomics, 4 bytes stored per program), for several tile shapes, with the rows random or contiguous,
rotated over 10 weight copies (DRAM) or from one copy (L2-resident after the first replay).

    PYTHONPATH=$PWD python3 benchmarks/diagnostics/diag_gather.py [--sparsities 0.9,0.5] [--d-ff 11008]
        [--random-only] [--dense]

--dense also times cuBLAS's dense GEMV on the same rotated weights (batch 1, F.linear), so that
each gather line gives the highest speedup any kernel that reads those rows could reach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_kernels.py
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bench_kernels import bench, log, rand_w, rotating  # noqa: E402


@triton.jit
def _gather(IDX, W, OUT, stride_w, N, R: tl.constexpr, BN: tl.constexpr, EVICT: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = tl.load(IDX + pid_r * R + tl.arange(0, R))
    offs_n = pid_n * BN + tl.arange(0, BN)
    ptrs = W + rows[:, None] * stride_w + offs_n[None, :]
    if EVICT:
        w = tl.load(ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs)
    # one float per program, so that stores do not add bytes to the reads being measured
    tl.store(OUT + pid_r * tl.num_programs(1) + pid_n, tl.sum(tl.sum(w.to(tl.float32), axis=1)))


CFGS = [  # (R, BN, warps, evict)
    (1, 4096, 4, 0),
    (2, 4096, 4, 0),
    (4, 4096, 4, 0),
    (4, 4096, 8, 0),
    (1, 2048, 4, 0),
    (2, 2048, 4, 0),
    (4, 2048, 4, 0),
    (1, 1024, 4, 0),
    (2, 1024, 4, 0),
    (4, 1024, 4, 0),
    (8, 1024, 4, 0),
    (2, 1024, 2, 0),
    (4, 512, 2, 0),
    (8, 512, 4, 0),
    (16, 512, 4, 0),
    (16, 256, 4, 0),
    (32, 256, 4, 0),
    (2, 1024, 4, 1),
    (4, 1024, 4, 1),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sparsities", default="0.9,0.5")
    p.add_argument("--d-ff", type=int, default=11008)
    p.add_argument("--random-only", action="store_true", help="random rows from DRAM only")
    p.add_argument("--dense", action="store_true", help="time cuBLAS's dense GEMV too")
    args = p.parse_args()
    k, n, nw, dt = args.d_ff, 4096, 10, torch.float16
    ws = [rand_w(k, n, dt) for _ in range(nw)]
    if args.dense:
        wd = [w.t().contiguous() for w in ws]  # [d_model, d_ff], as the dense layer stores it
        xs = [torch.randn(1, k, device="cuda").to(dt) for _ in ws]
        ms = bench(rotating(lambda x, w: torch.nn.functional.linear(x, w), list(zip(xs, wd))), 10)
        log(f"dense cuBLAS {n}x{k}: {ms * 1e3:.2f} us")
        del wd
    for s in (float(v) for v in args.sparsities.split(",")):
        na = int(round((1 - s) * k)) // 32 * 32
        rnd = [torch.randperm(k, device="cuda")[:na].sort().values.to(torch.int32) for _ in ws]
        con = [torch.arange(na, device="cuda", dtype=torch.int32) for _ in ws]
        mb = na * n * 2 / 1e6
        log(f"s={s}: {na} rows, {mb:.1f} MB ({mb / 2.5e6 * 1e6:.2f} us at 2.5 TB/s)")
        kinds = [("random", rnd, ws)]
        if not args.random_only:
            kinds += [("contig", con, ws), ("random-L2", rnd[:1], ws[:1])]
        for r, bn, warps, ev in CFGS:
            if na % r:
                continue
            out = torch.empty((na // r, n // bn), device="cuda")
            res = []
            for name, idx, wl in kinds:
                fn = rotating(
                    lambda i, w, r=r, bn=bn, warps=warps, ev=ev, out=out, na=na: _gather[
                        (na // r, n // bn)
                    ](i, w, out, w.stride(0), n, R=r, BN=bn, EVICT=ev, num_warps=warps),
                    list(zip(idx, wl)),
                )
                ms = bench(fn, 10)
                res.append(f"{name} {ms * 1e3:6.2f} us {mb / ms / 1e3:4.2f} TB/s")
            log(f"  R={r:2d} BN={bn:4d} warps={warps} evict={ev} "
                f"({na // r * (n // bn)} programs): " + " | ".join(res))  # fmt: skip


if __name__ == "__main__":
    main()
