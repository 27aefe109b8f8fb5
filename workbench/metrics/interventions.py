"""Apply an activation rule during a real forward pass: inactive neurons are set to zero in a.

    with intervene(model, Rule.magnitude({0: 0.1, 1: 0.2})):
        out = model(**batch)          # every FFN computes down(a * active(a))

A forward pre-hook on each FFN's down projection replaces its input a by ``a * mask`` with
``mask = rule.active(a, g, layer=..., gated=..., down_norms=...)`` (the same `Rule.active` every
probe uses); rules that read act(gate) (fat, topk on gated FFNs) also hook the activation
module. Every hook is removed in ``finally``, so the model is restored on exit, also after an
exception. The weights are never touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.adapters import GATED, FFNSite, Layout
from workbench.capture.rules import Rule
from workbench.errors import CaptureError
from workbench.metrics._data import ffn_sites


@dataclass
class Intervention:
    """The live state of one `intervene` block: the rule, its sites and the hook handles."""

    rule: Rule
    sites: list[FFNSite]
    handles: list = field(default_factory=list)
    calls: int = 0

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


@contextmanager
def intervene(model: nn.Module, rule, *, layout: Layout | None = None, layers: list[int] | None = None,
              keep: dict[int, torch.Tensor] | None = None):
    """Zero the inactive entries of every FFN's activation a under `rule` while the block runs.

    rule: "zero", "fat(T)", "topk(k)", "magnitude(t)" or a Rule (e.g. ``Rule.magnitude({layer: t})``
    with the CETT thresholds). layers: restrict to these block indices (default: all FFNs).
    keep: {layer: bool [d_ff]} a fixed per-neuron mask ANDed with the rule's (False = ablated on
    every token; with rule "zero" this is a pure neuron ablation); only those layers are hooked.
    Yields an `Intervention`; hooks are removed on exit.
    """
    rule = Rule.parse(rule)
    sites = ffn_sites(model, layout)
    if layers is not None:
        sites = [s for s in sites if s.layer in set(layers)]
    rule.check_width(sites)
    keep = dict(keep or {})
    if keep:
        have = {s.layer: s for s in sites}
        for layer, k in keep.items():
            if layer not in have:
                raise CaptureError(f"keep names layer {layer}, but the model's FFN layers are "
                                   f"{sorted(have)}; give masks only for those")
            if tuple(k.shape) != (have[layer].d_ff,) or k.dtype != torch.bool:
                raise CaptureError(f"keep[{layer}] must be a bool mask [d_ff={have[layer].d_ff}]; got "
                                   f"{k.dtype} {tuple(k.shape)}")
        sites = [s for s in sites if s.layer in keep]
    iv = Intervention(rule=rule, sites=sites)
    pending: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    if rule.needs_down_norms():
        norms = {s.name: s.down_column_norms() for s in sites}

    def act_hook(site):
        def hook(module, args, output):
            pending[site.name] = output
        return hook

    def down_hook(site, needs_g):
        def hook(module, args):
            a = args[0]
            g = None
            if needs_g:
                g = pending.pop(site.name, None)
                if g is None:
                    raise CaptureError(f"layer {site.layer} ({site.name}): rule {rule} needs act(gate) but the "
                                       "activation module was not called before the down projection")
            dn = norms.get(site.name)
            if dn is not None and dn.device != a.device:
                dn = norms[site.name] = dn.to(a.device)
            mask = rule.active(a, g, layer=site.layer, gated=site.kind == GATED, down_norms=dn)
            k = keep.get(site.layer)
            if k is not None:
                if k.device != a.device:
                    k = keep[site.layer] = k.to(a.device)
                mask = mask & k
            iv.calls += 1
            return (a * mask.to(a.dtype),) + tuple(args[1:])
        return hook

    try:
        for s in sites:
            needs_g = rule.needs_gate_act(s.kind == GATED)
            if needs_g:
                if s.act is None:
                    raise CaptureError(f"layer {s.layer} ({s.name}): rule {rule} needs act(gate) but the "
                                       "adapter found no activation module to hook")
                iv.handles.append(s.act.register_forward_hook(act_hook(s)))
            iv.handles.append(s.down.register_forward_pre_hook(down_hook(s, needs_g)))
        yield iv
    finally:
        iv.remove()
