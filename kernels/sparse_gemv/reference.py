"""Torch reference of the input-sparse down projection (also the CPU fallback)."""

from __future__ import annotations

import torch


def sparse_down(
    a: torch.Tensor, w_down_t: torch.Tensor, *, config: dict | None = None
) -> torch.Tensor:
    """y = a @ w_down_t, skipping the rows of w_down_t whose activation is zero on every token.

    a:        [T, d_ff] or [d_ff] activations (the down projection's input), fp16/bf16
    w_down_t: [d_ff, d_model], the down weight transposed once (row i = neuron i's output vector)
    returns   [T, d_model] (or [d_model]) in a's dtype; fp32 accumulation.
    ``config`` is accepted for signature parity with the Triton launcher and ignored.
    """
    return (a.float() @ w_down_t.float()).to(a.dtype)
