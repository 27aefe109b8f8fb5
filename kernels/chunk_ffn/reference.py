"""Torch reference of the chunk-union FFN (BlockFFN's scheme for T tokens at once)."""

from __future__ import annotations

from workbench.errors import KernelError

from ..sparse_ffn.reference import sparse_ffn


def chunk_ffn(
    x, w_gate, w_up, w_down_t, *, activation="relu", threshold=0.0, dense_fraction=0.6, config=None
):
    """Gated ReLU FFN over a chunk of T tokens; exact, so identical to the dense FFN.

    The fast path reads each weight row once for the whole chunk when any token needs it (the
    union), and falls back to reading a block densely when more than ``dense_fraction`` of its
    rows are in the union. x [T, d_model] -> y [T, d_model].
    """
    if not 0.0 < dense_fraction <= 1.0:
        raise KernelError(f"dense_fraction={dense_fraction} must lie in (0, 1]")
    return sparse_ffn(x, w_gate, w_up, w_down_t, activation=activation, threshold=threshold)


def union_fraction(a_or_gate, threshold: float = 0.0):
    """Fraction of neurons active on at least one token of the chunk (1 - CLS for this chunk)."""
    return (a_or_gate.float() > threshold).any(0).float().mean()
