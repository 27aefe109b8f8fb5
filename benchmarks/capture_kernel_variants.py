"""Time variants of the fused capture reduction on one [2048, 11008] bf16 activation (GPU).

Development aid for P6: which part of the one-pass reduction costs what (histogram, float64
sums, block shapes), against a plain read of the tensor.
"""

from __future__ import annotations

import functools
import statistics

import torch
import triton

from workbench.adapters import GATED, FFNSite
from workbench.capture import fused
from workbench.capture.probes import AbsSketch, Batch, NeuronStats, ProbeContext
from workbench.capture.rules import Rule
from workbench.capture.sketch import SketchSpec


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # us


def main():
    n, d = 2048, 11008
    a = (torch.relu(torch.randn(n, d, device="cuda")) * torch.randn(n, d, device="cuda")).to(
        torch.bfloat16
    )
    site = FFNSite(
        layer=0,
        name="x",
        kind=GATED,
        activation="relu",
        module=None,
        down=None,
        act=None,
        gate=None,
        up=None,
        d_ff=d,
        d_model=4096,
    )
    ctx = ProbeContext(rule=Rule(), down_norms={})
    valid = torch.ones(n, dtype=torch.bool, device="cuda")
    b = Batch(a=a, g=None, valid=valid)
    print(
        f"bytes {a.numel() * 2 / 1e6:.1f} MB; read floor at 3.0 TB/s = {a.numel() * 2 / 3.0e12 * 1e6:.1f} us"
    )
    print(f"plain amax read: {bench(lambda: a.amax()):.1f} us")
    print(
        f"torch bincount of int32 idx: {bench(lambda: torch.bincount(idx32, minlength=1615)) if (idx32 := (a.float().abs() * 100).int().clamp(0, 1614).reshape(-1)) is not None else 0:.1f} us"
    )
    rows = []
    configs = [
        (32, 64, 4, None),
        (32, 128, 8, None),
        (16, 128, 4, None),
        (64, 64, 8, None),
        (16, 64, 2, None),
    ]
    for bt, bd, nw, tpp in configs:
        for hist, s64 in ((False, True), (False, False), (True, True)):
            st, sk = NeuronStats(), AbsSketch()
            f = functools.partial(
                fused.update,
                site,
                b,
                ctx,
                st,
                sk,
                block_t=bt,
                block_d=bd,
                num_warps=nw,
                sum64=s64,
                do_hist=hist,
                tokens_per_prog=tpp,
            )
            us = bench(f)
            rows.append((bt, bd, nw, tpp, hist, s64, us))
            print(
                f"BLOCK_T={bt:3d} BLOCK_D={bd:3d} warps={nw} hist={hist!s:5} sum64={s64!s:5}: {us:8.1f} us",
                flush=True,
            )
    # cost of the sketch histogram against its resolution (alpha -> number of buckets)
    for alpha in (0.16, 0.08, 0.04, 0.02, 0.01):
        spec = SketchSpec(alpha=alpha, min_value=1e-6, max_value=1e4)
        for bt, bd, nw in ((32, 64, 4), (64, 64, 8)):
            st, sk = NeuronStats(), AbsSketch(spec)
            f = functools.partial(
                fused.update, site, b, ctx, st, sk, block_t=bt, block_d=bd, num_warps=nw
            )
            print(
                f"alpha={alpha} buckets={spec.n_buckets} BLOCK_T={bt} BLOCK_D={bd} warps={nw}: {bench(f):8.1f} us",
                flush=True,
            )
    best = min((r for r in rows if not r[4] and r[5]), key=lambda r: r[6])
    print(
        "best without hist, float64 sums:",
        best,
        "median all:",
        statistics.median(r[6] for r in rows),
    )


if __name__ == "__main__":
    main()
