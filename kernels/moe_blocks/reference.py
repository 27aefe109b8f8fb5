"""Torch reference of ReLU-routed MoE blocks (BlockFFN, arXiv 2507.08771; DECO-style layers).

Router: A0 = x W_r^T, A1 = ReLU(A0), A = RMSNorm(A1) * norm_weight (RMS over the experts).
Experts are non-gated MLPs E_i(x) = down_i(SiLU(up_i(x))); the output is sum_i A_i E_i(x).
Rounding: every step in the model dtype, as BlockFFNMLP computes it.
Weights are stacked: w_up [E * d_e, d_model] (expert i owns rows i*d_e .. (i+1)*d_e - 1) and
w_down_t [E * d_e, d_model] (the down weights transposed the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.errors import KernelError

from .._common import check_ffn
from ..sparse_gemv.reference import sparse_down


def router_scores(x, w_router, norm_weight, *, eps=1e-6):
    """A [T, E] = RMSNorm(ReLU(x @ w_router^T)) * norm_weight, rounded to x's dtype where the
    dense module (workbench.models.blockffn) rounds, returned in fp32."""
    a1 = torch.relu(F.linear(x, w_router)).float()
    nrm = (a1 * torch.rsqrt(a1.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (norm_weight.to(x.dtype) * nrm).float()


def check_moe(x, w_router, norm_weight, w_up, w_down_t):
    if w_up.dim() == 3:
        w_up = w_up.reshape(-1, w_up.shape[-1])
    if w_down_t.dim() == 3:
        w_down_t = w_down_t.reshape(-1, w_down_t.shape[-1])
    x2, was_1d = check_ffn(x, w_up, w_down_t)
    if w_router.dim() != 2 or w_router.shape[1] != x2.shape[1]:
        raise KernelError(f"w_router must be [E, d_model], got {tuple(w_router.shape)}")
    e = w_router.shape[0]
    if norm_weight.shape != (e,):
        raise KernelError(f"router norm weight must be [{e}], got {tuple(norm_weight.shape)}")
    if w_up.shape[0] % e != 0:
        raise KernelError(
            f"w_up has {w_up.shape[0]} rows, not a multiple of the {e} experts: stack the experts' "
            f"up weights as [E * d_e, d_model] (workbench.kernels.layout.stack_experts)"
        )
    d_e = w_up.shape[0] // e
    return x2, was_1d, w_up, w_down_t, e, d_e


def moe_blocks(x, w_router, norm_weight, w_up, w_down_t, *, eps=1e-6, config=None):
    """y [T, d_model] = sum_i A_i down_i(SiLU(up_i x)); only experts with A != 0 matter."""
    x2, was_1d, w_up, w_down_t, e, d_e = check_moe(x, w_router, norm_weight, w_up, w_down_t)
    a_exp = router_scores(x2, w_router, norm_weight, eps=eps).to(x2.dtype)  # [T, E]
    h = F.silu(F.linear(x2, w_up)) * a_exp.repeat_interleave(d_e, dim=1)
    y = sparse_down(h.to(x2.dtype), w_down_t)
    return y[0] if was_1d else y
