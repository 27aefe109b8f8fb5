"""Output-sparse row kernel: the FFN's first layer(s) computed only on active neurons.

One kernel, three modes (constexpr MODE), all producing the down projection's input
a [T, rows] in the model dtype, zero on inactive neurons:
- MODE 0 (exact, gate dense): SRC holds the gate pre-activations g [T, d_ff] (computed densely,
  e.g. by cuBLAS); a neuron is active when act(g) != 0 (ReLU / FATReLU: g > threshold) on any
  token; only those rows of W_up [d_ff, d_model] are read; a = act(g) * u.
- MODE 1 (predicted): SRC holds predictor logits [T, d_ff]; rows with logit > 0 on any token are
  read from both W_gate and W_up; a = act(g) * u * [logit > 0] per token.
- MODE 2 (ReLU-routed MoE blocks, BlockFFN): SRC holds router logits A0 [T, E]; the router score
  A = RMSNorm(ReLU(A0)) * norm_weight is computed in-kernel; row r belongs to expert r // d_e;
  rows of experts with A != 0 on any token are read from W_up [E * d_e, d_model];
  a = SiLU(u) * A[t, expert].

Grid: (row blocks of BR neurons) x (NUM_DS slices of d_model), slice fastest. Each program ranks
its block's active rows in registers, reads only those rows of its d_model slice, and adds its
partial dot products into an fp32 workspace with atomics; a per-row-block ticket lets the last
slice program apply the activation, write `a` and re-zero the workspace (single launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import dense_count, dot_f32
from .._tl import dot_acc
from ..chunk_ffn.gather import gather_ffn
from ..dense_gemv.triton import gemv


@triton.jit
def _rnd(v, OUT):
    """Round fp32 `v` to OUT's element type (the model dtype) and back, as the dense FFN rounds."""
    return v.to(OUT.dtype.element_ty).to(tl.float32)


@triton.jit
def _rows_partial(
    X,
    WG,
    WU,
    rows,
    r_ok,
    offs_t,
    t_ok,
    d0,
    D,
    stride_x,
    MODE: tl.constexpr,
    T_PAD: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    DS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    if T_PAD == 1:
        accu = tl.zeros([BK, BD], dtype=tl.float32)
        accg = tl.zeros([BK, BD], dtype=tl.float32)
    else:
        accu = tl.zeros([BK, T_PAD], dtype=tl.float32)
        accg = tl.zeros([BK, T_PAD], dtype=tl.float32)
    for dd in range(0, DS, BD):
        offs_d = d0 + dd + tl.arange(0, BD)
        d_ok = offs_d < D
        wmask = r_ok[:, None] & d_ok[None, :]
        wu = tl.load(WU + rows[:, None] * D + offs_d[None, :], mask=wmask, other=0.0)
        if MODE == 1:
            wg = tl.load(WG + rows[:, None] * D + offs_d[None, :], mask=wmask, other=0.0)
        if T_PAD == 1:
            xv = tl.load(X + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            accu += wu.to(tl.float32) * xv[None, :]
            if MODE == 1:
                accg += wg.to(tl.float32) * xv[None, :]
        else:
            xt = tl.load(
                X + offs_t[None, :] * stride_x + offs_d[:, None],
                mask=t_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            accu = dot_acc(wu, xt, accu, DOT_F32)
            if MODE == 1:
                accg = dot_acc(wg, xt, accg, DOT_F32)
    if T_PAD == 1:
        ru = tl.sum(accu, axis=1)[:, None]
        rg = tl.sum(accg, axis=1)[:, None]
    else:
        ru = accu
        rg = accg
    return ru, rg


@triton.jit
def _row_active(
    SRC, NW, rows, r_in, offs_t, t_ok, stride_src, inv_rms, D_E, threshold, MODE: tl.constexpr
):
    """Union over tokens of 'neuron active' for the given rows, [len(rows)] int32."""
    m2 = t_ok[:, None] & r_in[None, :]
    if MODE == 2:
        ex = rows // D_E
        a0r = tl.load(SRC + offs_t[:, None] * stride_src + ex[None, :], mask=m2, other=0.0)
        nwr = tl.load(NW + ex, mask=r_in, other=0.0).to(tl.float32)
        score = tl.maximum(a0r.to(tl.float32), 0.0) * inv_rms[:, None] * nwr[None, :]
        active = score != 0.0
    else:
        src = tl.load(SRC + offs_t[:, None] * stride_src + rows[None, :], mask=m2, other=0.0)
        if MODE == 0:
            active = src.to(tl.float32) > threshold
        else:
            active = src.to(tl.float32) > 0.0
    return tl.max((active & m2).to(tl.int32), axis=0)


@triton.jit
def _rows_tile(
    X,
    WG,
    WU,
    SRC,
    NW,
    OUT,
    UACC,
    GACC,
    rows,
    r_ok,
    offs_t,
    t_ok,
    d0,
    D,
    R,
    stride_x,
    stride_src,
    stride_out,
    inv_rms,
    D_E,
    threshold,
    MODE: tl.constexpr,
    T_PAD: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    DS: tl.constexpr,
    DOT_F32: tl.constexpr,
    SINGLE: tl.constexpr,
    STORE_ALL: tl.constexpr,
):
    """One tile of rows: partial dots over this program's d_model slice, then either `a`
    written directly (SINGLE: one slice) or fp32 atomics into the workspace."""
    pu, pg = _rows_partial(
        X, WG, WU, rows, r_ok, offs_t, t_ok, d0, D, stride_x, MODE, T_PAD, BK, BD, DS, DOT_F32
    )
    pmask = r_ok[:, None] & t_ok[None, :]
    if SINGLE:
        a_t = _rows_epilogue(
            SRC, NW, rows, r_ok, offs_t, t_ok, stride_src, inv_rms, D_E, threshold, pu, pg, OUT, MODE
        )
        if STORE_ALL:  # masked tiles cover every row: inactive ones get their zero here
            smask = (rows < R)[:, None] & t_ok[None, :]
        else:
            smask = pmask
        tl.store(
            OUT + offs_t[None, :] * stride_out + rows[:, None],
            a_t.to(OUT.dtype.element_ty),
            mask=smask,
        )
    else:
        tl.atomic_add(UACC + offs_t[None, :] * R + rows[:, None], pu, mask=pmask, sem="relaxed")
        if MODE == 1:
            tl.atomic_add(GACC + offs_t[None, :] * R + rows[:, None], pg, mask=pmask, sem="relaxed")


@triton.jit
def _sparse_rows_kernel(
    X,
    SRC,
    NW,
    WG,
    WU,
    OUT,
    UACC,
    GACC,
    CNT,
    T,
    R,
    D,
    E,
    D_E,
    stride_x,
    stride_src,
    stride_out,
    NUM_DS,
    threshold,
    eps,
    MODE: tl.constexpr,
    T_PAD: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    DS: tl.constexpr,
    E_PAD: tl.constexpr,
    DENSE_CNT: tl.constexpr,
    DOT_F32: tl.constexpr,
    COMPACT: tl.constexpr,
    SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = pid % NUM_DS
    pid_r = pid // NUM_DS

    offs_br = tl.arange(0, BR)
    rows_b = pid_r * BR + offs_br
    r_in = rows_b < R
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    m2 = t_ok[:, None] & r_in[None, :]

    # which neurons of this block are active, per token [T_PAD, BR]
    if MODE == 2:
        offs_e = tl.arange(0, E_PAD)
        e_ok = offs_e < E
        a0 = tl.load(
            SRC + offs_t[:, None] * stride_src + offs_e[None, :],
            mask=t_ok[:, None] & e_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        a1 = tl.maximum(a0, 0.0)
        inv_rms = 1.0 / tl.sqrt(tl.sum(a1 * a1, axis=1) / E + eps)  # [T_PAD]
        ex = rows_b // D_E
        a0r = tl.load(SRC + offs_t[:, None] * stride_src + ex[None, :], mask=m2, other=0.0)
        nwr = tl.load(NW + ex, mask=r_in, other=0.0).to(tl.float32)
        score = tl.maximum(a0r.to(tl.float32), 0.0) * inv_rms[:, None] * nwr[None, :]
        active = score != 0.0
    else:
        inv_rms = tl.zeros([T_PAD], dtype=tl.float32)
        src = tl.load(SRC + offs_t[:, None] * stride_src + rows_b[None, :], mask=m2, other=0.0).to(
            tl.float32
        )
        if MODE == 0:
            active = src > threshold
        else:
            active = src > 0.0
    active = active & m2
    act = tl.max(active.to(tl.int32), axis=0)  # union over tokens, [BR]
    cnt = tl.sum(act, axis=0)

    d0 = pid_d * DS
    offs_b = tl.arange(0, BK)
    if COMPACT:
        # two separate loops: a runtime branch inside one loop cost registers (KERNEL_NOTES.md)
        if cnt > DENSE_CNT:
            for i in range(0, BR, BK):
                rows = pid_r * BR + i + offs_b
                _rows_tile(
                    X,
                    WG,
                    WU,
                    SRC,
                    NW,
                    OUT,
                    UACC,
                    GACC,
                    rows,
                    rows < R,
                    offs_t,
                    t_ok,
                    d0,
                    D,
                    R,
                    stride_x,
                    stride_src,
                    stride_out,
                    inv_rms,
                    D_E,
                    threshold,
                    MODE,
                    T_PAD,
                    BK,
                    BD,
                    DS,
                    DOT_F32,
                    SINGLE,
                    False,
                )
        else:
            pos = tl.where(act > 0, tl.cumsum(act, axis=0) - 1, -1)
            for i in range(0, cnt, BK):
                j = i + offs_b
                local = tl.sum(tl.where(pos[None, :] == j[:, None], offs_br[None, :], 0), axis=1)
                rows = pid_r * BR + local
                _rows_tile(
                    X,
                    WG,
                    WU,
                    SRC,
                    NW,
                    OUT,
                    UACC,
                    GACC,
                    rows,
                    j < cnt,
                    offs_t,
                    t_ok,
                    d0,
                    D,
                    R,
                    stride_x,
                    stride_src,
                    stride_out,
                    inv_rms,
                    D_E,
                    threshold,
                    MODE,
                    T_PAD,
                    BK,
                    BD,
                    DS,
                    DOT_F32,
                    SINGLE,
                    False,
                )
    else:
        # masked tiles: loads of inactive rows are predicated off and move no bytes
        for i in range(0, BR, BK):
            rows = pid_r * BR + i + offs_b
            r_ok = (rows < R) & (
                _row_active(
                    SRC, NW, rows, rows < R, offs_t, t_ok, stride_src, inv_rms, D_E, threshold, MODE
                )
                > 0
            )
            _rows_tile(
                X,
                WG,
                WU,
                SRC,
                NW,
                OUT,
                UACC,
                GACC,
                rows,
                r_ok,
                offs_t,
                t_ok,
                d0,
                D,
                R,
                stride_x,
                stride_src,
                stride_out,
                inv_rms,
                D_E,
                threshold,
                MODE,
                T_PAD,
                BK,
                BD,
                DS,
                DOT_F32,
                SINGLE,
                True,
            )

    if SINGLE:
        if COMPACT:
            # rows never visited (inactive) still need their zero
            zmask = m2 & (act[None, :] == 0)
            tl.store(
                OUT + offs_t[:, None] * stride_out + rows_b[None, :],
                tl.zeros([T_PAD, BR], dtype=tl.float32).to(OUT.dtype.element_ty),
                mask=zmask,
            )
    else:
        tl.debug_barrier()
        ticket = tl.atomic_add(CNT + pid_r, 1, sem="acq_rel")
        if ticket == NUM_DS - 1:
            uptr = UACC + offs_t[:, None] * R + rows_b[None, :]
            zero = tl.zeros([T_PAD, BR], dtype=tl.float32)
            u = tl.atomic_add(uptr, zero, mask=m2, sem="relaxed")  # coherent read
            tl.store(uptr, zero, mask=m2)
            if MODE == 0:
                a = tl.where(active, src, 0.0) * _rnd(u, OUT)
            elif MODE == 1:
                gptr = GACC + offs_t[:, None] * R + rows_b[None, :]
                g = tl.atomic_add(gptr, zero, mask=m2, sem="relaxed")
                tl.store(gptr, zero, mask=m2)
                g = _rnd(g, OUT)
                a = tl.where(active & (g > threshold), g, 0.0) * _rnd(u, OUT)
            else:
                a = score * (u / (1.0 + tl.exp(-u)))
            tl.store(
                OUT + offs_t[:, None] * stride_out + rows_b[None, :],
                a.to(OUT.dtype.element_ty),
                mask=m2,
            )
            tl.store(CNT + pid_r, 0)


@triton.jit
def _rows_epilogue(
    SRC,
    NW,
    rows,
    r_ok,
    offs_t,
    t_ok,
    stride_src,
    inv_rms,
    D_E,
    threshold,
    pu,
    pg,
    OUT,
    MODE: tl.constexpr,
):
    """a [len(rows), T_PAD] from complete dot products pu (up) and pg (gate, MODE 1).

    Modes 0/1 round like the dense FFN in the model dtype: u (and g) to the model dtype, then
    the product act(g) * u to the model dtype (the caller's store rounds it)."""
    m = r_ok[:, None] & t_ok[None, :]
    if MODE == 2:
        ex = rows // D_E
        a0r = tl.load(SRC + offs_t[None, :] * stride_src + ex[:, None], mask=m, other=0.0)
        nwr = tl.load(NW + ex, mask=r_ok, other=0.0).to(tl.float32)
        score = tl.maximum(a0r.to(tl.float32), 0.0) * inv_rms[None, :] * nwr[:, None]
        a = score * (pu / (1.0 + tl.exp(-pu)))
    else:
        v = tl.load(SRC + offs_t[None, :] * stride_src + rows[:, None], mask=m, other=0.0).to(
            tl.float32
        )
        u = _rnd(pu, OUT)
        if MODE == 0:
            a = tl.where(v > threshold, v, 0.0) * u
        else:
            g = _rnd(pg, OUT)
            a = tl.where((v > 0.0) & (g > threshold), g, 0.0) * u
    return a


def default_rows_config(t: int, rows: int, d_model: int, mode: int = 0) -> dict:
    """Block shapes by problem shape and mode only (H100 sweeps, benchmarks/KERNEL_NOTES.md)."""
    p2 = triton.next_power_of_2(d_model)
    ds = 1024 if d_model >= 2048 else min(512, p2)
    if t == 1:
        return dict(
            BR=64, BK=16, BD=min(256, ds), DS=ds, num_warps=4, num_stages=2, dense_fraction=0.6
        )
    if mode == 2 and t > 16:
        # MoE blocks, long chunks: one d_model slice per program, `a` written directly
        bd = min(512, p2)
        return dict(
            BR=32,
            BK=16,
            BD=bd,
            DS=triton.cdiv(d_model, bd) * bd,
            num_warps=4,
            num_stages=2,
            dense_fraction=0.6,
        )
    if mode == 2:
        return dict(
            BR=64, BK=32, BD=min(128, ds), DS=ds, num_warps=4, num_stages=2, dense_fraction=0.6
        )
    ds = min(2048, p2)
    return dict(BR=64, BK=16, BD=min(512, ds), DS=ds, num_warps=4, num_stages=2, dense_fraction=0.6)


def launch_rows(
    mode: int,
    x: torch.Tensor,
    src: torch.Tensor,
    w_up: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    d_e: int = 1,
    threshold: float = 0.0,
    eps: float = 1e-6,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the row kernel; inputs are already checked by the public wrappers.

    x [T, d_model]; src [T, R] (modes 0, 1) or [T, E] (mode 2); w_up/w_gate [R, d_model].
    Returns a [T, R] in x's dtype.
    """
    from .._common import token_pad, workspace

    t, d = x.shape
    r = w_up.shape[0]
    cfg = dict(default_rows_config(t, r, d, mode))
    if config:
        cfg.update(config)
    if cfg["DS"] % cfg["BD"] != 0:
        raise ValueError("config: DS must be a multiple of BD")
    t_pad = token_pad(t)
    num_ds = triton.cdiv(d, cfg["DS"])
    num_rb = triton.cdiv(r, cfg["BR"])
    e = src.shape[1] if mode == 2 else 1
    e_pad = triton.next_power_of_2(e) if mode == 2 else 1
    uacc, gacc, cnt = workspace(
        ("rows", mode, t, r, num_rb),
        x.device,
        [(t * r, torch.float32), (t * r if mode == 1 else 1, torch.float32), (num_rb, torch.int32)],
    )
    out = torch.empty((t, r), dtype=x.dtype, device=x.device)
    wg = w_gate if w_gate is not None else w_up
    nw = norm_weight if norm_weight is not None else src
    _sparse_rows_kernel[(num_rb * num_ds,)](
        x,
        src,
        nw,
        wg,
        w_up,
        out,
        uacc,
        gacc,
        cnt,
        t,
        r,
        d,
        e,
        d_e,
        x.stride(0),
        src.stride(0),
        out.stride(0),
        num_ds,
        float(threshold),
        float(eps),
        MODE=mode,
        T_PAD=t_pad,
        BR=cfg["BR"],
        BK=cfg["BK"],
        BD=cfg["BD"],
        DS=cfg["DS"],
        E_PAD=e_pad,
        DENSE_CNT=dense_count(cfg["BR"], cfg["dense_fraction"]),
        DOT_F32=dot_f32(x.dtype),
        COMPACT=bool(cfg.get("compact", True)),
        SINGLE=num_ds == 1,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _check_src(name: str, src: torch.Tensor, t: int, r: int) -> torch.Tensor:
    from workbench.errors import KernelError

    s = src.reshape(t, -1) if src.dim() == 1 else src
    if s.dim() != 2 or tuple(s.shape) != (t, r):
        raise KernelError(f"{name} must be [{t}, {r}] (tokens x d_ff), got {tuple(src.shape)}")
    if s.stride(1) != 1:
        s = s.contiguous()
    return s


def gated_up(x, gate, w_up, *, activation="relu", threshold=0.0, config=None):
    """a = act(gate) * (x @ w_up^T), reading only W_up rows where act(gate) != 0 on some token.

    x [T, d_model] (or [d_model]); gate [T, d_ff] pre-activations from the dense gate GEMV;
    w_up [d_ff, d_model]. Returns a [T, d_ff] in x's dtype (zeros on inactive neurons).
    """
    from .._common import check_activation, check_ffn

    thr = check_activation(activation, threshold)
    x2, was_1d = check_ffn(x, w_up)
    g = _check_src("gate", gate, x2.shape[0], w_up.shape[0])
    a = launch_rows(0, x2, g, w_up, threshold=thr, config=config)
    return a[0] if was_1d else a


def gate_up_predicted(x, logits, w_gate, w_up, *, activation="relu", threshold=0.0, config=None):
    """a = act(x W_g^T) * (x W_u^T) * [logits > 0]; gate and up rows read only where predicted."""
    from .._common import check_activation, check_ffn

    thr = check_activation(activation, threshold)
    x2, was_1d = check_ffn(x, w_up, w_gate=w_gate)
    lg = _check_src("logits", logits, x2.shape[0], w_up.shape[0])
    a = launch_rows(1, x2, lg, w_up, w_gate=w_gate, threshold=thr, config=config)
    return a[0] if was_1d else a


def _split(config):
    config = config or {}
    return config.get("rows"), config.get("down")


def _dense(x2, w, config, bias=None, relu=False):
    """A dense part of the sparse FFN (the gate in exact mode, the predictor's layers): the Triton
    GEMV for one token and rows of at most 4096 (where it was measured faster than cuBLAS,
    KERNEL_NOTES v8), F.linear otherwise or when the config says {"gemv": False};
    {"gemv": {...}} sets the GEMV's blocks (and selects it for longer rows too)."""
    import torch.nn.functional as F

    cg = (config or {}).get("gemv", {})
    if x2.shape[0] == 1 and cg is not False and (cg or w.shape[1] <= 4096):
        return gemv(x2, w, bias, relu=relu, config=cg or None)
    y = F.linear(x2, w, bias)
    return torch.relu(y) if relu else y


def _fuse_pred2(w_pred2, config) -> bool:
    """Predictor's second layer inside the updown kernel (MODE 2), for predictor widths up to 1024
    (its [CHUNK, width] tile stays in registers). On by default, as measured on the H100: fp16
    (KERNEL_NOTES v8: whole P3 layer 31.3-31.8 vs 32.8-33.6 us at s = 0.9, 40.5 vs 43.1-44.2 at
    0.8) and, since v19, bf16 (P3 with predictor biases 32.5 / 41.1 / 66.9 us at s = 0.9 / 0.8 /
    0.5 against 34.2 / 44.7 / 75.5 unfused; P5's bf16 predictor decode 3.990-3.993 ms a token
    against 4.015-4.024; v8's opposite bf16 result came before v10-v16). config {"fuse_pred2":
    True | False} decides either way."""
    fuse = (config or {}).get("fuse_pred2", True)
    return bool(fuse) and w_pred2.shape[1] <= 1024


def _use_updown(x2, config) -> bool:
    """One token: the one-launch up+down kernel, unless the config names the two-launch path's
    blocks ("rows", "down", "fused_gate"). Default only up to d_model 4096, where it was measured
    (H100: P2 s=0.9 52.7 vs 59.9 us two-launch, P3 42.4 vs 47.4 us; KERNEL_NOTES v7)."""
    if x2.shape[0] != 1:
        return False
    config = config or {}
    if "updown" in config:
        return True
    if any(k in config for k in ("rows", "down", "fused_gate")):
        return False
    return x2.shape[1] <= 4096


def _use_gather(x2, config) -> bool:
    """2..64 tokens: the union list + gathered GEMMs of chunk_ffn/gather.py, unless the config
    names the row-kernel path's blocks ("rows", "down", "fused_gate")."""
    if x2.shape[0] < 2:
        return False
    config = config or {}
    return "gather" in config or not any(k in config for k in ("rows", "down", "fused_gate"))


def sparse_ffn(x, w_gate, w_up, w_down_t, *, activation="relu", threshold=0.0, config=None):
    """Exact sparse gated FFN: dense gate, sparse up fused with act*mul, sparse down.

    x [T, d_model]; w_gate, w_up [d_ff, d_model] (nn.Linear layout); w_down_t [d_ff, d_model].
    One token (d_model <= 4096): the gate through the Triton GEMV, then up rows, product and down
    rows in one launch (updown.py). 2..64 tokens: the gate through cuBLAS, then the union of the
    tokens' active neurons as a device list and gathered GEMMs over it (chunk_ffn/gather.py).
    config: optional {"updown": {...}}, {"gather": {...}, "dense_fraction": f} or the row-kernel
    path's {"rows": {...}, "down": {...}} block shapes; {"gemv": {...} | False} for the one-token
    gate GEMV (False: cuBLAS).
    """
    from .._common import check_activation, check_ffn
    from ..sparse_gemv.triton import sparse_down

    x2, was_1d = check_ffn(x, w_up, w_down_t, w_gate)
    crow, cdown = _split(config)
    if _use_updown(x2, config):
        # one launch for up rows, product and down rows (kernels/sparse_ffn/updown.py)
        from .updown import updown

        thr = check_activation(activation, threshold)
        y = updown(x2, _dense(x2, w_gate, config), None, w_up, w_down_t, mode=0, threshold=thr,
                   config=(config or {}).get("updown"))  # fmt: skip
        return y[0] if was_1d else y
    if _use_gather(x2, config):
        thr = check_activation(activation, threshold)
        gate = _dense(x2, w_gate, config)
        y = gather_ffn(x2, gate, w_up, w_down_t, thr, (config or {}).get("dense_fraction", 0.6),
                       (config or {}).get("gather"))  # fmt: skip
        return y[0] if was_1d else y
    if (config or {}).get("fused_gate"):
        # gate GEMV inside the row kernel (one launch instead of cuBLAS + row kernel)
        a = fused_gate_up(x2, w_gate, w_up, activation=activation, threshold=threshold, config=crow)
    else:
        gate = _dense(x2, w_gate, config)
        a = gated_up(x2, gate, w_up, activation=activation, threshold=threshold, config=crow)
    y = sparse_down(a, w_down_t, config=cdown)
    return y[0] if was_1d else y


def sparse_ffn_predicted(
    x,
    w_gate,
    w_up,
    w_down_t,
    w_pred1,
    w_pred2,
    *,
    b_pred1=None,
    b_pred2=None,
    activation="relu",
    threshold=0.0,
    config=None,
    x_pred=None,
):
    """Gated FFN with a Deja Vu predictor: gate, up and down rows only where the predictor's logit
    is > 0. One token: the predictor's first layer through the Triton GEMV (`_dense`), then
    either one launch that computes its chunk's logits (second layer) and the rows (updown MODE 2;
    the fp16 default) or the second layer as its own GEMV and then MODE 1 (the bf16 default; see
    `_fuse_pred2`). More tokens: the predictor through cuBLAS, the row kernel and the sparse down
    kernel."""
    from .._common import check_activation, check_ffn
    from ..predictor.reference import check_predictor, predictor_input
    from ..sparse_gemv.triton import sparse_down

    x2, was_1d = check_ffn(x, w_up, w_down_t, w_gate)
    crow, cdown = _split(config)
    xp2 = predictor_input(x_pred, x2)
    check_predictor(xp2, w_pred1, w_pred2)
    hid = _dense(xp2, w_pred1, config, b_pred1, relu=True)
    if _use_updown(x2, config) and _fuse_pred2(w_pred2, config):
        # the predictor's second layer inside the one-launch kernel (updown MODE 2)
        from .updown import updown

        thr = check_activation(activation, threshold)
        y = updown(x2, hid, w_gate, w_up, w_down_t, mode=2, threshold=thr,
                   config=(config or {}).get("updown"), w_pred2=w_pred2, b_pred2=b_pred2)  # fmt: skip
        return y[0] if was_1d else y
    logits = _dense(hid, w_pred2, config, b_pred2)
    if _use_updown(x2, config):
        from .updown import updown

        thr = check_activation(activation, threshold)
        y = updown(x2, logits, w_gate, w_up, w_down_t, mode=1, threshold=thr,
                   config=(config or {}).get("updown"))  # fmt: skip
        return y[0] if was_1d else y
    a = gate_up_predicted(
        x2, logits, w_gate, w_up, activation=activation, threshold=threshold, config=crow
    )
    y = sparse_down(a, w_down_t, config=cdown)
    return y[0] if was_1d else y


def plain_ffn_predicted(
    x,
    w_up,
    w_down_t,
    w_pred1,
    w_pred2,
    *,
    b_up=None,
    b_down=None,
    b_pred1=None,
    b_pred2=None,
    activation="relu",
    threshold=0.0,
    config=None,
    x_pred=None,
):
    """Plain (non-gated) FFN with a Deja Vu predictor (OPT): up and down rows only where the
    predictor's logit is > 0; same function as the reference. One token (d_model <= 4096): the
    predictor's first layer through the Triton GEMV, then one launch for its second layer, the
    up rows with their bias and activation and the down rows with the down bias (updown MODE 2,
    PLAIN; config {"fuse_pred2": False}: the second layer as a GEMV, then MODE 1). More tokens:
    the predictor densely, the predicted up rows through the row kernel (`gated_up` with a 0/1
    gate; the bias added after its rounding), the activation, then `sparse_down` with the bias."""
    from .._common import check_activation, check_bias, check_ffn
    from ..predictor.reference import check_predictor, predictor_input
    from ..sparse_gemv.triton import sparse_down

    thr = check_activation(activation, threshold)
    x2, was_1d = check_ffn(x, w_up, w_down_t)
    check_bias("b_up", b_up, w_up.shape[0], x2, "the up projection's bias [d_ff]")
    check_bias("b_down", b_down, w_up.shape[1], x2, "the down projection's bias [d_model]")
    xp2 = predictor_input(x_pred, x2)
    check_predictor(xp2, w_pred1, w_pred2)
    crow, cdown = _split(config)
    hid = _dense(xp2, w_pred1, config, b_pred1, relu=True)
    if _use_updown(x2, config):
        from .updown import updown

        kw = dict(threshold=thr, config=(config or {}).get("updown"), plain=True, b_up=b_up, b_down=b_down)
        if _fuse_pred2(w_pred2, config):
            y = updown(x2, hid, None, w_up, w_down_t, mode=2, w_pred2=w_pred2, b_pred2=b_pred2, **kw)
        else:
            y = updown(x2, _dense(hid, w_pred2, config, b_pred2), None, w_up, w_down_t, mode=1, **kw)
        return y[0] if was_1d else y
    gate = (_dense(hid, w_pred2, config, b_pred2) > 0).to(x2.dtype)
    u = gated_up(x2, gate, w_up, activation="relu", config=crow)
    if b_up is not None:
        u = torch.addcmul(u, gate, b_up)
    a = torch.where(u > thr, u, torch.zeros_like(u))
    y = sparse_down(a, w_down_t, bias=b_down, config=cdown)
    return y[0] if was_1d else y


@triton.jit
def _fused_gate_up_kernel(
    X,
    WG,
    WU,
    OUT,
    T,
    R,
    D,
    stride_x,
    stride_out,
    threshold,
    T_PAD: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    DS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Exact mode in one pass: the program's BR gate rows are read densely (the mask), then only
    the active rows of W_up, and a = act(g) * u is written for the whole block."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    r_in = rows < R
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    g, _ = _rows_partial(
        X, WG, WG, rows, r_in, offs_t, t_ok, 0, D, stride_x, 0, T_PAD, BR, BD, DS, DOT_F32
    )
    m = r_in[:, None] & t_ok[None, :]
    g = _rnd(g, OUT)  # the dense FFN's gate is in the model dtype: mask and value from it
    active = (g > threshold) & m
    r_act = tl.max(active.to(tl.int32), axis=1) > 0
    u, _ = _rows_partial(
        X, WU, WU, rows, r_act, offs_t, t_ok, 0, D, stride_x, 0, T_PAD, BR, BD, DS, DOT_F32
    )
    a = tl.where(active, g, 0.0) * _rnd(u, OUT)
    tl.store(OUT + offs_t[None, :] * stride_out + rows[:, None], a.to(OUT.dtype.element_ty), mask=m)


def fused_gate_up(x, w_gate, w_up, *, activation="relu", threshold=0.0, config=None):
    """a = act(x W_g^T) * (x W_u^T): gate rows read densely inside the kernel (fp32 dot), up rows
    only where the gate is active; one launch, no workspace. x [T, d_model] -> a [T, d_ff]."""
    from .._common import check_activation, check_ffn, token_pad

    thr = check_activation(activation, threshold)
    x2, was_1d = check_ffn(x, w_up, w_gate=w_gate)
    t, d = x2.shape
    r = w_up.shape[0]
    cfg = dict(BR=16, BD=512 if t == 1 else 128, num_warps=4, num_stages=3)
    if config:
        cfg.update({k: v for k, v in config.items() if k in cfg})
    bd = min(cfg["BD"], triton.next_power_of_2(d))
    ds = triton.cdiv(d, bd) * bd
    out = torch.empty((t, r), dtype=x2.dtype, device=x2.device)
    _fused_gate_up_kernel[(triton.cdiv(r, cfg["BR"]),)](
        x2,
        w_gate,
        w_up,
        out,
        t,
        r,
        d,
        x2.stride(0),
        out.stride(0),
        float(thr),
        T_PAD=token_pad(t),
        BR=cfg["BR"],
        BD=bd,
        DS=ds,
        DOT_F32=dot_f32(x2.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out[0] if was_1d else out
