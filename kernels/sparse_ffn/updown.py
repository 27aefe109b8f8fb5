"""One-launch sparse FFN rows for a single token: up (and, with a predictor, gate) rows, the
activation product and the down rows of each active neuron in the same program.

The two-launch path (row kernel -> `a` in global memory -> sparse down kernel) pays the launch
and the act -> rank -> weight-row chain twice (benchmarks/KERNEL_NOTES.md). Here each program
takes CHUNK neurons, ranks the active ones in registers, and for BK of them at a time reads the up
row (and gate row), the down row, all d_model wide: h = act(g) * (x . u) rounded as the dense
FFN rounds, then y += h * W_down^T row. fp32 partials of y go through atomics into a zeroed
workspace; a ticket lets the last program cast y and re-zero the workspace (graph-safe, no host
synchronisation). The default of `sparse_ffn` / `sparse_ffn_predicted` for one token with
d_model <= 4096; `config={"updown": {...}}` sets its blocks, a config naming "rows"/"down" selects
the two-launch path.

MODE 0 (exact): SRC is the dense gate pre-activation [d_ff] (cuBLAS), active = g > threshold.
MODE 1 (predicted): SRC is the predictor's logits [d_ff], active = logit > 0; the gate row is
read for the active neurons only.
MODE 2 (predicted, second predictor layer fused): SRC is the predictor's hidden vector [width];
each program first computes its chunk's logits from W2 (one launch and the logits' round trip
less than MODE 1 after a separate GEMV), then proceeds as MODE 1.
PLAIN (with MODE 1 or 2): a plain (non-gated) FFN, y = down(act(up(x) + b_up)) + b_down (OPT's
fc1 -> ReLU -> fc2): no gate rows; the up row's sum plus its bias is rounded to the model dtype
(as F.linear with a bias rounds), then the activation; the down bias is added in fp32 by the
program that casts y, before the one rounding (as `sparse_down`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import use_pdl, workspace
from .._tl import pdl_release, pdl_wait, split_reduce
from .._tl import round_to as _rnd


@triton.jit
def _updown_kernel(
    X,
    SRC,
    WG,
    WU,
    WD,
    Y,
    ACC,
    CNT,
    K,
    N,
    stride_w,
    thr,
    NUM_CHUNKS,
    W2,
    B2,
    WIDTH,
    stride_w2,
    MODE: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    EARLY_GATE: tl.constexpr,
    WP: tl.constexpr,
    HAS_B2: tl.constexpr,
    PDL: tl.constexpr = False,
    BU=None,
    BD=None,
    PLAIN: tl.constexpr = False,
    HAS_BU: tl.constexpr = False,
    HAS_BD: tl.constexpr = False,
):
    pid = tl.program_id(0)
    DT = X.dtype.element_ty
    offs_c = tl.arange(0, CHUNK)
    rows_c = pid * CHUNK + offs_c
    in_k = rows_c < K
    if MODE == 2:
        # the predictor's second layer for this chunk: logits = hidden . W2[rows] (+ b2), rounded
        # to the model dtype as F.linear rounds them; SRC is the hidden vector [WIDTH]
        offs_w = tl.arange(0, WP)
        w_ok = offs_w < WIDTH
        # weights only: with PDL this load overlaps the previous kernel (the predictor's first
        # layer), whose output `hid` is read after the wait
        w2 = tl.load(
            W2 + rows_c[:, None] * stride_w2 + offs_w[None, :],
            mask=in_k[:, None] & w_ok[None, :],
            other=0.0,
        )
        if HAS_B2:
            b2 = tl.load(B2 + rows_c, mask=in_k, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        hid = tl.load(SRC + offs_w, mask=w_ok, other=0.0).to(tl.float32)
        lg = tl.sum(w2.to(tl.float32) * hid[None, :], axis=1)
        if HAS_B2:
            lg += b2
        act = (_rnd(lg, DT) > 0.0) & in_k
    else:
        pdl_wait(PDL)
        src = tl.load(SRC + rows_c, mask=in_k, other=0.0).to(tl.float32)
        if MODE == 0:
            act = (src > thr) & in_k
        else:
            act = (src > 0.0) & in_k
    acti = act.to(tl.int32)
    cnt = tl.sum(acti, axis=0)
    pos = tl.where(act, tl.cumsum(acti, axis=0) - 1, -1)
    offs_n = tl.arange(0, BN)
    n_ok = offs_n < N
    x = tl.load(X + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    yacc = tl.zeros([BN], dtype=tl.float32)
    offs_b = tl.arange(0, BK)
    for i in range(0, cnt, BK):
        j = i + offs_b
        r_ok = j < cnt
        local = tl.sum(tl.where(pos[None, :] == j[:, None], offs_c[None, :], 0), axis=1)
        rows = pid * CHUNK + local
        m = r_ok[:, None] & n_ok[None, :]
        wu = tl.load(WU + rows[:, None] * stride_w + offs_n[None, :], mask=m, other=0.0)
        if PLAIN:  # a = act(round(x . up row + b_up)); no gate
            if HAS_BU:
                bu = tl.load(BU + rows, mask=r_ok, other=0.0).to(tl.float32)
            wd = tl.load(WD + rows[:, None] * stride_w + offs_n[None, :], mask=m, other=0.0)
            u = tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
            if HAS_BU:
                u += bu
            u = _rnd(u, DT)
            a = tl.where(u > thr, u, 0.0)
        else:
            # EARLY_GATE: the gate (its values in MODE 0, its row tile in MODE 1) is loaded before
            # the up reduction, so that all loads of an iteration are in flight at once
            if EARLY_GATE:
                if MODE == 0:
                    g = tl.load(SRC + rows, mask=r_ok, other=0.0).to(tl.float32)
                else:
                    wg = tl.load(WG + rows[:, None] * stride_w + offs_n[None, :], mask=m, other=0.0)
            wd = tl.load(WD + rows[:, None] * stride_w + offs_n[None, :], mask=m, other=0.0)
            u = _rnd(tl.sum(wu.to(tl.float32) * x[None, :], axis=1), DT)
            if MODE == 0:
                if not EARLY_GATE:
                    g = tl.load(SRC + rows, mask=r_ok, other=0.0).to(tl.float32)
                a = _rnd(_rnd(tl.where(g > thr, g, 0.0), DT) * u, DT)
            else:
                if not EARLY_GATE:  # after the up reduction: one more serial round trip
                    wg = tl.load(WG + rows[:, None] * stride_w + offs_n[None, :], mask=m, other=0.0)
                g = _rnd(tl.sum(wg.to(tl.float32) * x[None, :], axis=1), DT)
                a = _rnd(tl.where(g > thr, g, 0.0) * u, DT)
        a = tl.where(r_ok, a, 0.0)
        yacc += tl.sum(a[:, None] * wd.to(tl.float32), axis=0)
    pdl_release(PDL)
    last, total = split_reduce(ACC + offs_n, n_ok, yacc, CNT, NUM_CHUNKS, cnt > 0)
    if last:
        if HAS_BD:
            total += tl.load(BD + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, _rnd(total, DT).to(DT), mask=n_ok)


# H100 sweeps at s = 0.9 (KERNEL_NOTES v7, v8): exact mode wants many small programs (CHUNK 32: 344
# programs, not 172 over 132 SMs) with 4 warps; loading its gate values early does not help. The
# predicted mode reads three row tiles: with all three in flight at once (early_gate) and two
# rows a pass over 8 warps it takes 19.2-19.8 us instead of 23.6 (v8, benchmarks/diag_updown.py).
# With the predictor's second layer fused (MODE 2) CHUNK 16 wins: fp16, the whole P3 layer
# 31.3-31.8 us at s = 0.9 against 32.8-33.6 with MODE 1 after a separate GEMV, 8 warps; bf16 (with
# the predictor biases) wants 4 warps: 35.1 us against 36.5 with 8 and 35.8 for MODE 1
# (diag_updown.py --p3 [--bf16 --bias])
DEFAULT_UPDOWN = {
    0: dict(CHUNK=32, BK=4, num_warps=4, num_stages=1, early_gate=False),
    1: dict(CHUNK=32, BK=2, num_warps=8, num_stages=1, early_gate=True),
    2: dict(CHUNK=16, BK=2, num_warps=8, num_stages=1, early_gate=True),
}
# overrides of the above for bfloat16: MODE 2 with CHUNK 32 and 8 warps (v21): P3 layer with the
# predictor biases 31.1 / 40.3 / 69.0 us at s = 0.9 / 0.8 / 0.5 against CHUNK 16 with 4 warps
# 33.1-33.4 / 41.4-41.5 / 67.2; P5 predictor decode (compiled) 3.939-3.944 against 3.991-3.998 ms
# a token in two alternated pairs (benchmarks/ab_decode_updown_blocks.py, KERNEL_NOTES v21)
DEFAULT_UPDOWN_BF16 = {2: dict(CHUNK=32, num_warps=8)}
# plain FFNs (OPT), predicted: two row tiles an iteration (up, down) instead of three, so more rows
# a pass pay. H100 sweep, OPT-6.7B FFN (4096x16384, bf16, biases, width-1024 predictor, 90 %
# predicted off; diag_plain_predictor.py --sweep, KERNEL_NOTES v21): MODE 2 CHUNK 32 / BK 4 / 8
# warps 33.8 us for the whole FFN with the predictor, CHUNK 16 / BK 2 / 8 warps 36.1, CHUNK 16 /
# BK 2 / 4 warps (the gated bf16 default) 36.7, CHUNK 8 39-45. fp16 (--fp16 --sweep): the same
# blocks are the best of the sweep there too, 32.1-32.2 us (CHUNK 32 / BK 2 / 8 warps 32.9).
DEFAULT_PLAIN = {1: dict(CHUNK=32, BK=4, num_warps=8, num_stages=1), 2: dict(CHUNK=32, BK=4, num_warps=8, num_stages=1)}
DEFAULT_PLAIN_BF16: dict = {}


def updown(
    x, src, w_gate, w_up, w_down_t, *, mode, threshold=0.0, config=None, w_pred2=None, b_pred2=None,
    plain=False, b_up=None, b_down=None,
) -> torch.Tensor:
    """y [1, d_model] for one token x [1, d_model]; inputs checked by the public wrappers.

    mode 0: src = gate pre-activation [1, d_ff]; mode 1: src = predictor logits [1, d_ff];
    mode 2: src = predictor hidden [1, width], with w_pred2 [d_ff, width] (and b_pred2 [d_ff]).
    plain (modes 1 and 2): no gate (w_gate None), y = down(act(up(x) + b_up)) + b_down.
    """
    if plain and mode == 0:
        raise ValueError("updown: a plain FFN in exact mode is sparse_down after a dense up projection")
    cfg = dict((DEFAULT_PLAIN if plain else DEFAULT_UPDOWN)[mode])
    if x.dtype == torch.bfloat16:
        cfg.update((DEFAULT_PLAIN_BF16 if plain else DEFAULT_UPDOWN_BF16).get(mode, {}))
    cfg.update(config or {})
    k, n = w_up.shape
    if not (w_up.stride(0) == w_down_t.stride(0) and (mode == 0 or plain or w_gate.stride(0) == w_up.stride(0))):
        w_up, w_down_t = w_up.contiguous(), w_down_t.contiguous()
        w_gate = w_gate.contiguous() if w_gate is not None else None
    chunks = triton.cdiv(k, cfg["CHUNK"])
    pdl = use_pdl(x.device, cfg.get("pdl"))
    acc, cnt = workspace(("updown", n), x.device, [(n, torch.float32), (1, torch.int32)])
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    src = src.reshape(-1)
    if not src.is_contiguous():
        src = src.contiguous()
    if mode == 2:
        if w_pred2.stride(1) != 1:
            w_pred2 = w_pred2.contiguous()
        width, w2, s2 = w_pred2.shape[1], w_pred2, w_pred2.stride(0)
    else:
        width, w2, s2 = 1, src, 0  # unused
    _updown_kernel[(chunks,)](
        x, src, w_gate if w_gate is not None else w_up, w_up, w_down_t, y, acc, cnt, k, n,
        w_up.stride(0), float(threshold), chunks, w2, b_pred2 if b_pred2 is not None else w2,
        width, s2,
        MODE=mode, CHUNK=cfg["CHUNK"], BK=cfg["BK"], BN=triton.next_power_of_2(n),
        EARLY_GATE=bool(cfg.get("early_gate", False)), WP=triton.next_power_of_2(width),
        HAS_B2=b_pred2 is not None, PDL=pdl,
        BU=b_up if b_up is not None else w_up, BD=b_down if b_down is not None else w_up,
        PLAIN=bool(plain), HAS_BU=b_up is not None, HAS_BD=b_down is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y
