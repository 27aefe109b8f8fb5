"""Deja Vu style per-layer activation predictor: Linear(d, w) - ReLU - Linear(w, d_ff).

A neuron is predicted active where its logit is > 0 (sigmoid >= 0.5). Both linears are dense
GEMVs; for one token the fast path runs them through the Triton GEMV (kernels/dense_gemv: 1.8x
cuBLAS at 1024x4096, KERNEL_NOTES v8), see predictor/triton.py; the mask itself is applied
inside the sparse row kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.errors import KernelError


def default_width(d_model: int) -> int:
    """min(1024, d_model / 4), the width the benchmarks and the accelerator use by default."""
    return min(1024, d_model // 4)


def predictor_logits(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [T, d_ff] = relu(x @ w1^T + b1) @ w2^T + b2.

    x [T, d_model]; w1 [w, d_model]; w2 [d_ff, w]; biases optional.
    """
    check_predictor(x, w1, w2)
    return F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2)


def predictor_input(x_pred: torch.Tensor | None, x2: torch.Tensor) -> torch.Tensor:
    """The predictor's input [T, d]: `x_pred` (e.g. the residual stream entering the FFN block,
    which a ProSparse-recipe predictor reads) when given, else the FFN input x2 [T, d_model]."""
    if x_pred is None:
        return x2
    xp = x_pred.reshape(-1, x_pred.shape[-1])
    if xp.shape[0] != x2.shape[0] or xp.device != x2.device:
        raise KernelError(
            f"x_pred {tuple(x_pred.shape)} on {x_pred.device} does not match the FFN input "
            f"{tuple(x2.shape)} on {x2.device}: give the predictor's input for the same tokens"
        )
    return xp.to(x2.dtype).contiguous()


def check_predictor(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != x.shape[-1] or w2.shape[1] != w1.shape[0]:
        raise KernelError(
            f"predictor weights do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)} "
            f"(want [width, d_model]), w2 {tuple(w2.shape)} (want [d_ff, width])"
        )
