"""Streaming quantile sketch of |a|: a log-bucketed histogram in the manner of DDSketch.

Algorithm: DDSketch (Masson, Rim, Lee, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch
with Relative-Error Guarantees", VLDB 2019). A positive value x falls in bucket
i = ceil(log_gamma(x)), gamma = (1 + alpha) / (1 - alpha); the bucket's representative
2 gamma^i / (gamma + 1) is within relative error alpha of every value in the bucket. Exact zeros
have a bucket of their own. Merging two sketches adds their counts, so the sketch is fully
mergeable and its size does not depend on the number of values.

Error bound: for every quantile q, the returned value v satisfies |v - x_q| <= alpha * x_q where
x_q is the exact lower q-quantile (the value of rank floor(q * (n - 1)) in sorted order), provided
x_q lies inside [min_value, max_value]; values outside that range are clamped into the end
buckets (reported as min_value / max_value). With the defaults (alpha = 0.01, range
[1e-8, 1e6]) the sketch has 1,614 buckets: 13 KB per layer in int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SketchSpec:
    alpha: float = 0.01
    min_value: float = 1e-8
    max_value: float = 1e6

    @property
    def gamma(self) -> float:
        return (1 + self.alpha) / (1 - self.alpha)

    @property
    def log_gamma(self) -> float:
        return math.log(self.gamma)

    @property
    def offset(self) -> int:
        """Bucket index of min_value; bucket 0 holds exact zeros."""
        return math.ceil(math.log(self.min_value) / self.log_gamma)

    @property
    def n_buckets(self) -> int:
        top = math.ceil(math.log(self.max_value) / self.log_gamma)
        return top - self.offset + 2  # +1 for the zero bucket, +1 inclusive range

    def bucket(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket index of each |x| (int64, same shape); 0 for exact zeros."""
        ax = x.abs().float()
        pos = ax > 0
        # log in float64 would be exact-er, but float32 only moves values sitting on a bucket
        # boundary by one bucket, which keeps them within 2 alpha; we compute in float64 on CPU
        # where it is cheap and in float32 on accelerators.
        if ax.device.type == "cpu":
            lg = torch.log(ax.double().clamp_min(self.min_value)) / self.log_gamma
        else:
            lg = torch.log(ax.clamp_min(self.min_value)) / self.log_gamma
        idx = torch.ceil(lg).long() - self.offset + 1
        idx = idx.clamp_(1, self.n_buckets - 1)
        return torch.where(pos, idx, torch.zeros_like(idx))

    def value(self, idx: torch.Tensor | int) -> torch.Tensor:
        """Representative value of bucket idx (0 -> 0.0)."""
        idx = torch.as_tensor(idx, dtype=torch.float64)
        i = idx + self.offset - 1
        rep = 2 * torch.pow(torch.tensor(self.gamma, dtype=torch.float64), i) / (self.gamma + 1)
        rep = rep.clamp(self.min_value, self.max_value)
        return torch.where(idx == 0, torch.zeros_like(rep), rep)

    def to_json(self) -> dict:
        return {"algorithm": "DDSketch", "alpha": self.alpha, "min_value": self.min_value,
                "max_value": self.max_value}


def quantiles(hist: torch.Tensor, qs, spec: SketchSpec) -> torch.Tensor:
    """Quantiles (lower, rank floor(q (n-1))) from a sketch histogram [n_buckets]."""
    hist = hist.double().cpu()
    n = hist.sum()
    qs_t = torch.as_tensor(qs, dtype=torch.float64)
    if n <= 0:
        return torch.full_like(qs_t, float("nan"))
    cum = hist.cumsum(0)
    ranks = torch.floor(qs_t * (n - 1))
    idx = torch.searchsorted(cum, ranks, right=True)
    return spec.value(idx.clamp(max=hist.numel() - 1))
