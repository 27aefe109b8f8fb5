"""Chunk-level sparsity of a model: CLS_L, TLS and reuse ratio per layer, over experts or neurons.

Drives the forward passes through `wb.capture` with a `ChunkProbe` (no hooks of its own) and
reads its counts (BlockFFN arXiv 2507.08771; windows per sequence, over valid tokens only, tail
dropped; the same definitions as the pure functions of `chunk.py`):

- units="experts": the router's selection per token (ReLU routers: score != 0; top-k routers:
  the experts the router chose), decoded by `workbench.capture.routing.decode_router_output`;
- units="neurons" (dense FFNs): neuron active under `rule` (`Rule.active` on the down
  projection's input a, act(gate) where the rule needs it).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from workbench.adapters import locate
from workbench.capture.core import Capture
from workbench.capture.routing import ChunkProbe
from workbench.errors import AdapterError, WorkbenchError
from workbench.metrics._data import ffn_sites, model_device, token_batches

LENGTHS = (1, 2, 4, 8, 16, 32, 64)
UNITS = ("auto", "experts", "neurons")


def _check_lengths(lengths) -> tuple[int, ...]:
    """Window lengths L as a tuple of ints >= 1; a single int is one length."""
    if isinstance(lengths, bool):
        raise WorkbenchError(f"lengths={lengths!r}: give window lengths L >= 1, e.g. lengths=[1, 8, 64] or 8")
    if isinstance(lengths, int) or (hasattr(lengths, "__index__") and not hasattr(lengths, "__len__")):
        lengths = (lengths,)
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
        raise WorkbenchError(f"lengths={lengths!r}: give window lengths L >= 1, e.g. lengths=[1, 8, 64] or 8")
    got = tuple(lengths)
    if not got:
        raise WorkbenchError("lengths=(): give at least one window length L >= 1, e.g. lengths=[1, 8, 64]")
    out = []
    for L in got:
        if isinstance(L, bool) or not hasattr(L, "__index__") or int(L) < 1:
            raise WorkbenchError(f"lengths={list(got)!r}: window lengths must be whole numbers >= 1 (got {L!r})")
        out.append(int(L))
    return tuple(out)


def chunk_table(model: nn.Module, data, *, units: str = "auto", rule="zero", lengths=LENGTHS,
                tokenizer=None, batch_size: int = 8, max_length: int | None = 256,
                max_sequences: int | None = None) -> pd.DataFrame:
    """Tidy table of CLS_L: one row per (layer, L) plus layer = -1 for all layers pooled.

    Columns: layer, units ("experts" | "neurons"), L, cls, tls, reuse (tls and reuse repeat per L).
    units="auto" uses the routers where the model has any, else the dense FFN neurons.
    """
    if units not in UNITS:
        raise WorkbenchError(f"units={units!r}: use one of {UNITS}")
    lengths = _check_lengths(lengths)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    batches = token_batches(data, tokenizer=tok, batch_size=batch_size, max_length=max_length,
                            max_sequences=max_sequences)
    layout = locate(model)
    routers = layout.routers if units in ("auto", "experts") else []
    if units == "experts" and not routers:
        raise AdapterError(f"{type(model).__name__} has no router the adapters know; use units='neurons'")
    use_experts = bool(routers)
    if use_experts:
        sites = [(r.layer, r.name) for r in routers]
    else:
        sites = [(s.layer, s.name) for s in ffn_sites(model, layout)]
    probe = ChunkProbe("experts" if use_experts else "neurons", lengths=lengths, rule=rule)
    device = model_device(model)
    with Capture(model, probes=[probe], layout=layout) as cap, torch.no_grad():
        for ids, m in batches:
            model(input_ids=ids.to(device), attention_mask=m.to(device))
    tensors = cap.run.tensors
    zero = torch.zeros((), dtype=torch.float64)
    pooled = {}
    per_layer = []
    for layer, name in sites:
        st = {f: tensors.get(f"chunks/{name}/{f}", zero).double()
              for f in ("tls_num", "tls_den", "cls_num", "cls_den", "reuse_num", "reuse_den")}
        per_layer.append((layer, st))
        for f, v in st.items():
            pooled[f] = pooled.get(f, zero) + v
    rows = []
    for layer, st in [*per_layer, (-1, pooled)]:
        tls = 1.0 - float(st["tls_num"]) / float(st["tls_den"]) if float(st["tls_den"]) else float("nan")
        reuse = float(st["reuse_num"]) / float(st["reuse_den"]) if float(st["reuse_den"]) else float("nan")
        for j, L in enumerate(lengths):
            num, den = (float(st["cls_num"][j]), float(st["cls_den"][j])) if st["cls_num"].dim() else (0.0, 0.0)
            rows.append({"layer": layer, "units": "experts" if use_experts else "neurons", "L": L,
                         "cls": 1.0 - num / den if den else float("nan"), "tls": tls, "reuse": reuse})
    return pd.DataFrame(rows)
