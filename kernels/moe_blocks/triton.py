"""ReLU-routed MoE blocks on the GPU: router logits (a small Triton kernel), then one row kernel
that computes the router scores (ReLU + RMSNorm + weight) in-kernel and reads only the active
experts' up rows (union over the tokens), then the sparse down projection over those rows.

The router has its own kernel because cuBLAS picked a slow path for [T, d_model] x [E, d_model]^T
with an E like 43: 31.8 us on the H100 for T = 8 (benchmarks/KERNEL_NOTES.md), more than the
experts' up rows at CLS 0.8. One program per expert reads its router row once for all tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check_same_device
from ..sparse_ffn.triton import launch_rows
from ..sparse_gemv.triton import sparse_down
from .reference import check_moe


@triton.jit
def _router_logits_kernel(
    X, WR, OUT, T, D, stride_x, stride_out, T_PAD: tl.constexpr, BD: tl.constexpr
):
    e = tl.program_id(0)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    acc = tl.zeros([T_PAD, BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        d_ok = offs_d < D
        w = tl.load(WR + e * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        x = tl.load(
            X + offs_t[:, None] * stride_x + offs_d[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += x * w[None, :]
    tl.store(OUT + offs_t * stride_out + e, tl.sum(acc, axis=1), mask=t_ok)


def router_logits(x: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """A0 [T, E] = x @ w_router^T in fp32; x [T, d_model], w_router [E, d_model] (contiguous)."""
    check_same_device(x=x, w_router=w_router)
    t, d = x.shape
    e = w_router.shape[0]
    if not w_router.is_contiguous():
        w_router = w_router.contiguous()
    t_pad = triton.next_power_of_2(t)
    out = torch.empty((t, e), dtype=torch.float32, device=x.device)
    bd = max(128, min(1024, 8192 // t_pad))
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
        num_warps=4,
    )
    return out


def moe_blocks(x, w_router, norm_weight, w_up, w_down_t, *, eps=1e-6, config=None):
    """x [T, d_model]; w_router [E, d_model]; norm_weight [E]; w_up, w_down_t [E*d_e, d_model].

    config: optional {"rows": {...}, "down": {...}} block-shape overrides.
    """
    x2, was_1d, w_up, w_down_t, e, d_e = check_moe(x, w_router, norm_weight, w_up, w_down_t)
    config = config or {}
    a0 = router_logits(x2, w_router)
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
