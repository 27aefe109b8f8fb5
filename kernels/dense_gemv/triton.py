"""Dense one-token GEMV in Triton: y = act(x @ w^T + b) for x [1, N], w [K, N] (nn.Linear layout).

Why a dense kernel in a sparse package: in exact mode the gate stays dense and is most of the
sparse FFN's time (34-36 us of ~49 us at 4096x11008, s = 0.9), and the predictor's two GEMVs are
small shapes that cuBLAS reads at well under the bandwidth ceiling (KERNEL_NOTES v8). Here each
program reads R whole rows of w (R x N, contiguous) with `evict_first` (the rows are used once
per token), multiplies by x in fp32 and reduces; no split-K, no atomics, no workspace. The sum is
rounded once to the output dtype as cuBLAS rounds its fp32 accumulator; the bias is added and
ReLU applied in fp32 before that rounding (relu commutes with rounding).

For more than one token, or when the dispatcher finds no rule for the shape, the caller uses
F.linear instead (`gemv` below falls back itself for T > 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from workbench.errors import KernelError

from .._common import check_dtype, use_pdl
from .._tl import pdl_release, pdl_wait, round_to


@triton.jit
def _gemv_kernel(
    X,
    W,
    B,
    Y,
    K,
    N,
    stride_w,
    R: tl.constexpr,
    BN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
):
    pid = tl.program_id(0)
    DT = X.dtype.element_ty
    if PREFETCH:
        rows = pid * R + tl.arange(0, R)
        r_ok = rows < K
        # rows of at most BN: the weight tile is read before the wait (no kernel writes weights),
        # so under programmatic dependent launch the programs resident early overlap their
        # weight read with the previous kernel's tail; only x waits for it
        offs = tl.arange(0, BN)
        n_ok = offs < N
        w = tl.load(
            W + rows[:, None] * stride_w + offs[None, :],
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        pdl_wait(PDL)
        pdl_release(PDL)
        x = tl.load(X + offs, mask=n_ok, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    else:
        pdl_wait(PDL)
        pdl_release(PDL)  # dependents may launch now (they wait for this kernel before reading)
        rows = pid * R + tl.arange(0, R)
        r_ok = rows < K
        acc = tl.zeros([R, BN], dtype=tl.float32)
        for n0 in range(0, N, BN):
            offs = n0 + tl.arange(0, BN)
            n_ok = offs < N
            x = tl.load(X + offs, mask=n_ok, other=0.0).to(tl.float32)
            w = tl.load(
                W + rows[:, None] * stride_w + offs[None, :],
                mask=r_ok[:, None] & n_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=r_ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(Y + rows, round_to(y, DT).to(DT), mask=r_ok)


def default_config(k: int, n: int) -> dict:
    """Blocks by shape (H100 sweep, benchmarks/diag_gemv.py, KERNEL_NOTES v8): two whole rows per
    program, 4 warps (2 for rows of at most 1024): 2.96 TB/s at 11008x4096 against cuBLAS's 2.59;
    longer rows than 4096 loop over 4096-wide tiles. prefetch (off by default): rows of one tile
    read their weights before the PDL wait; KERNEL_NOTES v13: the bf16 P3 layer alone 1.7-2.3 us
    faster, fp16 unchanged, and no gain inside P5's decode (4.469 vs 4.424 ms exact)."""
    bn = min(4096, triton.next_power_of_2(n))
    return dict(R=2, BN=bn, num_warps=4 if bn >= 2048 else 2, prefetch=False)


def gemv(x, w, bias=None, *, relu=False, config=None) -> torch.Tensor:
    """y [T, K] = act(x [T, N] @ w [K, N]^T + bias); the Triton kernel for T = 1, F.linear above."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise KernelError(
            f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} do not chain; want x [T, N] and "
            f"w [K, N] (nn.Linear weight layout)"
        )
    check_dtype("x", x)
    check_dtype("w", w, x.dtype)
    if x.shape[0] != 1:
        y = F.linear(x, w, bias)
        return torch.relu(y) if relu else y
    k, n = w.shape
    cfg = default_config(k, n)
    cfg.update(config or {})
    if w.stride(1) != 1:
        w = w.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((1, k), dtype=x.dtype, device=x.device)
    pdl = use_pdl(x.device, cfg.get("pdl"))
    _gemv_kernel[(triton.cdiv(k, cfg["R"]),)](
        x, w, bias if bias is not None else w, y, k, n, w.stride(0),
        R=cfg["R"], BN=cfg["BN"], HAS_BIAS=bias is not None, RELU=bool(relu), PDL=pdl,
        PREFETCH=bool(cfg.get("prefetch", False)) and n <= cfg["BN"],
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1),
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y
