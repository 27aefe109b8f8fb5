"""Chunk-union FFN for 2..64 tokens as three gathered kernels (the default of chunk_ffn).

The gate [T, d_ff] comes from a dense GEMM (cuBLAS); then, all on the device, no host sync:

1. ``_union_kernel``: every block of BR neurons takes the union over the chunk's tokens of
   "gate > threshold", reserves room in a global list with one atomic and writes its active
   neuron numbers there. The list (``idx``, fixed size d_ff) and its length (``cnt``) are the
   only outputs; blocks whose union holds more than ``dense_fraction`` of their rows list every
   row (dense fallback: those rows are read whole, in order).
2. ``_gather_up_kernel``: program p takes list entries p*BM .. p*BM+BM-1 (programs past the
   length exit at once) and computes u = x @ W_up[rows]^T over the whole d_model with tl.dot over
   the padded token axis, a loop that Triton software-pipelines (num_stages); when the list is
   short (fewer tiles than SMs) KS programs share a tile's d_model range and reduce through fp32
   atomics, so that more loads are in flight; then
   a = act(g) * u rounded as the dense FFN rounds (u to the model dtype, the product to the model
   dtype) into a compact [d_ff, T_PAD] buffer.
3. ``_gather_down_kernel``: grid (d_model column blocks) x S splits; split s walks list tiles
   s, s + S, ... and accumulates a_tile^T @ W_down_t[rows, cols] (pipelined), then the usual split
   reduction (fp32 atomics, a ticket, the last program casts and re-zeroes); with S = 1 the
   program stores its column block directly. The last program of the launch resets ``cnt``.

Each active row is read once per chunk, as a whole 8 KB row (d_model 4096, fp16) in the up
kernel and BN-wide slices in the down kernel; the work is split by active rows, not by neuron
blocks, so every program has the same amount of it. The list order depends on which block's
atomic lands first, so the down kernel's fp32 summation order (not the function) varies between
calls, as with any split-K reduction through atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._common import dense_count, dot_f32, token_pad, use_pdl, workspace
from .._tl import dot_acc, pdl_release, pdl_wait, round_to, split_reduce


@triton.jit
def _union_kernel(
    G,
    IDX,
    CNT,
    T,
    R,
    stride_g,
    threshold,
    T_PAD: tl.constexpr,
    BR: tl.constexpr,
    DENSE_CNT: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    pdl_wait(PDL)
    pdl_release(PDL)
    offs_r = pid * BR + tl.arange(0, BR)
    r_in = offs_r < R
    offs_t = tl.arange(0, T_PAD)
    m2 = (offs_t < T)[:, None] & r_in[None, :]
    g = tl.load(G + offs_t[:, None] * stride_g + offs_r[None, :], mask=m2, other=0.0)
    act = tl.max(((g.to(tl.float32) > threshold) & m2).to(tl.int32), axis=0)  # [BR]
    cnt = tl.sum(act, axis=0)
    if cnt > DENSE_CNT:  # dense fallback: list the whole block, in order
        act = r_in.to(tl.int32)
        cnt = tl.sum(act, axis=0)
    if cnt > 0:
        base = tl.atomic_add(CNT, cnt, sem="relaxed")
        pos = base + tl.cumsum(act, axis=0) - 1
        tl.store(IDX + pos, offs_r, mask=act > 0)


@triton.jit
def _gather_up_kernel(
    X,
    G,
    WU,
    IDX,
    CNT,
    AC,
    UACC,
    TCNT,
    T,
    D,
    K_PER,
    SPLIT_BELOW,
    stride_x,
    stride_g,
    threshold,
    KS: tl.constexpr,
    T_PAD: tl.constexpr,
    BM: tl.constexpr,
    BKD: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid // KS
    pid_k = pid % KS
    pdl_wait(PDL)
    n = tl.load(CNT)
    # split d_model over KS programs only for short lists (fewer tiles than SMs), decided here
    # on the device from the list length; otherwise the first program of a tile does it all
    ks = tl.where(n < SPLIT_BELOW, KS, 1)
    k_per = tl.where(ks > 1, K_PER, tl.cdiv(D, BKD) * BKD)
    if (pid_m * BM < n) & (pid_k < ks):
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < n
        rows = tl.load(IDX + offs_m, mask=m_ok, other=0)
        offs_t = tl.arange(0, T_PAD)
        t_ok = offs_t < T
        offs_k = tl.arange(0, BKD)
        w_ptr = WU + rows[:, None].to(tl.int64) * D + offs_k[None, :]
        x_ptr = X + offs_t[None, :] * stride_x + offs_k[:, None]
        acc = tl.zeros([BM, T_PAD], dtype=tl.float32)
        k0 = pid_k * k_per
        for k in range(k0, k0 + k_per, BKD):
            if EVEN_K:
                w = tl.load(w_ptr + k, mask=m_ok[:, None], other=0.0)
                xt = tl.load(x_ptr + k, mask=t_ok[None, :], other=0.0)
            else:
                k_ok = (k + offs_k) < D
                w = tl.load(w_ptr + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                xt = tl.load(x_ptr + k, mask=t_ok[None, :] & k_ok[:, None], other=0.0)
            acc = dot_acc(w, xt, acc, DOT_F32)
        pdl_release(PDL)
        mt = m_ok[:, None] & t_ok[None, :]
        last = pid_k == 0
        if KS > 1:
            if ks > 1:  # split over d_model: the tile's last program gets the sum
                last, acc = split_reduce(
                    UACC + offs_m[:, None] * T_PAD + offs_t[None, :], mt, acc, TCNT + pid_m, ks,
                    True,
                )  # fmt: skip
        if last:
            dt = AC.dtype.element_ty
            g = tl.load(G + offs_t[None, :] * stride_g + rows[:, None], mask=mt, other=0.0)
            g = g.to(tl.float32)
            # as the dense FFN: u in the model dtype, act(g) * u rounded by the store
            a = tl.where(g > threshold, g, 0.0) * round_to(acc, dt)
            tl.store(AC + offs_m[:, None] * T_PAD + offs_t[None, :], round_to(a, dt).to(dt), mask=mt)


@triton.jit
def _gather_down_kernel(
    AC,
    WD,
    IDX,
    CNT,
    Y,
    YACC,
    TICK,
    T,
    D,
    stride_y,
    S: tl.constexpr,
    T_PAD: tl.constexpr,
    BKR: tl.constexpr,
    BN: tl.constexpr,
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_nb = tl.num_programs(0)
    pdl_wait(PDL)
    n = tl.load(CNT)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < D
    offs_b = tl.arange(0, BKR)
    acc = tl.zeros([T_PAD, BN], dtype=tl.float32)
    for k in range(pid_s * BKR, n, S * BKR):
        offs = k + offs_b
        ok = offs < n
        rows = tl.load(IDX + offs, mask=ok, other=0)
        a = tl.load(AC + offs[None, :] * T_PAD + offs_t[:, None], mask=ok[None, :] & t_ok[:, None],
                    other=0.0)  # fmt: skip
        w = tl.load(
            WD + rows[:, None].to(tl.int64) * D + offs_n[None, :],
            mask=ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = dot_acc(a, w, acc, DOT_F32)
    pdl_release(PDL)
    dt = Y.dtype.element_ty
    ym = t_ok[:, None] & n_ok[None, :]
    yptr = offs_t[:, None] * stride_y + offs_n[None, :]
    if S == 1:
        tl.store(Y + yptr, round_to(acc, dt).to(dt), mask=ym)
    else:
        last, total = split_reduce(
            YACC + offs_t[:, None] * D + offs_n[None, :], ym, acc, TICK + pid_n, S, pid_s * BKR < n
        )
        if last:
            tl.store(Y + yptr, round_to(total, dt).to(dt), mask=ym)
    # the launch's last program resets the list length for the next call
    tl.debug_barrier()
    done = tl.atomic_add(TICK + num_nb, 1, sem="acq_rel")
    if done == num_nb * S - 1:
        tl.store(CNT, 0)
        tl.store(TICK + num_nb, 0)


@functools.cache
def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H100's count, so that CPU tests take the same decisions


def default_gather_config(t: int, r: int, d: int) -> dict:
    """Block shapes, from H100 sweeps at 4096x11008 for T = 8, 16, 32, 64 (benchmarks/
    KERNEL_NOTES.md, v9; benchmarks/diag_chunk.py): 32 listed rows a program in the up kernel,
    d_model split over KS = 2 programs when the list has fewer tiles than the GPU has SMs
    (split_below rows, decided on the device), 128-column blocks and 16 splits in the down
    kernel."""
    return dict(
        BR=256,
        BM=32,
        BKD=min(256, triton.next_power_of_2(d)),
        KS=2,
        split_below=None,
        up_warps=4,
        up_stages=4,
        BKR=32,
        BN=min(128, triton.next_power_of_2(d)),
        S=16,
        down_warps=4,
        down_stages=3,
        pdl=None,
    )


def gather_ffn(x2, gate, w_up, w_down_t, threshold, dense_fraction=0.6, config=None):
    """y [T, d_model] for x2 [T, d_model] (2..64 tokens) and the dense gate [T, d_ff]; inputs
    already checked by the public wrappers (sparse_ffn, chunk_ffn)."""
    t, d = x2.shape
    r = w_up.shape[0]
    cfg = dict(default_gather_config(t, r, d))
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown gather config keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(config or {})
    t_pad = token_pad(t)
    dev = x2.device
    num_nb = triton.cdiv(d, cfg["BN"])
    s = int(cfg["S"])
    ks = int(cfg["KS"])
    num_m = triton.cdiv(r, cfg["BM"])
    idx, cnt, tick, yacc, ac, uacc, tcnt = workspace(
        ("gather", t, r, d, num_nb, s > 1, ks > 1, cfg["BM"], x2.dtype),
        dev,
        [
            (r, torch.int32),
            (1, torch.int32),
            (num_nb + 1, torch.int32),
            (t * d if s > 1 else 1, torch.float32),
            (r * t_pad, x2.dtype),
            (r * t_pad if ks > 1 else 1, torch.float32),
            (num_m if ks > 1 else 1, torch.int32),
        ],
    )
    # d_model range of each of the KS programs of a tile, a multiple of BKD
    k_per = triton.cdiv(triton.cdiv(d, ks), cfg["BKD"]) * cfg["BKD"]
    split_below = cfg["split_below"]
    if split_below is None:  # list rows that fill one tile per SM
        split_below = _sm_count(dev) * cfg["BM"]
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    f32 = dot_f32(x2.dtype)
    pdl = use_pdl(dev, cfg["pdl"])
    lp = {"launch_pdl": True} if pdl else {}
    _union_kernel[(triton.cdiv(r, cfg["BR"]),)](
        gate, idx, cnt, t, r, gate.stride(0), float(threshold),
        T_PAD=t_pad, BR=cfg["BR"], DENSE_CNT=dense_count(cfg["BR"], dense_fraction), PDL=pdl,
        **lp,
    )  # fmt: skip
    _gather_up_kernel[(num_m * ks,)](
        x2, gate, w_up, idx, cnt, ac, uacc, tcnt, t, d, k_per, int(split_below), x2.stride(0),
        gate.stride(0),
        float(threshold), KS=ks, T_PAD=t_pad, BM=cfg["BM"], BKD=cfg["BKD"],
        EVEN_K=k_per * ks == d and d % cfg["BKD"] == 0, DOT_F32=f32, PDL=pdl,
        num_warps=cfg["up_warps"], num_stages=cfg["up_stages"], **lp,
    )  # fmt: skip
    y = torch.empty((t, d), dtype=x2.dtype, device=dev)
    _gather_down_kernel[(num_nb, s)](
        ac, w_down_t, idx, cnt, y, yacc, tick, t, d, y.stride(0),
        S=s, T_PAD=t_pad, BKR=cfg["BKR"], BN=cfg["BN"], DOT_F32=f32, PDL=pdl,
        num_warps=cfg["down_warps"], num_stages=cfg["down_stages"], **lp,
    )  # fmt: skip
    return y
