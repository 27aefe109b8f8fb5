"""One-pass fused reduction of an FFN activation tile for the default probes (CUDA + Triton).

For a [N, d_ff] activation `a` (and, for rules on act(gate), `g`), one kernel reads each element
once and updates, per neuron, the active count under an elementwise rule
(|src_i| * scale_i > threshold), the nonzero count, sum |a| (float64), max |a|, and, per layer,
the valid-token count, the non-finite count and the DDSketch histogram of |a|. That is what keeps
the capture's cost near one extra read of the activations (the P6 goal); the torch path in
probes.py does the same in ~10 passes and is the reference this kernel is tested against.

Everything is shape-static and asynchronous: padding is a mask, padded positions go to a dropped
histogram bin, accumulators are updated with atomics; nothing is read back to the host.
"""

from __future__ import annotations

import math

import torch

from workbench.adapters.base import GATED, FFNSite

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # CPU-only installs without the gpu/dev extra
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON


if _HAVE_TRITON:

    @triton.jit
    def _stats_kernel(
        a_ptr, g_ptr, valid_ptr, scale_ptr,
        active_ptr, nonzero_ptr, sum_ptr, max_bits_ptr, hist_ptr, tokens_ptr, nonfinite_ptr,
        N, D, stride_a, stride_g, threshold, inv_log_gamma, bucket_offset,
        TOKENS_PER_PROG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        N_BUCKETS: tl.constexpr, HIST_BINS: tl.constexpr,
        HAS_G: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SCALE: tl.constexpr, DO_HIST: tl.constexpr,
        SUM64: tl.constexpr = True,
    ):
        pid_d = tl.program_id(0)
        pid_t = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if HAS_SCALE:
            scale = tl.load(scale_ptr + offs_d, mask=d_ok, other=0.0)
        # elementwise accumulators, reduced across tokens once at the end (no per-tile reductions)
        cnt = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
        nz = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
        bad = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
        if SUM64:
            ssum = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
        else:
            ssum = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        smax = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        ntok = tl.zeros([BLOCK_T], dtype=tl.int32)
        if DO_HIST:
            hacc = tl.zeros([HIST_BINS], dtype=tl.int32)
        t_start = pid_t * TOKENS_PER_PROG
        for t0 in range(t_start, t_start + TOKENS_PER_PROG, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < N
            if HAS_VALID:
                t_ok = t_ok & (tl.load(valid_ptr + offs_t, mask=offs_t < N, other=0) != 0)
            ntok += t_ok.to(tl.int32)
            m2 = t_ok[:, None] & d_ok[None, :]
            x = tl.load(a_ptr + offs_t[:, None] * stride_a + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
            ax = tl.abs(x)
            if HAS_G:
                src = tl.abs(tl.load(g_ptr + offs_t[:, None] * stride_g + offs_d[None, :], mask=m2,
                                     other=0.0).to(tl.float32))
            else:
                src = ax
            if HAS_SCALE:
                src = src * scale[None, :]
            cnt += ((src > threshold) & m2).to(tl.int32)
            nz += ((x != 0.0) & m2).to(tl.int32)
            finite = ax < float("inf")  # false for inf and NaN
            bad += ((~finite) & m2).to(tl.int32)
            axf = tl.where(finite, ax, 0.0)
            if SUM64:
                ssum += axf.to(tl.float64)
            else:
                ssum += axf
            smax = tl.maximum(smax, axf)
            if DO_HIST:
                lg = tl.log(tl.maximum(ax, 1e-30)) * inv_log_gamma
                idx = tl.ceil(lg).to(tl.int32) - bucket_offset + 1
                idx = tl.minimum(tl.maximum(idx, 1), N_BUCKETS - 1)
                idx = tl.where(ax > 0.0, idx, 0)
                idx = tl.where(m2, idx, N_BUCKETS)  # padding -> a bin that is dropped
                hacc += tl.histogram(tl.reshape(idx, [BLOCK_T * BLOCK_D]), HIST_BINS)
        cnt = tl.sum(cnt, axis=0)
        nz = tl.sum(nz, axis=0)
        ssum = tl.sum(ssum, axis=0)
        smax = tl.max(smax, axis=0)
        bad = tl.sum(bad, axis=0)
        if DO_HIST:
            # one flush per program, only for the buckets it saw
            bins = tl.arange(0, HIST_BINS)
            tl.atomic_add(hist_ptr + bins, hacc.to(tl.int64), mask=(bins < N_BUCKETS) & (hacc > 0))
        tl.atomic_add(active_ptr + offs_d, cnt.to(tl.int64), mask=d_ok)
        tl.atomic_add(nonzero_ptr + offs_d, nz.to(tl.int64), mask=d_ok)
        tl.atomic_add(sum_ptr + offs_d, ssum.to(tl.float64), mask=d_ok)
        # non-negative float64 values order like their int64 bit patterns
        tl.atomic_max(max_bits_ptr + offs_d, smax.to(tl.float64).to(tl.int64, bitcast=True), mask=d_ok)
        bad_total = tl.sum(bad, axis=0)
        tl.atomic_add(nonfinite_ptr, bad_total.to(tl.int64))
        if pid_d == 0:
            tl.atomic_add(tokens_ptr, tl.sum(ntok, axis=0).to(tl.int64))


def update(site: FFNSite, batch, ctx, stats, sketch, *, block_t: int = 16, block_d: int = 128,
           tokens_per_prog: int | None = None, num_warps: int = 4, sum64: bool = True,
           do_hist: bool = True) -> None:
    """Update NeuronStats (and AbsSketch, if given) for one FFN call in one kernel launch."""
    a, valid = batch.a, batch.valid
    rule = ctx.rule
    src, thr = rule.elementwise(site.layer, site.kind == GATED)
    g = batch.g if src == "g" else None
    scale = ctx.norms(site, a.device) if rule.needs_down_norms() else None
    st = stats.state.get(site.name)
    if st is None:
        st = stats.state[site.name] = stats._init(site, a.device)
    hist = None
    if sketch is not None:
        sst = sketch.state.get(site.name)
        if sst is None:
            sst = sketch.state[site.name] = {
                "hist": torch.zeros(sketch.spec.n_buckets, dtype=torch.int64, device=a.device)}
        hist = sst["hist"]
        spec = sketch.spec
    a = a if a.stride(-1) == 1 else a.contiguous()
    if g is not None and g.stride(-1) != 1:
        g = g.contiguous()
    n, d = a.shape
    if tokens_per_prog is None:
        # enough programs to fill the GPU, few enough that the per-program atomics stay cheap
        n_d = triton.cdiv(d, block_d)
        want_t = max(1, (2 * 132 + n_d - 1) // n_d)
        tokens_per_prog = max(block_t, triton.cdiv(triton.cdiv(n, want_t), block_t) * block_t)
    grid = (triton.cdiv(d, block_d), triton.cdiv(max(n, 1), tokens_per_prog))
    if scale is not None:
        scale = scale.float()
    dummy = st["active"]
    n_buckets = spec.n_buckets if hist is not None else 2
    _stats_kernel[grid](
        a, g if g is not None else a, valid if valid is not None else dummy, scale if scale is not None else dummy,
        st["active"], st["nonzero"], st["abs_sum"], st["abs_max"].view(torch.int64),
        hist if hist is not None else dummy, st["tokens"], st["nonfinite"],
        n, d, a.stride(0), g.stride(0) if g is not None else 0, float(thr) if math.isfinite(thr) else 3.0e38,
        1.0 / spec.log_gamma if hist is not None else 1.0, spec.offset if hist is not None else 0,
        TOKENS_PER_PROG=tokens_per_prog, BLOCK_T=block_t, BLOCK_D=block_d, N_BUCKETS=n_buckets,
        HIST_BINS=triton.next_power_of_2(n_buckets + 1), HAS_G=g is not None, HAS_VALID=valid is not None,
        HAS_SCALE=scale is not None, DO_HIST=hist is not None and do_hist, SUM64=sum64, num_warps=num_warps,
    )
