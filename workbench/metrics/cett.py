"""CETT and the per-layer CETT thresholds (ReLU^2 Wins arXiv 2402.03804; Sparsing Law arXiv 2411.02335).

For an FFN with activation a (the down projection's input, [tokens, d_ff]) and W_down
[d_model, d_ff], neuron i's output on a token is n_i = a_i * W_down[:, i], so
||n_i|| = |a_i| * ||W_down[:, i]||_2. For a threshold t:

    CETT(t) = mean over valid tokens of || sum_{i: ||n_i|| <= t} n_i ||_2 / || FFN(x) ||_2

with FFN(x) = W_down a + b (the down projection's bias b where it has one; the truncated sum
never includes b). Tokens whose FFN output is exactly zero have no defined ratio and are left
out of the mean. Padding never enters: only valid (attention_mask != 0) tokens are collected.

Inner search: per layer, the largest t among `n_candidates` evenly spaced candidates from the
minimum to the `quantile` (0.99) quantile of ||n_i|| over valid (token, neuron) pairs with
CETT(t) <= target, by binary search (as the public Sparsing Law code does, 65,536 candidates).
When even the smallest candidate exceeds the target, t = 0 (which is the `zero` rule).
At run time neuron i is inactive when ||n_i|| <= t, i.e. `Rule.magnitude({layer: t})`.
All arithmetic is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from workbench.adapters import FFNSite
from workbench.capture.rules import Rule
from workbench.errors import CaptureError, WorkbenchError
from workbench.metrics._data import collect, ffn_sites, token_batches

_CHUNK = 2048


def _down(site: FFNSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = site.down_weight().detach()
    b = getattr(site.down, "bias", None)
    return w, (b.detach() if isinstance(b, torch.Tensor) else None)


def _prep(a, w_down, bias, valid):
    a = a.reshape(-1, a.shape[-1])
    if valid is not None:
        a = a[valid.reshape(-1).to(a.device) != 0]
    if a.shape[0] == 0:
        raise CaptureError("CETT needs at least one valid token; the activations given are empty or all padding")
    w = w_down.to(a.device, torch.float64)
    if w.shape[1] != a.shape[1]:
        raise WorkbenchError(f"W_down {tuple(w.shape)} does not match a [tokens, {a.shape[1]}]: pass W_down as [d_model, d_ff]")
    b = bias.to(a.device, torch.float64) if bias is not None else None
    return a, w, b


class LayerCETT:
    """CETT of one layer over fixed activations, with memoised evaluations for the searches.

    a: [tokens, d_ff] (valid tokens only, or give `valid`), w_down: [d_model, d_ff], bias: [d_model].
    """

    def __init__(self, a: torch.Tensor, w_down: torch.Tensor, bias: torch.Tensor | None = None, *,
                 valid: torch.Tensor | None = None, n_candidates: int = 65536, quantile: float = 0.99,
                 name: str = "", layer: int = 0):
        a, w, b = _prep(a, w_down, bias, valid)
        self.name, self.layer = name, layer
        if not torch.isfinite(a).all():
            raise CaptureError(f"layer {layer} ({name}): NaN/Inf in the FFN activations; check the model's dtype and weights")
        self.a = a.to(torch.float64)
        self.w = w
        self.col_norms = w.norm(dim=0)  # [d_ff]
        full_norms = []
        for i in range(0, self.a.shape[0], _CHUNK):
            f = self.a[i:i + _CHUNK] @ w.t()
            if b is not None:
                f = f + b
            full_norms.append(f.norm(dim=1))
        self.full_norms = torch.cat(full_norms)  # [tokens]
        self.keep = self.full_norms > 0
        if not bool(self.keep.any()):
            raise CaptureError(f"layer {layer} ({name}): the FFN output is zero on every token; CETT is undefined")
        flat = (self.a.abs() * self.col_norms).reshape(-1)
        lo = float(flat.min())
        k = max(1, min(flat.numel(), int(round(quantile * flat.numel()))))
        hi = float(flat.kthvalue(k).values) if flat.numel() > 1 else lo
        self.candidates = torch.linspace(lo, max(hi, lo), int(n_candidates), dtype=torch.float64)
        self._memo: dict[int, float] = {}

    def neuron_norms(self) -> torch.Tensor:
        """||n_i|| = |a_i| * ||W_down[:, i]|| for every token, [tokens, d_ff] float64."""
        return self.a.abs() * self.col_norms

    def cett(self, t: float) -> float:
        """CETT(t) over this layer's tokens."""
        total = torch.zeros((), dtype=torch.float64, device=self.a.device)
        for i in range(0, self.a.shape[0], _CHUNK):
            a = self.a[i:i + _CHUNK]
            small = (a.abs() * self.col_norms) <= t
            resid = (a * small) @ self.w.t()
            keep = self.keep[i:i + _CHUNK]
            total += (resid.norm(dim=1)[keep] / self.full_norms[i:i + _CHUNK][keep]).sum()
        return float(total) / int(self.keep.sum())

    def activation_ratio(self, t: float) -> float:
        """Fraction of (token, neuron) pairs with ||n_i|| > t (active under magnitude(t))."""
        return float(((self.a.abs() * self.col_norms) > t).double().mean())

    def _at(self, idx: int) -> float:
        v = self._memo.get(idx)
        if v is None:
            v = self._memo[idx] = self.cett(float(self.candidates[idx]))
        return v

    def search(self, target: float) -> tuple[float, float]:
        """(t, CETT(t)): the largest candidate t with CETT(t) <= target (binary search)."""
        n = self.candidates.numel()
        if self._at(0) > target:
            return 0.0, self.cett(0.0)
        lo, hi = 0, n - 1
        if self._at(hi) <= target:
            return float(self.candidates[hi]), self._at(hi)
        while hi - lo > 1:  # invariant: CETT(c[lo]) <= target < CETT(c[hi])
            mid = (lo + hi) // 2
            if self._at(mid) <= target:
                lo = mid
            else:
                hi = mid
        return float(self.candidates[lo]), self._at(lo)


def check_target(target, name: str = "target") -> float:
    """A CETT target is a fraction of the FFN output's norm in [0, 1], the range ppl_sparsity bisects
    (0.2 is the Sparsing Law's usual value; 0 is the `zero` rule); raise WorkbenchError naming `name`
    otherwise."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) \
            or not 0 <= target <= 1:
        raise WorkbenchError(f"{name}={target!r}: a CETT target is the fraction of the FFN output's norm the "
                             "inactive neurons may carry, a number in [0, 1] (e.g. 0.2)")
    return float(target)


def cett(a: torch.Tensor, w_down: torch.Tensor, t: float, *, bias: torch.Tensor | None = None,
         valid: torch.Tensor | None = None) -> float:
    """CETT(t) of activations a [..., d_ff] with W_down [d_model, d_ff] (valid: mask [...])."""
    return LayerCETT(a, w_down, bias, valid=valid, n_candidates=2).cett(t)


def cett_search(a: torch.Tensor, w_down: torch.Tensor, target: float, *, bias: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, n_candidates: int = 65536, quantile: float = 0.99
                ) -> tuple[float, float]:
    """(t, CETT(t)): the largest candidate t with CETT(t) <= target for one layer."""
    check_target(target)
    return LayerCETT(a, w_down, bias, valid=valid, n_candidates=n_candidates, quantile=quantile).search(target)


@dataclass
class CETTCalibration:
    """Per-layer CETT state over captured activations of a model; `thresholds(target)` is the
    inner search for every layer."""

    layers: list[LayerCETT]
    sites: list[FFNSite] = field(default_factory=list)

    @classmethod
    def from_model(cls, model: nn.Module, data, *, tokenizer=None, batch_size: int = 8,
                   max_length: int | None = 256, max_tokens: int | None = 4096,
                   n_candidates: int = 65536, quantile: float = 0.99) -> CETTCalibration:
        sites = ffn_sites(model)
        batches = token_batches(data, tokenizer=tokenizer if tokenizer is not None else getattr(model, "tokenizer", None),
                                batch_size=batch_size, max_length=max_length)
        rows = collect(model, batches, sites=sites, max_tokens=max_tokens, dtype=torch.float64)
        layers = []
        for s in sites:
            w, b = _down(s)
            layers.append(LayerCETT(rows[s.name]["a"], w, b, n_candidates=n_candidates, quantile=quantile,
                                    name=s.name, layer=s.layer))
        return cls(layers, sites)

    def thresholds(self, target: float) -> dict[int, float]:
        return {lc.layer: lc.search(target)[0] for lc in self.layers}

    def rule(self, target: float) -> Rule:
        check_target(target)
        return Rule.magnitude(self.thresholds(target))

    def table(self, target: float) -> pd.DataFrame:
        """One row per layer: layer, name, target, threshold, cett, activation_ratio, tokens."""
        check_target(target)
        rows = []
        for lc in self.layers:
            t, c = lc.search(target)
            rows.append({"layer": lc.layer, "name": lc.name, "target": float(target), "threshold": t,
                         "cett": c, "activation_ratio": lc.activation_ratio(t), "tokens": int(lc.a.shape[0])})
        return pd.DataFrame(rows)


def cett_thresholds(model: nn.Module, data, target: float = 0.2, **kwargs) -> pd.DataFrame:
    """Per-layer CETT thresholds of `model` at a CETT `target` (see CETTCalibration.table)."""
    check_target(target)
    return CETTCalibration.from_model(model, data, **kwargs).table(target)


def cett_curve(model: nn.Module, data, targets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
               *, calibration: CETTCalibration | None = None, **kwargs) -> pd.DataFrame:
    """Tidy table of the inner search over several targets: one row per (layer, target)."""
    if isinstance(targets, (int, float)):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise WorkbenchError("targets=[]: give at least one CETT target in [0, 1], e.g. [0.1, 0.2]")
    for t in targets:
        check_target(t, "targets")
    cal = calibration or CETTCalibration.from_model(model, data, **kwargs)
    return pd.concat([cal.table(t) for t in targets], ignore_index=True)
