"""ReLU-routed MoE blocks on the GPU: router GEMV (cuBLAS), then one row kernel that computes
the router scores (ReLU + RMSNorm + weight) in-kernel and reads only the active experts' up rows
(union over the tokens), then the sparse down projection over those experts' rows."""

from __future__ import annotations

import torch.nn.functional as F

from ..sparse_ffn.triton import launch_rows
from ..sparse_gemv.triton import sparse_down
from .reference import check_moe


def moe_blocks(x, w_router, norm_weight, w_up, w_down_t, *, eps=1e-6, config=None):
    """x [T, d_model]; w_router [E, d_model]; norm_weight [E]; w_up, w_down_t [E*d_e, d_model].

    config: optional {"rows": {...}, "down": {...}} block-shape overrides.
    """
    x2, was_1d, w_up, w_down_t, e, d_e = check_moe(x, w_router, norm_weight, w_up, w_down_t)
    config = config or {}
    a0 = F.linear(x2, w_router)
    if a0.stride(1) != 1:
        a0 = a0.contiguous()
    a = launch_rows(
        2, x2, a0, w_up, norm_weight=norm_weight, d_e=d_e, eps=eps, config=config.get("rows")
    )
    y = sparse_down(a, w_down_t, config=config.get("down"))
    return y[0] if was_1d else y
