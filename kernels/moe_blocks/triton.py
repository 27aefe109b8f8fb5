"""ReLU-routed MoE blocks on the GPU, at expert granularity (BlockFFN / DECO layers).

Three launches, graph-capturable, no host synchronisation, no data-dependent shapes:

1. router logits A0 [T, E], a small Triton kernel (cuBLAS picked a slow path for [T, d_model] x
   [E, d_model]^T with an E like 43: 32 us on the H100 at T = 8, 7.2 us at T = 32): up to 16
   tokens one program per expert with the d_model loop unrolled (2.1 us at T = 8), above 16
   d_model split over 4 programs per expert through a split reduction (3.8 us at T = 32);
2. expert up kernel, grid (E x d_e / BF x KS): every program recomputes the router scores
   A = RMSNorm(ReLU(A0)) * w for all tokens (a [T, E] tile from L2), and a program whose expert
   has A = 0 on every token of the chunk exits before reading any weight. The others read BF rows
   of their expert's up block over a 1/KS slice of d_model, once for the whole chunk (tl.dot over
   the padded token axis). Up to 16 tokens (config "up_partials") each slice stores its fp32
   partial to its own plane and the kernel releases the down launch at its start; otherwise the
   partials go through atomics and the row block's last program writes h = SiLU(up x) * A;
3. expert down kernel, grid (d_model column blocks x S splits): every program ranks the active
   experts in registers (the same scores, so the same set as the up kernel), and walks the work
   items (active expert, RB-row block) i = split, split + S, ... reading only active experts' down
   rows, h from the up kernel (or made from its partial planes: summed, SiLU, scores). The scores
   and the first item's weight tile are read before the programmatic-dependent-launch wait (A0 is
   already complete then, see launch_expert_down). fp32 partials go through atomics into a zeroed
   workspace and a per-column-block ticket lets the last split cast the sum and re-zero the
   workspace.

Rounding follows the dense module (workbench.models.blockffn.BlockFFNMLP in the model dtype):
A0, the RMS-normalised scores, their product with the norm weight, the up projection, the SiLU
and h are each rounded to the model dtype where the module rounds them, so the kernel computes
the function the dense layer computes up to the order of the fp32 sums.

``config={"impl": "rows"}`` selects the earlier neuron-granular path (the row kernel of
sparse_ffn with in-kernel router scores, then the sparse down kernel), kept for comparison in
benchmarks/bench_kernels.py; its scores stay in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check_same_device, dot_f32, token_pad, use_pdl, workspace
from .._tl import dot_acc, pdl_release, pdl_wait, split_reduce
from .._tl import round_to as _rnd
from ..sparse_ffn.triton import launch_rows
from ..sparse_gemv.triton import sparse_down
from .reference import check_moe


@triton.jit
def _router_logits_kernel(
    X, WR, OUT, T, D, stride_x, stride_out, T_PAD: tl.constexpr, BD: tl.constexpr,
    PDL: tl.constexpr = False, D_UNROLL: tl.constexpr = 0,
):
    e = tl.program_id(0)
    pdl_wait(PDL)
    pdl_release(PDL)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    acc = tl.zeros([T_PAD, BD], dtype=tl.float32)
    if D_UNROLL > 0:  # d_model known at compile time: the loop unrolled, every load issued at once
        for d0 in tl.static_range(0, D_UNROLL, BD):
            acc = _router_step(X, WR, e, D, stride_x, d0, offs_t, t_ok, acc, BD)
    else:
        for d0 in range(0, D, BD):
            acc = _router_step(X, WR, e, D, stride_x, d0, offs_t, t_ok, acc, BD)
    tl.store(OUT + offs_t * stride_out + e, tl.sum(acc, axis=1), mask=t_ok)


@triton.jit
def _router_step(X, WR, e, D, stride_x, d0, offs_t, t_ok, acc, BD: tl.constexpr):
    offs_d = d0 + tl.arange(0, BD)
    d_ok = offs_d < D
    w = tl.load(WR + e * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    x = tl.load(
        X + offs_t[:, None] * stride_x + offs_d[None, :],
        mask=t_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    return acc + x * w[None, :]


@triton.jit
def _router_split_kernel(
    X, WR, OUT, WS, CNT, T, D, E, stride_x, stride_out, DK: tl.constexpr, KSR: tl.constexpr,
    T_PAD: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr = False,
):
    """Router logits with d_model split over KSR programs per expert (for chunks of many
    tokens): each program sums a DK-wide slice (unrolled), fp32 partials through split_reduce,
    the expert's last program stores the logit."""
    pid = tl.program_id(0)
    e = pid // KSR
    ks = pid % KSR
    pdl_wait(PDL)
    pdl_release(PDL)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    acc = tl.zeros([T_PAD, BD], dtype=tl.float32)
    for d0 in tl.static_range(0, DK, BD):
        acc = _router_step(X, WR, e, D, stride_x, ks * DK + d0, offs_t, t_ok, acc, BD)
    last, total = split_reduce(WS + offs_t * E + e, t_ok, tl.sum(acc, axis=1), CNT + e, KSR, True)
    if last:
        tl.store(OUT + offs_t * stride_out + e, total, mask=t_ok)


def router_logits(x: torch.Tensor, w_router: torch.Tensor, pdl=None, config=None) -> torch.Tensor:
    """A0 [T, E] = x @ w_router^T in fp32; x [T, d_model], w_router [E, d_model] (contiguous).

    config: "router_unroll" (d_model a compile-time constant, the loop unrolled: up to 16
    tokens, 2.1 us against 2.6 at T = 8 on the H100; at T = 32 it spills), "router_bd"
    (the d_model tile), "router_warps", "router_split" (d_model split over that many programs
    per expert, partial sums through a split reduction)."""
    check_same_device(x=x, w_router=w_router)
    cfg = config or {}
    t, d = x.shape
    e = w_router.shape[0]
    if not w_router.is_contiguous():
        w_router = w_router.contiguous()
    t_pad = triton.next_power_of_2(t)
    out = torch.empty((t, e), dtype=torch.float32, device=x.device)
    bd = int(cfg.get("router_bd") or max(128, min(1024, 8192 // t_pad)))
    pdl = use_pdl(x.device, pdl)
    ksr = int(cfg.get("router_split", 1))
    if ksr > 1:  # d_model split over ksr programs per expert, fp32 partials through atomics
        bd = min(bd, triton.next_power_of_2(d))
        dk = triton.cdiv(triton.cdiv(d, ksr), bd) * bd
        ws, cnt = workspace(("router", t, e), x.device, [(t * e, torch.float32), (e, torch.int32)])
        _router_split_kernel[(e * ksr,)](
            x, w_router, out, ws, cnt, t, d, e, x.stride(0), out.stride(0), DK=dk, KSR=ksr,
            T_PAD=t_pad, BD=bd, PDL=pdl, num_warps=int(cfg.get("router_warps", 4)),
            **({"launch_pdl": True} if pdl else {}),
        )  # fmt: skip
        return out
    _router_logits_kernel[(e,)](
        x,
        w_router,
        out,
        t,
        d,
        x.stride(0),
        out.stride(0),
        T_PAD=t_pad,
        BD=min(bd, triton.next_power_of_2(d)),
        PDL=pdl,
        D_UNROLL=d if cfg.get("router_unroll") else 0,
        num_warps=int(cfg.get("router_warps", 4)),
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


@triton.jit
def _expert_scores(A0, NW, T, E, eps, offs_t, t_ok, offs_e, e_ok, DT: tl.constexpr):
    """A [T_PAD, E_PAD] fp32 = RMSNorm(ReLU(A0)) * w, rounded like the module (0 off the grid)."""
    m = t_ok[:, None] & e_ok[None, :]
    a0 = tl.load(A0 + offs_t[:, None] * E + offs_e[None, :], mask=m, other=0.0).to(tl.float32)
    a1 = tl.maximum(_rnd(a0, DT), 0.0)
    var = tl.sum(a1 * a1, axis=1) / E
    nrm = _rnd(a1 * (1.0 / tl.sqrt(var + eps))[:, None], DT)
    nw = tl.load(NW + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    s = _rnd(nrm * nw[None, :], DT)
    return tl.where(m, s, 0.0)


@triton.jit
def _h_from_up(up, s_e, DT: tl.constexpr):
    """h = SiLU(up) * score in DT, from the fp32 up sums [T_PAD, rows] and the scores [T_PAD],
    rounded where the module rounds (up, the SiLU, the product)."""
    u = _rnd(up, DT)
    h = _rnd(u / (1.0 + tl.exp(-u)), DT)
    return _rnd(h * s_e[:, None], DT).to(DT)


@triton.jit
def _expert_up_kernel(
    X,
    A0,
    NW,
    WU,
    H,
    UACC,
    TCNT,
    T,
    D,
    E,
    D_E,
    NF,
    DK,
    stride_x,
    stride_w,
    stride_h,
    eps,
    T_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
    KS: tl.constexpr,
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr = False,
    EARLY_REL: tl.constexpr = False,
    PARTIALS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    ks = pid % KS
    pdl_wait(PDL)
    if EARLY_REL:  # the down kernel may start now: its pre-wait part reads only A0 and weights
        pdl_release(PDL)
    tile = pid // KS  # (expert, row block); the KS programs of a tile are neighbours
    e = tile // NF
    f = tile % NF
    DT = X.dtype.element_ty
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    offs_e = tl.arange(0, E_PAD)
    s = _expert_scores(A0, NW, T, E, eps, offs_t, t_ok, offs_e, offs_e < E, DT)
    s_e = tl.sum(tl.where(offs_e[None, :] == e, s, 0.0), axis=1)  # [T_PAD]
    if tl.max((s_e != 0.0).to(tl.int32), axis=0) > 0:
        loc = f * BF + tl.arange(0, BF)
        r_ok = loc < D_E
        rows = e * D_E + loc
        acc = tl.zeros([T_PAD, BF], dtype=tl.float32)
        d_lo = ks * DK
        for d0 in range(d_lo, d_lo + DK, BD):
            offs_d = d0 + tl.arange(0, BD)
            d_ok = offs_d < D
            x = tl.load(
                X + offs_t[:, None] * stride_x + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                WU + rows[:, None] * stride_w + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = dot_acc(x, tl.trans(w), acc, DOT_F32)
        if not EARLY_REL:
            pdl_release(PDL)
        m2 = t_ok[:, None] & r_ok[None, :]
        hp = H + offs_t[:, None] * stride_h + rows[None, :]
        if PARTIALS:
            # each d_model slice stores its fp32 partial to its own plane of H (no atomics, no
            # ticket): the down kernel sums the KS planes and applies SiLU and the scores
            pp = H + ks * (T * E * D_E) + offs_t[:, None] * (E * D_E) + rows[None, :]
            tl.store(pp, acc, mask=m2)
        elif KS == 1:
            tl.store(hp, _h_from_up(acc, s_e, DT), mask=m2)
        else:
            # split over d_model: fp32 partials through atomics, the tile's last program finishes
            up = UACC + offs_t[:, None] * (E * D_E) + rows[None, :]
            last, total = split_reduce(up, m2, acc, TCNT + tile, KS, True)
            if last:
                tl.store(hp, _h_from_up(total, s_e, DT), mask=m2)


@triton.jit
def _h_tile(H, s, e, rows, r_ok, offs_t, t_ok, offs_e, T, E, D_E, stride_h, KS_P: tl.constexpr,
            DT: tl.constexpr):
    """The [T_PAD, RB] tile of h for `rows` of expert e: loaded (KS_P = 0), or made from the up
    kernel's KS_P fp32 partial planes (summed in order, then rounded, SiLU and scores as the
    module rounds them)."""
    m = t_ok[:, None] & r_ok[None, :]
    if KS_P == 0:
        return tl.load(H + offs_t[:, None] * stride_h + rows[None, :], mask=m, other=0.0)
    else:
        p = H + offs_t[:, None] * (E * D_E) + rows[None, :]
        u = tl.load(p, mask=m, other=0.0)
        for k in tl.static_range(1, KS_P):
            u += tl.load(p + k * (T * E * D_E), mask=m, other=0.0)
        s_e = tl.sum(tl.where(offs_e[None, :] == e, s, 0.0), axis=1)  # [T_PAD]
        return _h_from_up(u, s_e, DT)


@triton.jit
def _expert_down_kernel(
    H,
    A0,
    NW,
    WD,
    Y,
    ACC,
    CNT,
    T,
    N,
    E,
    D_E,
    NR,
    S,
    NUM_NB,
    stride_h,
    stride_w,
    stride_y,
    eps,
    T_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    RB: tl.constexpr,
    BN: tl.constexpr,
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
    KS_P: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    pid_n = pid % NUM_NB
    split = pid // NUM_NB
    if not PREFETCH:
        pdl_wait(PDL)
    # PREFETCH: the scores, the ranking and the first work item's weight tile come before the
    # wait. A0 is the router's output, two launches back: every program of the up kernel waits
    # for the router before it releases this launch, so A0 is complete and visible here; the
    # weights are constant. Only h, the up kernel's output, must wait.
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    offs_e = tl.arange(0, E_PAD)
    s = _expert_scores(A0, NW, T, E, eps, offs_t, t_ok, offs_e, offs_e < E, WD.dtype.element_ty)
    act = tl.max((s != 0.0).to(tl.int32), axis=0)  # [E_PAD]: active on some token
    cnt = tl.sum(act, axis=0)
    rank = tl.where(act > 0, tl.cumsum(act, axis=0) - 1, -1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    offs_r = tl.arange(0, RB)
    acc = tl.zeros([T_PAD, BN], dtype=tl.float32)
    start = split
    if PREFETCH:
        e0 = tl.sum(tl.where(rank == split // NR, offs_e, 0), axis=0)
        loc0 = (split % NR) * RB + offs_r
        rows0 = e0 * D_E + loc0
        r0_ok = loc0 < tl.where(split < cnt * NR, D_E, 0)  # no first item: nothing read
        w0 = tl.load(
            WD + rows0[:, None] * stride_w + offs_n[None, :],
            mask=r0_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        pdl_wait(PDL)
        h0 = _h_tile(H, s, e0, rows0, r0_ok, offs_t, t_ok, offs_e, T, E, D_E, stride_h, KS_P,
                     WD.dtype.element_ty)
        acc = dot_acc(h0, w0, acc, DOT_F32)
        start = split + S
    for i in range(start, cnt * NR, S):
        j = i // NR
        e = tl.sum(tl.where(rank == j, offs_e, 0), axis=0)
        loc = (i % NR) * RB + offs_r
        r_ok = loc < D_E
        rows = e * D_E + loc
        h = _h_tile(H, s, e, rows, r_ok, offs_t, t_ok, offs_e, T, E, D_E, stride_h, KS_P,
                    WD.dtype.element_ty)
        w = tl.load(
            WD + rows[:, None] * stride_w + offs_n[None, :],
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = dot_acc(h, w, acc, DOT_F32)
    pdl_release(PDL)
    ptrs = ACC + offs_t[:, None] * N + offs_n[None, :]
    pmask = t_ok[:, None] & n_ok[None, :]
    last, total = split_reduce(ptrs, pmask, acc, CNT + pid_n, S, split < cnt * NR)
    if last:
        out = _rnd(total, Y.dtype.element_ty).to(Y.dtype.element_ty)
        tl.store(Y + offs_t[:, None] * stride_y + offs_n[None, :], out, mask=pmask)


def default_expert_config(t: int, d_model: int, d_e: int) -> dict:
    """Block shapes by problem shape only (never by data, so the launch is graph-safe).

    H100 stage timings (benchmarks/diag_moe.py, 43 experts x 256, d_model 4096, CLS 0.8): wide
    up row blocks split over d_model (BF=64, KS=4) beat narrow unsplit ones at T = 8 and 32
    (12.5 vs 14.9-18.6 us, 14.4 vs 19.1-20.6 us). Up to 16 tokens (KERNEL_NOTES v16): the up
    kernel leaves fp32 partials that the down kernel finishes (no split reduction in up) and
    releases the down launch at once, the router loop is unrolled, and the down kernel takes
    512-wide column blocks over 32 splits: the layer 2.6x at CLS 0.7 instead of 2.3x. Above 16
    tokens the partials lose (the down kernel would rebuild T x RB tiles of h in every column
    block); there the router splits d_model over 4 programs per expert (3.8 us at T = 32 against
    cuBLAS's 7.2; the layer 38 us at CLS 0.7 instead of 41.5) and the down kernel keeps 8 splits
    (its atomics grow with T), now with 8 warps (0.5-0.8 us less at CLS 0.5 / 0.7 / 0.8)."""
    if t <= 16:
        return dict(BF=64, BD=256, KS=4, up_warps=4, up_stages=3, RB=64, BN=512, S=32,
                    down_warps=4, down_stages=2, up_partials=True, up_early_release=True,
                    router_unroll=True)
    return dict(BF=64, BD=256, KS=4, up_warps=4, up_stages=3, RB=64, BN=128, S=8, down_warps=8,
                down_stages=2, router_split=4)


def _expert_cfg(t, d, d_e, config):
    cfg = dict(default_expert_config(t, d, d_e))
    cfg.update({k: v for k, v in (config or {}).items() if k != "impl"})
    return cfg


def _partials(cfg) -> bool:
    """config "up_partials": with KS > 1 the up kernel leaves fp32 partials (no split reduction)
    and the down kernel finishes h from them."""
    return bool(cfg.get("up_partials", False)) and int(cfg["KS"]) > 1


def launch_expert_up(x2, a0, norm_weight, w_up, e, d_e, eps, config=None) -> torch.Tensor:
    """h [T, E*d_e] = SiLU(up x) * A for the active experts' rows (other rows left unwritten)."""
    t, d = x2.shape
    cfg = _expert_cfg(t, d, d_e, config)
    t_pad = max(16, token_pad(t))
    bf = min(cfg["BF"], max(16, triton.next_power_of_2(d_e)))
    nf = triton.cdiv(d_e, bf)
    bd = min(cfg["BD"], triton.next_power_of_2(d))
    ks = int(cfg["KS"])
    dk = triton.cdiv(triton.cdiv(d, ks), bd) * bd
    if ks > 1:
        uacc, tcnt = workspace(
            ("moe_up", t, e * d_e, e * nf), x2.device,
            [(t * e * d_e, torch.float32), (e * nf, torch.int32)],
        )  # fmt: skip
    else:
        uacc = tcnt = a0  # unused
    if _partials(cfg):  # fp32 partials, one plane per d_model slice (the down kernel sums them)
        h = torch.empty((ks, t, e * d_e), dtype=torch.float32, device=x2.device)
    else:
        h = torch.empty((t, e * d_e), dtype=x2.dtype, device=x2.device)
    pdl = use_pdl(x2.device, cfg.get("pdl"))
    _expert_up_kernel[(e * nf * ks,)](
        x2, a0, norm_weight, w_up, h, uacc, tcnt, t, d, e, d_e, nf, dk,
        x2.stride(0), w_up.stride(0), h.stride(0), float(eps),
        T_PAD=t_pad, E_PAD=max(2, triton.next_power_of_2(e)), BF=bf, BD=bd, KS=ks,
        DOT_F32=dot_f32(x2.dtype), PDL=pdl, EARLY_REL=bool(cfg.get("up_early_release", False)),
        PARTIALS=_partials(cfg),
        num_warps=cfg["up_warps"],
        num_stages=cfg["up_stages"], **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return h


def launch_expert_down(
    h, a0, norm_weight, w_down_t, e, d_e, eps, config=None, a0_ready=False
) -> torch.Tensor:
    """y [T, d_model] = h @ w_down_t over the active experts' rows only.

    a0_ready: True only when every program of the previous launch waited for A0's writer before
    releasing this one (launch_expert_up does); then, with config "down_prefetch" (default on),
    the scores and the first weight tile are read before the programmatic-dependent-launch wait.
    """
    t = h.shape[-2]
    n = w_down_t.shape[1]
    cfg = _expert_cfg(t, n, d_e, config)
    t_pad = max(16, token_pad(t))
    rb = min(cfg["RB"], max(16, triton.next_power_of_2(d_e)))
    nr = triton.cdiv(d_e, rb)
    bn = min(cfg["BN"], triton.next_power_of_2(n))
    num_nb = triton.cdiv(n, bn)
    splits = int(cfg["S"])
    acc, cnt = workspace(
        ("moe_down", t, n, num_nb), h.device, [(t * n, torch.float32), (num_nb, torch.int32)]
    )
    y = torch.empty((t, n), dtype=w_down_t.dtype, device=h.device)
    pdl = use_pdl(h.device, cfg.get("pdl"))
    _expert_down_kernel[(num_nb * splits,)](
        h, a0, norm_weight, w_down_t, y, acc, cnt, t, n, e, d_e, nr, splits, num_nb,
        h.stride(0), w_down_t.stride(0), y.stride(0), float(eps),
        T_PAD=t_pad, E_PAD=max(2, triton.next_power_of_2(e)), RB=rb, BN=bn,
        DOT_F32=dot_f32(w_down_t.dtype), PDL=pdl,
        PREFETCH=bool(a0_ready and cfg.get("down_prefetch", True)),
        KS_P=int(cfg["KS"]) if _partials(cfg) else 0, num_warps=cfg["down_warps"],
        num_stages=cfg["down_stages"], **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y


def _moe_experts(x2, a0, norm_weight, w_up, w_down_t, e, d_e, eps, config):
    if not norm_weight.is_contiguous():
        norm_weight = norm_weight.contiguous()
    h = launch_expert_up(x2, a0, norm_weight, w_up, e, d_e, eps, config)
    return launch_expert_down(h, a0, norm_weight, w_down_t, e, d_e, eps, config, a0_ready=True)


def moe_blocks(x, w_router, norm_weight, w_up, w_down_t, *, eps=1e-6, config=None):
    """x [T, d_model]; w_router [E, d_model]; norm_weight [E]; w_up, w_down_t [E*d_e, d_model].

    config: optional overrides of the expert kernels' defaults (default_expert_config): block
    shapes BF, BD, KS, up_warps, up_stages, RB, BN, S, down_warps, down_stages; "up_partials"
    (with KS > 1 the up kernel leaves fp32 partials that the down kernel sums, instead of a split
    reduction), "up_early_release" (the up kernel releases the down launch at its start),
    "down_prefetch" (the down kernel reads the scores and its first weight tile before waiting
    for the up kernel), the router's "router_unroll", "router_bd", "router_warps",
    "router_split" and "router_cublas" (see router_logits), "pdl" for programmatic dependent
    launch; or {"impl": "rows", "rows": {...}, "down": {...}} for the neuron-granular path.
    """
    x2, was_1d, w_up, w_down_t, e, d_e = check_moe(x, w_router, norm_weight, w_up, w_down_t)
    config = dict(config or {})
    impl = config.get("impl", "experts")
    if impl not in ("experts", "rows"):
        raise ValueError(f"config impl={impl!r}: use 'experts' (default) or 'rows'")
    if impl == "experts":
        rcfg = _expert_cfg(x2.shape[0], x2.shape[1], d_e, config)
    else:  # the neuron-granular path keeps its router: cuBLAS above 16 tokens
        rcfg = {"router_cublas": x2.shape[0] > 16 and x2.is_cuda}
    if rcfg.get("router_cublas"):
        # cuBLAS's router: 7.4 us at T = 32 on the H100, against 10.3 us for one program per
        # expert and ~4 us for the d_model split of the default; the kernels read A0 in either
        # dtype
        a0 = torch.nn.functional.linear(x2, w_router)
    else:
        a0 = router_logits(x2, w_router, pdl=config.get("pdl"), config=rcfg)
    if impl == "experts":
        y = _moe_experts(x2, a0, norm_weight, w_up, w_down_t, e, d_e, eps, config)
        return y[0] if was_1d else y
    a = launch_rows(
        2, x2, a0, w_up, norm_weight=norm_weight, d_e=d_e, eps=eps, config=config.get("rows")
    )
    down = None
    if x2.shape[0] > 1:  # MoE-specific down blocks for chunks (P4 sweeps on the H100)
        if x2.shape[0] <= 16:
            down = dict(CHUNK=256, BK=32, BN=128, num_warps=4)
        else:
            down = dict(CHUNK=256, BK=16, BN=512, num_warps=8)
    down = dict(down or {}, **(config.get("down") or {}))
    y = sparse_down(a, w_down_t, config=down or None)
    return y[0] if was_1d else y
