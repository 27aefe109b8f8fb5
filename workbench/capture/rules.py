"""Rules deciding which neurons are active on a token (pinned project-wide).

For an FFN with activation a = act(gate) * up (gated) or act(up) (non-gated), per token:

- ``zero``               a_i != 0 (the default)
- ``fat(T)``             |act(gate)_i| > T for gated FFNs, |a_i| > T for non-gated ones
                         (FATReLU, ProSparse arXiv 2402.13516 uses T = 0.01)
- ``topk(k)``            the k largest |act(gate)_i| of each token (|a_i| for non-gated FFNs)
- ``magnitude(t)``       |a_i| * ||W_down[:, i]||_2 > t_layer (ReLU^2 Wins arXiv 2402.03804,
                         the CETT thresholds of Sparsing Law arXiv 2411.02335); t is one float or
                         a {layer: t} mapping

Every probe, metric and kernel uses `Rule.active(...)` or the elementwise form
`Rule.elementwise(...)` it is built from, so they agree on what "active" means.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from workbench.errors import CaptureError, WorkbenchError

RULE_KINDS = ("zero", "fat", "topk", "magnitude")


@dataclass(frozen=True)
class Rule:
    kind: str = "zero"
    threshold: float | None = None  # T for fat, t for a single magnitude threshold
    k: int | None = None
    per_layer: Mapping[int, float] = field(default_factory=dict)  # magnitude thresholds by layer

    def __post_init__(self):
        if self.kind not in RULE_KINDS:
            raise WorkbenchError(f"unknown rule {self.kind!r}; use one of zero, fat(T), topk(k), magnitude(t)")
        if self.kind == "fat" and (self.threshold is None or not self.threshold >= 0):
            raise WorkbenchError("fat(T) needs a threshold T >= 0, e.g. 'fat(0.01)'")
        if self.kind == "topk" and (self.k is None or self.k < 1):
            raise WorkbenchError("topk(k) needs k >= 1, e.g. 'topk(64)'")
        if self.kind == "magnitude" and self.threshold is None and not self.per_layer:
            raise WorkbenchError("magnitude(t) needs a threshold t or per-layer thresholds {layer: t}")

    # -- parsing / printing ---------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | Rule | None) -> Rule:
        """'zero', 'fat(0.01)', 'topk(32)', 'magnitude(0.5)' -> Rule."""
        if spec is None:
            return cls()
        if isinstance(spec, Rule):
            return spec
        s = str(spec).strip().lower().replace(" ", "")
        if s == "zero":
            return cls()
        m = re.fullmatch(r"(fat|topk|magnitude)\(([^)]+)\)", s)
        if not m:
            raise WorkbenchError(
                f"cannot parse rule {spec!r}; write zero, fat(T), topk(k) or magnitude(t), e.g. 'fat(0.01)'")
        kind, arg = m.groups()
        try:
            if kind == "topk":
                return cls(kind="topk", k=int(arg))
            return cls(kind=kind, threshold=float(arg))
        except ValueError as exc:
            raise WorkbenchError(f"rule {spec!r}: {arg!r} is not a number") from exc

    @classmethod
    def magnitude(cls, thresholds: float | Mapping[int, float]) -> Rule:
        if isinstance(thresholds, Mapping):
            return cls(kind="magnitude", per_layer={int(k): float(v) for k, v in thresholds.items()})
        return cls(kind="magnitude", threshold=float(thresholds))

    def __str__(self) -> str:
        if self.kind == "zero":
            return "zero"
        if self.kind == "topk":
            return f"topk({self.k})"
        if self.kind == "magnitude" and self.per_layer:
            return "magnitude(per-layer)"
        return f"{self.kind}({self.threshold:g})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "threshold": self.threshold, "k": self.k,
                "per_layer": {str(k): v for k, v in self.per_layer.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Rule:
        return cls(kind=d["kind"], threshold=d.get("threshold"), k=d.get("k"),
                   per_layer={int(k): float(v) for k, v in (d.get("per_layer") or {}).items()})

    # -- semantics ------------------------------------------------------------------------
    def needs_gate_act(self, gated: bool) -> bool:
        """Whether the rule reads act(gate) (hooked at the activation module) for this FFN."""
        return gated and self.kind in ("fat", "topk")

    def needs_down_norms(self) -> bool:
        return self.kind == "magnitude"

    def layer_threshold(self, layer: int) -> float:
        if self.kind == "magnitude" and self.per_layer:
            if layer not in self.per_layer:
                return math.inf if self.threshold is None else float(self.threshold)
            return float(self.per_layer[layer])
        return float(self.threshold or 0.0)

    def check_width(self, sites) -> None:
        """Refuse topk(k) with k above an FFN's d_ff (every neuron would count as active, silently);
        `sites` are FFN sites (with .layer, .name, .d_ff)."""
        if self.kind != "topk":
            return
        small = [s for s in sites if s.d_ff < self.k]
        if small:
            s = min(small, key=lambda s: s.d_ff)
            raise CaptureError(
                f"rule topk({self.k}) asks for more neurons than layer {s.layer} ({s.name}) has: d_ff = {s.d_ff}; "
                f"give k <= {s.d_ff} (topk(d_ff) marks every neuron active)")

    def elementwise(self, layer: int, gated: bool):
        """(source, threshold) for the elementwise rules: active = |src| * scale > threshold.

        source is "a" or "g" (act(gate)); scale is ||W_down[:, i]|| for magnitude, else 1.
        Returns None for topk, which is not elementwise.
        """
        if self.kind == "zero":
            return "a", 0.0
        if self.kind == "fat":
            return ("g" if gated else "a"), float(self.threshold)
        if self.kind == "magnitude":
            return "a", self.layer_threshold(layer)
        return None

    def active(self, a: torch.Tensor, g: torch.Tensor | None = None, *, layer: int = 0,
               gated: bool = False, down_norms: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of active neurons, same shape as `a` ([..., d_ff])."""
        if self.kind == "zero":
            return a != 0
        if self.kind == "fat":
            src = g if gated else a
            if src is None:
                raise WorkbenchError("fat(T) on a gated FFN needs act(gate); the capture hooks the activation module for it")
            return src.abs() > self.threshold
        if self.kind == "topk":
            src = (g if gated else a)
            if src is None:
                raise WorkbenchError("topk(k) on a gated FFN needs act(gate)")
            k = min(self.k, src.shape[-1])
            idx = src.abs().topk(k, dim=-1).indices
            return torch.zeros_like(src, dtype=torch.bool).scatter_(-1, idx, True)
        if down_norms is None:
            raise WorkbenchError("magnitude(t) needs the down projection's column norms")
        t = self.layer_threshold(layer)
        return (a.abs().to(down_norms.dtype) * down_norms) > t


def as_rule(spec) -> Rule:
    return Rule.parse(spec)
