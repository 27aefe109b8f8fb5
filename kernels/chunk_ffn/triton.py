"""Chunk-union FFN on the GPU: T tokens (2..64) share one read of each weight row they need.

The kernels of sparse_ffn and sparse_gemv already take the union of active neurons across the
tokens they are given (per block, in registers) and use tl.dot over the padded token axis; this
wrapper sets the dense fallback: a block whose union covers more than ``dense_fraction`` of its
rows is read densely (no compaction work), so a chunk whose union is too large costs what the
dense layer costs, decided on the device per block, without a host synchronisation.
"""

from __future__ import annotations

from ..sparse_ffn.triton import sparse_ffn


def chunk_ffn(
    x, w_gate, w_up, w_down_t, *, activation="relu", threshold=0.0, dense_fraction=0.6, config=None
):
    """x [T, d_model] -> y [T, d_model]; see the module docstring."""
    from .._common import dense_count

    dense_count(64, dense_fraction)  # validates the fraction
    config = dict(config or {})
    rows = dict(config.get("rows") or {})
    down = dict(config.get("down") or {})
    rows.setdefault("dense_fraction", dense_fraction)
    down.setdefault("dense_fraction", dense_fraction)
    return sparse_ffn(
        x,
        w_gate,
        w_up,
        w_down_t,
        activation=activation,
        threshold=threshold,
        config={"rows": rows, "down": down, "fused_gate": config.get("fused_gate", False)},
    )
