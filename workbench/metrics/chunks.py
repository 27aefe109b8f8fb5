"""Chunk-level sparsity of a model: CLS_L, TLS and reuse ratio per layer, over experts or neurons.

Drives the forward passes and feeds activity masks to the pure functions of `chunk.py`
(BlockFFN arXiv 2507.08771; windows per sequence, over valid tokens only, tail dropped):

- units="experts", ReLU routers (BlockFFN / DECO): expert active iff its router score != 0
  (a forward hook on the router module's output);
- units="experts", top-k softmax routers (Mixtral, Qwen2-MoE, OLMoE): the top_k experts of the
  router logits per token;
- units="neurons" (dense FFNs): neuron active under `rule` (`Rule.active` on the down
  projection's input a, act(gate) where the rule needs it).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from workbench.adapters import GATED, locate
from workbench.capture.rules import Rule
from workbench.errors import AdapterError, CaptureError, WorkbenchError
from workbench.metrics._data import ffn_sites, model_device, token_batches
from workbench.metrics.chunk import ChunkSparsityMeter

LENGTHS = (1, 2, 4, 8, 16, 32, 64)


def _router_sites(model: nn.Module) -> list[tuple[int, str, nn.Module, str, int | None]]:
    """(layer, name, module, kind, top_k) of every router, from the adapters or BlockFFN's class."""
    out = []
    try:
        layout = locate(model)
        out = [(r.layer, r.name, r.module, r.kind, r.top_k) for r in layout.routers]
    except AdapterError:
        layout = None
    if not out:
        from workbench.adapters.base import layer_index
        from workbench.models.blockffn import BlockFFNRouter

        out = [(layer_index(n), n, m, "relu", None) for n, m in model.named_modules() if isinstance(m, BlockFFNRouter)]
    return out


def chunk_table(model: nn.Module, data, *, units: str = "auto", rule="zero", lengths=LENGTHS,
                tokenizer=None, batch_size: int = 8, max_length: int | None = 256,
                max_sequences: int | None = None) -> pd.DataFrame:
    """Tidy table of CLS_L: one row per (layer, L) plus layer = -1 for all layers pooled.

    Columns: layer, units ("experts" | "neurons"), L, cls, tls, reuse (tls and reuse repeat per L).
    units="auto" uses the routers where the model has any, else the dense FFN neurons.
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    batches = token_batches(data, tokenizer=tok, batch_size=batch_size, max_length=max_length,
                            max_sequences=max_sequences)
    lengths = tuple(int(L) for L in lengths)
    if any(L < 1 for L in lengths):
        raise WorkbenchError(f"window lengths must be >= 1, got {lengths}")
    routers = _router_sites(model) if units in ("auto", "experts") else []
    if units == "experts" and not routers:
        raise AdapterError(f"{type(model).__name__} has no router the adapters know; use units='neurons'")
    use_experts = bool(routers)
    rule = Rule.parse(rule)
    masks: dict[int, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    handles = []
    state = {"shape": None}

    def put(layer, act):
        b, s = state["shape"]
        masks[layer] = act.reshape(b, s, -1)

    if use_experts:
        for layer, name, mod, kind, top_k in routers:
            def hook(m, args, output, layer=layer, kind=kind, top_k=top_k, name=name):
                t = output[0] if isinstance(output, (tuple, list)) else output
                if not torch.isfinite(t).all():
                    raise CaptureError(f"layer {layer} ({name}): NaN/Inf router outputs; check dtype and weights")
                if kind == "relu":
                    put(layer, t != 0)
                else:
                    k = top_k or getattr(getattr(model, "config", None), "num_experts_per_tok", None) or 1
                    idx = t.float().topk(int(k), dim=-1).indices
                    put(layer, torch.zeros_like(t, dtype=torch.bool).scatter_(-1, idx, True))
            handles.append(mod.register_forward_hook(hook))
        layer_ids = [r[0] for r in routers]
    else:
        sites = ffn_sites(model)
        norms = {s.name: s.down_column_norms() for s in sites} if rule.needs_down_norms() else {}
        for s in sites:
            needs_g = rule.needs_gate_act(s.kind == GATED)
            if needs_g:
                handles.append(s.act.register_forward_hook(
                    lambda m, a, out, name=s.name: pending.__setitem__(name, out)))

            def dhook(m, args, s=s, needs_g=needs_g):
                a = args[0]
                if not torch.isfinite(a).all():
                    raise CaptureError(f"layer {s.layer} ({s.name}): NaN/Inf FFN activations; check dtype and weights")
                g = pending.pop(s.name, None) if needs_g else None
                dn = norms.get(s.name)
                put(s.layer, rule.active(a, g, layer=s.layer, gated=s.kind == GATED,
                                         down_norms=None if dn is None else dn.to(a.device)))
            handles.append(s.down.register_forward_pre_hook(dhook))
        layer_ids = [s.layer for s in sites]
    meters = {L: ChunkSparsityMeter(lengths) for L in layer_ids}
    device = model_device(model)
    try:
        with torch.no_grad():
            for ids, m in batches:
                state["shape"] = tuple(ids.shape)
                masks.clear()
                model(input_ids=ids.to(device), attention_mask=m.to(device))
                for layer in layer_ids:
                    if layer not in masks:
                        raise CaptureError(f"layer {layer}: no activity was recorded in this forward pass")
                    meters[layer].update(masks[layer], m.to(masks[layer].device))
    finally:
        for h in handles:
            h.remove()
    total = ChunkSparsityMeter(lengths)
    for mt in meters.values():
        total.merge(mt)
    rows = []
    for layer, mt in [*meters.items(), (-1, total)]:
        r = mt.result()
        for L in lengths:
            rows.append({"layer": layer, "units": "experts" if use_experts else "neurons", "L": L,
                         "cls": r[f"cls_{L}"], "tls": r["tls"], "reuse": r["reuse"]})
    return pd.DataFrame(rows)
