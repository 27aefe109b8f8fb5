"""Programmatic dependent launch (PDL) A/B: the same kernels launched with and without
``launch_pdl`` (config {"pdl": True | False}), alternated in one run, graph replays with rotated
weights as in bench_kernels.py. P1 (sparse down, one token) and P4 exact (chunk path).

    python3 benchmarks/diag_pdl.py [--reps 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import (  # noqa: E402
    K,
    bench,
    dense_ffn,
    exact_active,
    n_copies,
    rand_w,
    rotating,
    solve_rows,
    union_mask,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--moe-only", action="store_true", help="only the P4 MoE A/B")
    args = ap.parse_args()
    if args.moe_only:
        return moe(args)
    dt = torch.float16
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    from workbench.kernels._common import use_pdl

    print("PDL available:", use_pdl(torch.device("cuda"), True), flush=True)
    for d, f in [(2048, 8192), (4096, 11008)]:
        nw = n_copies(0.05 * d * f * 2, l2)
        wt = [rand_w(f, d, dt) for _ in range(nw)]
        wd = [w.t().contiguous() for w in wt]
        for s in (0.5, 0.8, 0.9, 0.95):
            a = [torch.randn(1, f, device="cuda").to(dt) * exact_active(f, s).to(dt) for _ in range(nw)]
            base = bench(rotating(lambda a_, w_: F.linear(a_, w_), list(zip(a, wd))), 10)
            out = []
            for _ in range(args.reps):
                for p in (False, True):
                    ms = bench(rotating(lambda a_, w_, p=p: K.sparse_down(a_, w_, config={"pdl": p}),
                                        list(zip(a, wt))), 10)  # fmt: skip
                    out.append(f"{'pdl' if p else 'off'} {ms * 1e3:.2f}")
            y = K.sparse_down(a[0], wt[0], config={"pdl": True})
            err = ((y.float() - F.linear(a[0], wd[0]).float()).norm() / F.linear(a[0], wd[0]).float().norm()).item()
            print(f"P1 {d}x{f} s={s}: dense {base * 1e3:.2f} us | " + ", ".join(out)
                  + f" | rel err {err:.1e}", flush=True)  # fmt: skip
        del wt, wd
    d, f, nw = 4096, 11008, 3
    for t in (8, 32):
        wu = [rand_w(f, d, dt) for _ in range(nw)]
        wdt = [rand_w(f, d, dt) for _ in range(nw)]
        xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        for cls in (0.5, 0.8):
            wg = [solve_rows(xs[i], union_mask(t, f, cls), dt) for i in range(nw)]
            sets = list(zip(xs, wg, wu, wdt))
            out = []
            for _ in range(args.reps):
                for p in (False, True):
                    c = {"gather": {"pdl": p}}
                    ms = bench(rotating(lambda x, a, b, w, c=c: K.chunk_ffn(x, a, b, w, config=c), sets), 10)
                    out.append(f"{'pdl' if p else 'off'} {ms * 1e3:.2f}")
            y = K.chunk_ffn(xs[0], wg[0], wu[0], wdt[0], config={"gather": {"pdl": True}})
            ref = dense_ffn(xs[0], wg[0], wu[0], wdt[0].t().contiguous())
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"P4 exact T={t} CLS={cls}: " + ", ".join(out) + f" | rel err {err:.1e}", flush=True)


def moe(args):
    """P4 MoE blocks (43 experts x 256, d_model 4096), library defaults with and without PDL."""
    dt, d, f, d_e, nw = torch.float16, 4096, 11008, 256, 3
    e = f // d_e
    for t in (8, 32):
        wu = [rand_w(f, d, dt) for _ in range(nw)]
        wdt = [rand_w(f, d, dt) for _ in range(nw)]
        xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        nwt = [(torch.rand(e, device="cuda") + 0.5).to(dt) for _ in range(nw)]
        for cls in (0.5, 0.7, 0.8):
            wr = [solve_rows(xs[i], union_mask(t, e, cls), dt) for i in range(nw)]
            sets = list(zip(xs, wr, nwt, wu, wdt))
            out = []
            for _ in range(args.reps):
                for p in (False, True):
                    ms = bench(rotating(lambda x, r, n, u, w, p=p: K.moe_blocks(
                        x, r, n, u, w, config={"pdl": p}), sets), 10)  # fmt: skip
                    out.append(f"{'pdl' if p else 'off'} {ms * 1e3:.2f}")
            y = K.moe_blocks(xs[0], wr[0], nwt[0], wu[0], wdt[0], config={"pdl": True})
            ref = K.moe_blocks(xs[0], wr[0], nwt[0], wu[0], wdt[0], backend="torch")
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"P4 moe T={t} CLS={cls}: " + ", ".join(out) + f" | rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
