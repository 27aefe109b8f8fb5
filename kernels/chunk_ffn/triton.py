"""Chunk-union FFN on the GPU: T tokens (2..64) share one read of each weight row they need.

Default (gather.py): the gate through cuBLAS, the union of the chunk's active neurons built on
the device as a fixed-size index list, then gathered GEMMs over the listed up and down rows
(every listed row read once for the whole chunk). A block of neurons whose union holds more than
``dense_fraction`` of its rows is listed whole, so a chunk whose union is too large to pay reads
what the dense layer reads, decided on the device per block, without a host synchronisation.

config={"rows": {...}, "down": {...}} (or "fused_gate") selects the earlier path instead: the row
kernel and the sparse down kernel, which rank the union per block in registers (KERNEL_NOTES v4).
"""

from __future__ import annotations

from .._common import dense_count
from ..sparse_ffn.triton import sparse_ffn

_ROW_PATH_KEYS = ("rows", "down", "fused_gate")


def chunk_ffn(
    x, w_gate, w_up, w_down_t, *, activation="relu", threshold=0.0, dense_fraction=0.6, config=None
):
    """x [T, d_model] -> y [T, d_model]; see the module docstring."""
    dense_count(64, dense_fraction)  # validates the fraction
    config = dict(config or {})
    if not any(k in config for k in _ROW_PATH_KEYS):
        cfg = {"dense_fraction": dense_fraction, "gather": config.get("gather") or {}}
        return sparse_ffn(
            x, w_gate, w_up, w_down_t, activation=activation, threshold=threshold, config=cfg
        )
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
