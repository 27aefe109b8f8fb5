"""Dense one-token GEMV, y = act(x @ w^T + b): the torch reference (cuBLAS through F.linear).

Used for the dense parts of the sparse FFN paths (the gate in exact mode, the two predictor
layers); `triton.py` holds the fast path for one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    relu: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """y [T, K] = x [T, N] @ w [K, N]^T (+ bias [K]), then ReLU when `relu`."""
    y = F.linear(x, w, bias)
    return torch.relu(y) if relu else y
