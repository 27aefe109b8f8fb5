"""Input-sparse GEMV / small GEMM for the down projection: y = a @ W_down^T.

Design (one launch, graph-capturable, no host synchronisation):
- W_down is stored transposed, [d_ff, d_model], so each active neuron's weights are one
  contiguous row of d_model elements.
- Grid: (d_ff chunks) x (d_model column blocks), column block fastest so that programs of one
  chunk run side by side and read neighbouring parts of the same rows.
- Each program loads its chunk of the activations for every token, takes the union of nonzeros
  across tokens and reads only the active rows of its [CHUNK, BN] tile. One token (the default
  "list" path): the program writes its active row numbers and activations to its own slot of a
  scratch list in global memory (cumsum positions), one barrier, then reads them back BK at a
  time. Several tokens (and config list=False): the row numbers are compacted in registers
  (cumsum + rank match), and when more than DENSE_CNT rows of the chunk are active the program
  reads the whole chunk instead (dense fallback: no compaction work).
- Split-K reduction in fp32 through atomics into a zeroed workspace; a per-column-block ticket
  lets the last program of each column block cast the sum to the output dtype and re-zero the
  workspace, so no separate memset or cast kernel is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.errors import KernelError

from .._common import (
    as_tokens,
    check_2d,
    check_dtype,
    check_mult16,
    check_same_device,
    check_tokens,
    dense_count,
    dot_f32,
    token_pad,
    use_pdl,
    workspace,
)
from .._tl import dot_acc, pdl_release, pdl_wait, split_reduce
from .reference import _check_bias


@triton.jit
def _acc_down_rows(
    acc,
    A,
    W,
    rows,
    r_ok,
    offs_t,
    t_ok,
    offs_n,
    n_ok,
    stride_a,
    stride_w,
    T_PAD: tl.constexpr,
    DOT_F32: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    if MASK_ROWS:
        if T_PAD == 1:
            a = tl.load(A + rows, mask=r_ok, other=0.0)
            r_ok = r_ok & (a != 0)
        else:
            a = tl.load(
                A + offs_t[:, None] * stride_a + rows[None, :],
                mask=t_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            r_ok = r_ok & (tl.max((a != 0).to(tl.int32), axis=0) > 0)
        w = tl.load(
            W + rows[:, None] * stride_w + offs_n[None, :],
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
    else:
        # v1 order: the weight tile first, the activations after
        w = tl.load(
            W + rows[:, None] * stride_w + offs_n[None, :],
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if T_PAD == 1:
            a = tl.load(A + rows, mask=r_ok, other=0.0)
        else:
            a = tl.load(
                A + offs_t[:, None] * stride_a + rows[None, :],
                mask=t_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
    if T_PAD == 1:
        acc += a[:, None].to(tl.float32) * w.to(tl.float32)
    else:
        acc = dot_acc(a, w, acc, DOT_F32)
    return acc


@triton.jit
def _down_chunk(
    acc, A, W, base, lim, offs_b, offs_t, t_ok, offs_n, n_ok, stride_a, stride_w,
    ROWS: tl.constexpr, BK: tl.constexpr, T_PAD: tl.constexpr, DOT_F32: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    """Every row of the chunk [base, lim), BK at a time (dense fallback, or masked tiles)."""
    for i in range(0, ROWS, BK):
        rows = base + i + offs_b
        acc = _acc_down_rows(
            acc, A, W, rows, rows < lim, offs_t, t_ok, offs_n, n_ok, stride_a, stride_w, T_PAD,
            DOT_F32, MASK_ROWS,
        )  # fmt: skip
    return acc


@triton.jit
def _down_ranked(
    acc, A, W, act, cnt, base, offs_ck, offs_b, offs_t, t_ok, offs_n, n_ok, stride_a, stride_w,
    BK: tl.constexpr, T_PAD: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Only the chunk's active rows: each row's rank among them (inactive rows get -1), then BK
    ranked rows at a time, found by matching ranks in registers."""
    pos = tl.where(act > 0, tl.cumsum(act, axis=0) - 1, -1)
    for i in range(0, cnt, BK):
        j = i + offs_b
        local = tl.sum(tl.where(pos[None, :] == j[:, None], offs_ck[None, :], 0), axis=1)
        acc = _acc_down_rows(
            acc, A, W, base + local, j < cnt, offs_t, t_ok, offs_n, n_ok, stride_a, stride_w,
            T_PAD, DOT_F32, False,
        )  # fmt: skip
    return acc


@triton.jit
def _down_listed(
    acc, W, idx_slot, val_slot, a_c, act, cnt, rows_c, offs_b, offs_t, t_ok, offs_n, n_ok,
    stride_w, CHUNK: tl.constexpr, BK: tl.constexpr, T_PAD: tl.constexpr, DOT_F32: tl.constexpr,
    PREF: tl.constexpr,
    EVICT: tl.constexpr = "",
):
    """Only the chunk's active rows, through a list: the program writes its active row numbers and
    their activations (every token's) to its own slot of a global scratch list, one barrier, then
    reads them back BK at a time. No [BK, CHUNK] rank tile in registers, and the activations come
    back as one contiguous load rather than a gather from A (twice as fast at 2048x8192 on the
    H100, KERNEL_NOTES v14). PREF: each pass's row numbers are loaded one pass ahead."""
    pos = tl.cumsum(act, axis=0) - 1
    keep = act > 0
    tl.store(idx_slot + pos, rows_c, mask=keep)
    tl.store(val_slot + offs_t[:, None] * CHUNK + pos[None, :], a_c, mask=keep[None, :])
    tl.debug_barrier()  # the block's own global writes are visible to it after the barrier
    if PREF:  # the next pass's row numbers are loaded one pass ahead
        rows_n = tl.load(idx_slot + offs_b, mask=offs_b < cnt, other=0)
    for i in range(0, cnt, BK):
        j = i + offs_b
        ok = j < cnt
        if PREF:
            rows = rows_n
            rows_n = tl.load(idx_slot + j + BK, mask=j + BK < cnt, other=0)
        else:
            rows = tl.load(idx_slot + j, mask=ok, other=0)
        w = tl.load(
            W + rows[:, None] * stride_w + offs_n[None, :],
            mask=ok[:, None] & n_ok[None, :],
            other=0.0,
            eviction_policy=EVICT,
        )
        if T_PAD == 1:
            a = tl.load(val_slot + j, mask=ok, other=0.0)
            acc += a[:, None].to(tl.float32) * w.to(tl.float32)
        else:
            a = tl.load(
                val_slot + offs_t[:, None] * CHUNK + j[None, :],
                mask=t_ok[:, None] & ok[None, :],
                other=0.0,
            )
            acc = dot_acc(a, w, acc, DOT_F32)
    return acc


@triton.jit
def _sparse_down_kernel(
    A,
    W,
    Y,
    ACC,
    CNT,
    T,
    K,
    N,
    stride_a,
    stride_w,
    stride_y,
    NUM_NB,
    NUM_CHUNKS,
    ROWS: tl.constexpr,
    T_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    DENSE_CNT: tl.constexpr,
    DOT_F32: tl.constexpr,
    COMPACT: tl.constexpr,
    PDL: tl.constexpr = False,
    DOT_CNT: tl.constexpr = -1,
    IDX=None,
    VAL=None,
    LIST: tl.constexpr = False,
    LIST_PREF: tl.constexpr = False,
    EVICT: tl.constexpr = "",
    BIAS=None,
    HAS_BIAS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pid_n = pid % NUM_NB
    pid_c = pid // NUM_NB
    pdl_wait(PDL)

    offs_ck = tl.arange(0, CHUNK)
    if ROWS == CHUNK:  # the default: the same code as before the option existed
        base = pid_c * CHUNK
        lim = K
    else:  # config rows_per_chunk: ROWS < CHUNK rows per program, the rank tile still CHUNK wide
        base = pid_c * ROWS
        lim = tl.minimum(K, base + ROWS)
    rows_c = base + offs_ck
    in_k = rows_c < lim
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    a_c = tl.load(
        A + offs_t[:, None] * stride_a + rows_c[None, :],
        mask=t_ok[:, None] & in_k[None, :],
        other=0.0,
    )
    act = tl.max((a_c != 0).to(tl.int32), axis=0)  # union over tokens, [CHUNK]
    cnt = tl.sum(act, axis=0)

    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    offs_b = tl.arange(0, BK)
    if T_PAD == 1:
        acc = tl.zeros([BK, BN], dtype=tl.float32)
    else:
        acc = tl.zeros([T_PAD, BN], dtype=tl.float32)

    if T_PAD == 1 and DOT_CNT >= 0:
        # one token, three separate loops chosen per program by its active-row count: many
        # active rows go through tl.dot with the token axis padded to 16 (Triton pipelines those
        # loads, and the tensor cores take the fp16 -> fp32 work off the FMA pipe), few through
        # FMAs (the shortest chain at high sparsity); see KERNEL_NOTES v13
        t16 = tl.arange(0, 16)
        t16_ok = t16 < 1
        if cnt > DENSE_CNT:
            acc16 = _down_chunk(
                tl.zeros([16, BN], dtype=tl.float32), A, W, base, lim, offs_b, t16, t16_ok,
                offs_n, n_ok, stride_a, stride_w, ROWS, BK, 16, DOT_F32, False,
            )  # fmt: skip
            part1 = tl.sum(acc16, axis=0)
        elif cnt > DOT_CNT:
            acc16 = _down_ranked(
                tl.zeros([16, BN], dtype=tl.float32), A, W, act, cnt, base, offs_ck, offs_b, t16,
                t16_ok, offs_n, n_ok, stride_a, stride_w, BK, 16, DOT_F32,
            )  # fmt: skip
            part1 = tl.sum(acc16, axis=0)
        else:
            acc = _down_ranked(
                acc, A, W, act, cnt, base, offs_ck, offs_b, offs_t, t_ok, offs_n, n_ok, stride_a,
                stride_w, BK, T_PAD, DOT_F32,
            )  # fmt: skip
            part1 = tl.sum(acc, axis=0)
    elif COMPACT and LIST:
        if DENSE_CNT < ROWS:  # a dense fallback only when asked for (dense_fraction < 1)
            if cnt > DENSE_CNT:
                acc = _down_chunk(
                    acc, A, W, base, lim, offs_b, offs_t, t_ok, offs_n, n_ok, stride_a, stride_w,
                    ROWS, BK, T_PAD, DOT_F32, False,
                )  # fmt: skip
            else:
                acc = _down_listed(
                    acc, W, IDX + pid.to(tl.int64) * CHUNK,
                    VAL + pid.to(tl.int64) * (T_PAD * CHUNK), a_c, act, cnt, rows_c, offs_b, offs_t,
                    t_ok, offs_n, n_ok, stride_w, CHUNK, BK, T_PAD, DOT_F32, LIST_PREF, EVICT,
                )  # fmt: skip
        else:
            # no fallback branch at all: compiled in, it made the list loop itself 1.4-2.3x
            # slower on the H100 even where it was never taken (KERNEL_NOTES v14)
            acc = _down_listed(
                acc, W, IDX + pid.to(tl.int64) * CHUNK, VAL + pid.to(tl.int64) * (T_PAD * CHUNK),
                a_c, act, cnt, rows_c, offs_b, offs_t, t_ok, offs_n, n_ok, stride_w, CHUNK, BK,
                T_PAD, DOT_F32, LIST_PREF, EVICT,
            )  # fmt: skip
    elif COMPACT:
        # Two separate loops (v1 form): a runtime branch inside one loop raised the register
        # count from 168 to 200 and cost 30-50 % at s >= 0.9 on the H100 (see KERNEL_NOTES.md).
        if cnt > DENSE_CNT:
            # dense fallback: read the whole chunk, no ranking work
            acc = _down_chunk(
                acc, A, W, base, lim, offs_b, offs_t, t_ok, offs_n, n_ok, stride_a, stride_w,
                ROWS, BK, T_PAD, DOT_F32, False,
            )  # fmt: skip
        else:
            acc = _down_ranked(
                acc, A, W, act, cnt, base, offs_ck, offs_b, offs_t, t_ok, offs_n, n_ok, stride_a,
                stride_w, BK, T_PAD, DOT_F32,
            )  # fmt: skip
    else:
        # masked tiles: the loads of inactive rows are predicated off and move no bytes
        acc = _down_chunk(
            acc, A, W, base, lim, offs_b, offs_t, t_ok, offs_n, n_ok, stride_a, stride_w, ROWS,
            BK, T_PAD, DOT_F32, True,
        )  # fmt: skip

    pdl_release(PDL)
    if T_PAD == 1 and DOT_CNT >= 0:
        part = part1
        ptrs = ACC + offs_n
        pmask = n_ok
        yptrs = Y + offs_n
    elif T_PAD == 1:
        part = tl.sum(acc, axis=0)
        ptrs = ACC + offs_n
        pmask = n_ok
        yptrs = Y + offs_n
    else:
        part = acc
        ptrs = ACC + offs_t[:, None] * N + offs_n[None, :]
        pmask = t_ok[:, None] & n_ok[None, :]
        yptrs = Y + offs_t[:, None] * stride_y + offs_n[None, :]
    last, total = split_reduce(ptrs, pmask, part, CNT + pid_n, NUM_CHUNKS, cnt > 0)
    if last:
        if HAS_BIAS:  # added in fp32 before the one rounding, as cuBLAS's epilogue does
            total = total + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(yptrs, total.to(Y.dtype.element_ty), mask=pmask)


def default_down_config(t: int, d_ff: int, d_model: int) -> dict:
    """Block shapes by problem shape only (never by data, so the launch is graph-safe)."""
    if t == 1:
        # H100 sweeps (benchmarks/KERNEL_NOTES.md v14): one token goes through the scratch list
        # (no dense fallback: compiled in, it slowed the list loop); wide column blocks for
        # d_model >= 4096 (chunks sized to the SMs by grid_rows on a GPU); for narrower layers
        # chunks of 128 rows over 1024-wide column blocks, row numbers loaded a pass ahead
        if d_model >= 4096:  # weight rows marked evict_first: 2-3 % faster there (v15)
            return dict(
                CHUNK=256, BK=16, BN=512, num_warps=4, num_stages=2, dense_fraction=0.6, list=True,
                w_evict="evict_first",
            )  # fmt: skip
        bn = min(1024, triton.next_power_of_2(d_model))
        return dict(
            CHUNK=128, BK=16, BN=bn, num_warps=4, num_stages=1, dense_fraction=0.6, list=True,
            list_prefetch=True,
        )  # fmt: skip
    # chunks of tokens (P4 sweeps, 4096x11008): wide column blocks amortise the ranking work
    if t <= 16:
        return dict(CHUNK=256, BK=16, BN=512, num_warps=4, num_stages=2, dense_fraction=0.6)
    return dict(CHUNK=512, BK=16, BN=256, num_warps=4, num_stages=2, dense_fraction=0.6)


_SM_COUNT: dict[str, int] = {}


def grid_rows(k: int, num_nb: int, chunk: int, device: torch.device, per_sm: int = 4) -> int:
    """Rows per chunk for the one-token default at d_model >= 4096 (about 128 registers x 128
    threads: `per_sm` = 4 blocks a SM on the H100). When the CHUNK-row grid fills less than 70 % of
    the SMs' block slots, chunks shrink (to a multiple of 16 rows) until the grid fills about 96 %
    of them in one wave; otherwise CHUNK stays. KERNEL_NOTES v13 (rank tile, fp16): 4096x11008 176
    rows (504 programs instead of 344), 1.44 / 2.00 / 2.49x at s = 0.5 / 0.7 / 0.8 against 1.25 /
    1.83 / 2.28x; v14 (scratch list, fp16 and bf16): 176 rows 0.5-2 % faster than 256 at s >= 0.5
    and 1-3 % at s = 0; exactly 4 blocks a SM (528 programs) was slower in v13, and 4096x14336
    keeps 256 (448 programs; 176 rows there were 10-40 % slower in v14)."""
    key = str(device)
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(device).multi_processor_count
    slots = per_sm * _SM_COUNT[key]
    if triton.cdiv(k, chunk) * num_nb >= 0.7 * slots:
        return chunk
    chunks = max(1, int(0.96 * slots) // num_nb)
    return min(chunk, -(-triton.cdiv(k, chunks) // 16) * 16)


def sparse_down(
    a: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y = a @ w_down_t (+ bias) reading only the rows of w_down_t whose activation is nonzero.

    a:        [T, d_ff] or [d_ff], fp16/bf16, T in 1..64 (union of nonzeros across tokens)
    w_down_t: [d_ff, d_model], same dtype (see workbench.kernels.layout.down_rows)
    bias:     [d_model] or None (a plain FFN's down bias, e.g. OPT's fc2), same dtype, added in
              fp32 by the program that writes the output, before the one rounding
    returns   [T, d_model] (or [d_model]) in a's dtype, fp32 accumulation.
    config:   block-shape overrides (CHUNK, BK, BN, num_warps, num_stages, dense_fraction), "pdl",
              "compact" (False: masked tiles), "rows_per_chunk" (<= CHUNK rows a program; for
              one token on a GPU at d_model >= 4096 with the default blocks it comes from
              grid_rows, the device's SM count), "t_pad" (16: one token through tl.dot),
              "dot_fraction" (rank tile, one token: tl.dot only in chunks with more active rows
              than this fraction; turns "list" off unless "list" is given), "list" (active row
              numbers and activations through a per-program scratch list in global memory
              instead of a rank tile in registers; the one-token default, with no dense
              fallback unless dense_fraction is given) and "list_prefetch" (with "list": row
              numbers loaded one pass ahead; the default below d_model 4096) and "w_evict"
              (with "list": the L2 eviction policy of the weight-row loads, "" or "evict_first"
              (the default at d_model >= 4096) or "evict_last"); measured in
              benchmarks/KERNEL_NOTES.md v8, v13, v14 and v15.
    """
    a2, was_1d = as_tokens(a, "a")
    t, k = a2.shape
    check_dtype("a", a2)
    check_dtype("w_down_t", w_down_t, a2.dtype)
    check_2d("w_down_t", w_down_t, (k, None))
    check_same_device(a=a2, w_down_t=w_down_t)
    n = w_down_t.shape[1]
    check_mult16("d_ff", k)
    check_mult16("d_model", n)
    check_tokens(t)
    if w_down_t.stride(1) != 1:
        w_down_t = w_down_t.contiguous()
    if bias is not None:
        _check_bias(bias, w_down_t, a2.dtype)
        bias = bias.contiguous()
    cfg = dict(default_down_config(t, k, n))
    if config:
        cfg.update(config)
    # "t_pad": pad the token axis further (e.g. 16 for one token) so that the rows go through
    # tl.dot, whose loads Triton software-pipelines over the passes (num_stages)
    t_pad = max(token_pad(t), int(cfg.get("t_pad", 1)))
    num_nb = triton.cdiv(n, cfg["BN"])
    # "rows_per_chunk" (<= CHUNK): fewer rows per program than the CHUNK-wide rank tile, so that
    # the grid can be sized to the SMs (grid_rows: the fp16 default where that pays)
    blocks = (
        "CHUNK", "BK", "BN", "num_warps", "rows_per_chunk", "t_pad", "dot_fraction", "list",
        "list_prefetch",
    )  # fmt: skip
    if t == 1 and n >= 4096 and a2.is_cuda and not any(b in (config or {}) for b in blocks):
        # the library's one-token blocks: chunks sized to the device's SMs where the default grid
        # leaves block slots idle (graph-safe: shape and device decide, not the data)
        cfg["rows_per_chunk"] = grid_rows(k, num_nb, cfg["CHUNK"], a2.device)
    if config and "dot_fraction" in config and "list" not in config:
        cfg["list"] = False  # dot_fraction is a rank-tile option
    rows = int(cfg.get("rows_per_chunk") or cfg["CHUNK"])
    if not 0 < rows <= cfg["CHUNK"]:
        raise KernelError(f"rows_per_chunk={rows} must lie in 1..CHUNK ({cfg['CHUNK']})")
    num_chunks = triton.cdiv(k, rows)
    # "dot_fraction" (one token): chunks with more than this fraction of active rows go through
    # tl.dot (token axis padded to 16), sparser ones through FMAs; None keeps FMAs everywhere
    dot_fraction = cfg.get("dot_fraction")
    dot_cnt = -1
    if t_pad == 1 and dot_fraction is not None and bool(cfg.get("compact", True)):
        dot_cnt = int(rows * float(dot_fraction))
    acc, cnt = workspace(
        ("down", t, n, num_nb), a2.device, [(t * n, torch.float32), (num_nb, torch.int32)]
    )
    # "list": the active rows go through a per-program scratch list (global, L2-resident) instead
    # of the rank tile in registers
    listed = bool(cfg.get("list", False)) and bool(cfg.get("compact", True))
    if listed and dot_cnt >= 0:
        raise KernelError("config 'list' and 'dot_fraction' cannot be combined: choose one")
    if listed and "dense_fraction" not in (config or {}):
        cfg["dense_fraction"] = 1.0  # the list path reads full chunks itself; no fallback branch
    evict = str(cfg.get("w_evict", "") or "")
    if evict not in ("", "evict_first", "evict_last"):
        raise KernelError(
            f"config w_evict={evict!r} is not an L2 eviction policy: use '', 'evict_first' or "
            "'evict_last'"
        )
    idx = val = None
    if listed:
        slots = num_nb * num_chunks * cfg["CHUNK"]
        idx, val = workspace(
            ("down_list", slots, t_pad, a2.dtype),
            a2.device,
            [(slots, torch.int32), (slots * t_pad, a2.dtype)],
        )
    y = torch.empty((t, n), dtype=a2.dtype, device=a2.device)
    pdl = use_pdl(a2.device, cfg.get("pdl"))
    _sparse_down_kernel[(num_nb * num_chunks,)](
        a2,
        w_down_t,
        y,
        acc,
        cnt,
        t,
        k,
        n,
        a2.stride(0),
        w_down_t.stride(0),
        y.stride(0),
        num_nb,
        num_chunks,
        ROWS=rows,
        T_PAD=t_pad,
        CHUNK=cfg["CHUNK"],
        BK=cfg["BK"],
        BN=cfg["BN"],
        DENSE_CNT=dense_count(rows, cfg["dense_fraction"]),
        DOT_F32=dot_f32(a2.dtype),
        COMPACT=bool(cfg.get("compact", True)),
        PDL=pdl,
        DOT_CNT=dot_cnt,
        IDX=idx,
        VAL=val,
        LIST=listed,
        LIST_PREF=listed and bool(cfg.get("list_prefetch", False)),
        EVICT=evict,
        BIAS=bias,
        HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"launch_pdl": True} if pdl else {}),
    )
    return y[0] if was_1d else y
