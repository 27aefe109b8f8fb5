"""The public functions of ``workbench.kernels`` (re-exported by its ``__init__``)."""

from __future__ import annotations

import importlib

import torch

# Load every op's sub-package here: importing a sub-package binds its name (sparse_ffn,
# chunk_ffn, moe_blocks) on the package, and __init__'s star import of this module, which runs
# afterwards, rebinds those names to the functions below.
from . import layout
from ._common import pick_backend, triton_available
from .chunk_ffn import reference as _chunk_ref  # noqa: F401
from .dense_gemv import reference as _dense_ref  # noqa: F401
from .moe_blocks.reference import router_scores
from .predictor.reference import default_width, predictor_logits
from .sparse_ffn import reference as _ffn_ref  # noqa: F401
from .sparse_gemv import reference as _gemv_ref  # noqa: F401

_OPS = {
    "sparse_down": "sparse_gemv",
    "gated_up": "sparse_ffn",
    "gate_up_predicted": "sparse_ffn",
    "sparse_ffn": "sparse_ffn",
    "sparse_ffn_predicted": "sparse_ffn",
    "plain_ffn_predicted": "sparse_ffn",
    "chunk_ffn": "chunk_ffn",
    "moe_blocks": "moe_blocks",
    "gemv": "dense_gemv",
}


def _dispatch(op: str, backend: str | None, tensors: list[torch.Tensor]):
    be = pick_backend(backend, *[t for t in tensors if isinstance(t, torch.Tensor)])
    mod = importlib.import_module(
        f".{_OPS[op]}.{'triton' if be == 'triton' else 'reference'}", __package__
    )
    return getattr(mod, op)


def sparse_down(a, w_down_t, *, bias=None, backend=None, config=None):
    """y [T, d_model] = a [T, d_ff] @ w_down_t [d_ff, d_model] (+ bias [d_model]), skipping zero
    activations; the bias is added in fp32 before the one rounding to a's dtype."""
    ts = [a, w_down_t] + ([bias] if bias is not None else [])
    return _dispatch("sparse_down", backend, ts)(a, w_down_t, bias=bias, config=config)


def gated_up(x, gate, w_up, *, activation="relu", threshold=0.0, backend=None, config=None):
    """a [T, d_ff] = act(gate) * (x @ w_up^T), up rows read only where act(gate) != 0."""
    f = _dispatch("gated_up", backend, [x, gate, w_up])
    return f(x, gate, w_up, activation=activation, threshold=threshold, config=config)


def gate_up_predicted(
    x, logits, w_gate, w_up, *, activation="relu", threshold=0.0, backend=None, config=None
):
    """a [T, d_ff] = act(x W_g^T) * (x W_u^T) * [logits > 0], rows read only where predicted."""
    f = _dispatch("gate_up_predicted", backend, [x, logits, w_gate, w_up])
    return f(x, logits, w_gate, w_up, activation=activation, threshold=threshold, config=config)


def sparse_ffn(
    x, w_gate, w_up, w_down_t, *, activation="relu", threshold=0.0, backend=None, config=None
):
    """Exact sparse gated FFN (gate dense): y [T, d_model]."""
    f = _dispatch("sparse_ffn", backend, [x, w_gate, w_up, w_down_t])
    return f(x, w_gate, w_up, w_down_t, activation=activation, threshold=threshold, config=config)


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
    backend=None,
    config=None,
    x_pred=None,
):
    """Gated FFN sparse on a Deja Vu predictor's mask (predictor included): y [T, d_model].
    x_pred [T, d_model]: the predictor's input when it is not x (a ProSparse-recipe predictor
    reads the residual stream entering the FFN block); None: x."""
    ts = [x, w_gate, w_up, w_down_t, w_pred1, w_pred2] + ([x_pred] if x_pred is not None else [])
    f = _dispatch("sparse_ffn_predicted", backend, ts)
    return f(
        x,
        w_gate,
        w_up,
        w_down_t,
        w_pred1,
        w_pred2,
        b_pred1=b_pred1,
        b_pred2=b_pred2,
        activation=activation,
        threshold=threshold,
        config=config,
        x_pred=x_pred,
    )


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
    backend=None,
    config=None,
    x_pred=None,
):
    """Plain (non-gated) FFN sparse on a Deja Vu predictor's mask (predictor included), OPT style:
    y [T, d_model] = act(x W_up^T + b_up) * [logits > 0] @ W_down^T + b_down; the logits read
    x_pred [T, d_model] where given (see `sparse_ffn_predicted`), else x."""
    ts = [x, w_up, w_down_t, w_pred1, w_pred2] + [b for b in (b_up, b_down, b_pred1, b_pred2, x_pred) if b is not None]
    f = _dispatch("plain_ffn_predicted", backend, ts)
    return f(x, w_up, w_down_t, w_pred1, w_pred2, b_up=b_up, b_down=b_down, b_pred1=b_pred1,
             b_pred2=b_pred2, activation=activation, threshold=threshold, config=config, x_pred=x_pred)  # fmt: skip


def chunk_ffn(
    x,
    w_gate,
    w_up,
    w_down_t,
    *,
    activation="relu",
    threshold=0.0,
    dense_fraction=0.6,
    backend=None,
    config=None,
):
    """Chunk-union gated FFN for T = 2..64 tokens (exact): y [T, d_model]."""
    f = _dispatch("chunk_ffn", backend, [x, w_gate, w_up, w_down_t])
    return f(
        x,
        w_gate,
        w_up,
        w_down_t,
        activation=activation,
        threshold=threshold,
        dense_fraction=dense_fraction,
        config=config,
    )


def gemv(x, w, bias=None, *, relu=False, backend=None, config=None):
    """y [T, K] = x [T, N] @ w [K, N]^T (+ bias), ReLU when `relu`: a dense GEMV, the Triton kernel
    for one token (the gate and predictor layers of the sparse FFN use it), F.linear otherwise."""
    ts = [x, w] + ([bias] if bias is not None else [])
    return _dispatch("gemv", backend, ts)(x, w, bias, relu=relu, config=config)


def moe_blocks(x, w_router, norm_weight, w_up, w_down_t, *, eps=1e-6, backend=None, config=None):
    """ReLU-routed MoE blocks (BlockFFN): y [T, d_model] = sum_i A_i down_i(SiLU(up_i x))."""
    f = _dispatch("moe_blocks", backend, [x, w_router, norm_weight, w_up, w_down_t])
    return f(x, w_router, norm_weight, w_up, w_down_t, eps=eps, config=config)


__all__ = [
    "gemv",
    "chunk_ffn",
    "default_width",
    "gate_up_predicted",
    "gated_up",
    "layout",
    "moe_blocks",
    "pick_backend",
    "plain_ffn_predicted",
    "predictor_logits",
    "router_scores",
    "sparse_down",
    "sparse_ffn",
    "sparse_ffn_predicted",
    "triton_available",
]
