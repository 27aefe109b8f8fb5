"""Torch reference of the input-sparse down projection (also the CPU fallback)."""

from __future__ import annotations

import torch

from workbench.errors import KernelError


def sparse_down(
    a: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y = a @ w_down_t (+ bias), skipping the rows of w_down_t whose activation is zero on every
    token.

    a:        [T, d_ff] or [d_ff] activations (the down projection's input), fp16/bf16
    w_down_t: [d_ff, d_model], the down weight transposed once (row i = neuron i's output vector)
    bias:     [d_model] or None, added to the fp32 sum before the one rounding to a's dtype
    returns   [T, d_model] (or [d_model]) in a's dtype; fp32 accumulation.
    ``config`` is accepted for signature parity with the Triton launcher and ignored.
    """
    if bias is not None:
        _check_bias(bias, w_down_t, a.dtype)
    y = a.float() @ w_down_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(a.dtype)


def _check_bias(bias: torch.Tensor, w_down_t: torch.Tensor, dtype: torch.dtype) -> None:
    if bias.shape != (w_down_t.shape[-1],):
        raise KernelError(
            f"bias has shape {tuple(bias.shape)}; the down projection's bias is [d_model] = "
            f"[{w_down_t.shape[-1]}]"
        )
    if bias.dtype != dtype or bias.device != w_down_t.device:
        raise KernelError(
            f"bias is {bias.dtype} on {bias.device}; give it the activations' dtype ({dtype}) "
            f"on the weight's device ({w_down_t.device})"
        )
