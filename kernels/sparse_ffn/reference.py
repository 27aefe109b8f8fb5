"""Torch references of the output-sparse gate/up, the sparse gated FFN and the predicted plain
FFN (CPU fallback).

Same signatures as sparse_ffn.triton; fp32 dot products, rounded like the dense HF FFN: gate and
up to the model dtype, the product act(g) * u to the model dtype (the down projection's input
`a`, as the kernels store it), the output in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import check_activation, check_ffn
from ..sparse_gemv.reference import sparse_down


def _check_mask(name: str, src: torch.Tensor, t: int, r: int) -> torch.Tensor:
    """The gate / predictor logits that decide the mask must be [T, d_ff] (as the kernels check)."""
    from workbench.errors import KernelError

    s = src.reshape(t, -1) if src.dim() == 1 else src
    if s.dim() != 2 or tuple(s.shape) != (t, r):
        raise KernelError(f"{name} must be [{t}, {r}] (tokens x d_ff), got {tuple(src.shape)}")
    return s


def _act(g: torch.Tensor, thr: float) -> torch.Tensor:
    return torch.where(g > thr, g, torch.zeros_like(g))


def gated_up(x, gate, w_up, *, activation="relu", threshold=0.0, config=None):
    """a = act(gate) * (x @ w_up^T), exact mode (gate computed densely beforehand).

    x [T, d_model]; gate [T, d_ff] (pre-activation); w_up [d_ff, d_model] -> a [T, d_ff].
    """
    thr = check_activation(activation, threshold)
    x2, was_1d = check_ffn(x, w_up)
    g = _check_mask("gate", gate, x2.shape[0], w_up.shape[0]).float()
    # round up (and the product) to the model dtype exactly as the dense FFN does, so that the
    # sparse FFN computes the dense model's function bit for bit on the active neurons
    up = (x2.float() @ w_up.float().t()).to(x2.dtype).float()
    a = (_act(g, thr).to(x2.dtype).float() * up).to(x2.dtype)
    return a[0] if was_1d else a


def gate_up_predicted(x, logits, w_gate, w_up, *, activation="relu", threshold=0.0, config=None):
    """a = act(x @ w_gate^T) * (x @ w_up^T) * [logits > 0], per token (predicted mode)."""
    thr = check_activation(activation, threshold)
    x2, was_1d = check_ffn(x, w_up, w_gate=w_gate)
    lg = _check_mask("logits", logits, x2.shape[0], w_up.shape[0]).float()
    xf = x2.float()
    # gate and up rounded to the model dtype, as the dense FFN computes them, then the product
    g = (xf @ w_gate.float().t()).to(x2.dtype).float()
    up = (xf @ w_up.float().t()).to(x2.dtype).float()
    a = (_act(g, thr) * up * (lg > 0)).to(x2.dtype)
    return a[0] if was_1d else a


def sparse_ffn(x, w_gate, w_up, w_down_t, *, activation="relu", threshold=0.0, config=None):
    """Gated ReLU/FATReLU FFN, y = (act(x W_g^T) * (x W_u^T)) W_down^T, exact sparsity.

    The gate is computed densely in the model dtype (as cuBLAS does on the fast path).
    x [T, d_model]; w_gate, w_up, w_down_t [d_ff, d_model] -> y [T, d_model].
    """
    x2, was_1d = check_ffn(x, w_up, w_down_t, w_gate)
    gate = F.linear(x2, w_gate)
    a = gated_up(x2, gate, w_up, activation=activation, threshold=threshold)
    y = sparse_down(a, w_down_t)
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
    """Gated FFN with gate and up both sparse on a Deja Vu predictor's mask (logit > 0)."""
    from ..predictor.reference import predictor_input, predictor_logits

    x2, was_1d = check_ffn(x, w_up, w_down_t, w_gate)
    logits = predictor_logits(predictor_input(x_pred, x2), w_pred1, w_pred2, b_pred1, b_pred2)
    a = gate_up_predicted(x2, logits, w_gate, w_up, activation=activation, threshold=threshold)
    y = sparse_down(a, w_down_t)
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
    """Plain (non-gated) FFN with a Deja Vu predictor (OPT's fc1 -> ReLU -> fc2):
    y = act(x W_up^T + b_up) * [logits > 0] @ W_down^T + b_down.

    x [T, d_model]; w_up, w_down_t [d_ff, d_model]; b_up [d_ff], b_down [d_model] or None.
    The up projection with its bias is rounded once to the model dtype (as F.linear), the output
    once after the down bias (as `sparse_down`).
    """
    from .._common import check_bias
    from ..predictor.reference import predictor_input, predictor_logits

    thr = check_activation(activation, threshold)
    x2, was_1d = check_ffn(x, w_up, w_down_t)
    check_bias("b_up", b_up, w_up.shape[0], x2, "the up projection's bias [d_ff]")
    check_bias("b_down", b_down, w_up.shape[1], x2, "the down projection's bias [d_model]")
    logits = predictor_logits(predictor_input(x_pred, x2), w_pred1, w_pred2, b_pred1, b_pred2)
    u = x2.float() @ w_up.float().t()
    if b_up is not None:
        u = u + b_up.float()
    u = u.to(x2.dtype).float()
    a = torch.where((u > thr) & (logits > 0), u, torch.zeros_like(u)).to(x2.dtype)
    y = sparse_down(a, w_down_t, bias=b_down)
    return y[0] if was_1d else y
