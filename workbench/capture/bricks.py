"""Probes for the functional-partition ("bricks") analysis: co-activation and per-instance scores.

`CoActivation` keeps, per FFN, C[i, j] = number of valid tokens on which neurons i and j are both
active under the capture's rule (C[i, i] is neuron i's active count). Each call adds M^T M with
M the [N, d_ff] 0/1 active mask of its valid rows: one matmul on the model's device. The
per-call product is exact (0/1 inputs, fp32 accumulation, N <= 2^24 rows per product); the
running sum is int64 (CPU) or int32 on CUDA (exact up to 2^31 - 1 co-active tokens per pair,
half the memory: 11008^2 x 4 B = 485 MB per 7B layer). On CUDA the mask is bf16 and the product
is asked for in fp32 (`torch.mm(..., out_dtype=float32)`, tensor cores); where that is not
available the fp32 matmul is used (0/1 are exact in TF32 too). No activation is ever stored.

`InstanceScores` keeps, per FFN, a per-instance activation score s[instance, neuron] = mean |a|
over the instance's valid tokens, where an instance is one sequence of a forward call (rows
are [B * S] flattened from [B, S]), with the instance's data label. Under a rule other than
"zero" (e.g. the CETT magnitude rule for SiLU models) it also keeps the mean of |a| * active.
State is bounded: at most `budget` instances, a uniform sample when more are seen (reservoir by
random priorities; each new call's sorted keys are merged against the store's smallest keys with
fixed-size tensor ops, so no host sync and no growth). The keys of a call are drawn once and
shared by every layer, so every layer keeps the same instances in the same slots.
"""

from __future__ import annotations

import torch

from workbench.adapters.base import GATED
from workbench.capture.probes import Probe
from workbench.errors import CaptureError

_EXACT_ROWS = 1 << 24  # fp32 holds every integer up to 2^24 exactly
_MM_DTYPE_OK: dict[str, bool] = {}


def _coactive_product(m: torch.Tensor) -> torch.Tensor:
    """M^T M [d, d] float32 (exact counts) of a 0/1 matrix M [N, d] (bool)."""
    dev = m.device
    if dev.type == "cuda" and _MM_DTYPE_OK.get(str(dev), True):
        mb = m.to(torch.bfloat16)
        try:
            out = torch.mm(mb.t(), mb, out_dtype=torch.float32)
            _MM_DTYPE_OK[str(dev)] = True
            return out
        except (RuntimeError, TypeError):
            _MM_DTYPE_OK[str(dev)] = False
    mf = m.to(torch.float32)
    return mf.t() @ mf


class CoActivation(Probe):
    """Per FFN: co-active token counts [d_ff, d_ff] under the capture's rule (see module doc).

    layers: only these block indices (default all; memory is d_ff^2 per layer).
    """

    name = "coactivation"

    def __init__(self, layers: list[int] | None = None):
        super().__init__()
        self.layers = None if layers is None else sorted({int(x) for x in layers})

    def config(self):
        return {"layers": self.layers}

    def update(self, site, batch, ctx):
        if self.layers is not None and site.layer not in self.layers:
            return
        a, valid = batch.a, batch.valid
        st = self.state.get(site.name)
        if st is None:
            dt = torch.int32 if a.device.type == "cuda" else torch.int64
            st = self.state[site.name] = {
                "counts": torch.zeros(site.d_ff, site.d_ff, dtype=dt, device=a.device),
                "tokens": torch.zeros((), dtype=torch.int64, device=a.device)}
        active = ctx.rule.active(a, batch.g, layer=site.layer, gated=site.kind == GATED,
                                 down_norms=ctx.norms(site, a.device))
        if valid is not None:
            active = active & valid[:, None]
            st["tokens"] += valid.sum()
        else:
            st["tokens"] += a.shape[0]
        for i in range(0, active.shape[0], _EXACT_ROWS):
            st["counts"] += _coactive_product(active[i:i + _EXACT_ROWS]).to(st["counts"].dtype)


class InstanceScores(Probe):
    """Per FFN: mean |a| per instance (one sequence of a call) for at most `budget` instances,
    with their labels (see module doc). Fields per site: score [budget, d_ff] float32,
    score_rule (mean |a| * active, when the rule is not "zero"), label [budget] int64 (-1
    unlabelled), tokens [budget] int64 (valid tokens; 0 = empty slot), key [budget], seen
    (instances with a valid token seen)."""

    name = "instance_scores"

    def __init__(self, budget: int = 4096, seed: int = 0, layers: list[int] | None = None):
        super().__init__()
        if budget < 1:
            raise CaptureError("InstanceScores needs an instance budget >= 1")
        self.budget = int(budget)
        self.seed = int(seed)
        self.layers = None if layers is None else sorted({int(x) for x in layers})
        self._calls: dict[str, int] = {}
        self._keys: dict[int, torch.Tensor] = {}
        self._gens: dict[str, torch.Generator] = {}

    def config(self):
        return {"budget": self.budget, "seed": self.seed, "layers": self.layers}

    def _call_keys(self, site_name: str, b: int, device) -> torch.Tensor:
        """Random priorities [B] of this call's sequences, the same for every layer."""
        c = self._calls.get(site_name, 0)
        self._calls[site_name] = c + 1
        keys = self._keys.get(c)
        if keys is None or keys.shape[0] != b:
            g = self._gens.get(str(device))
            if g is None:
                g = self._gens[str(device)] = torch.Generator(device=device)
                g.manual_seed(self.seed)
            keys = self._keys[c] = torch.rand(b, generator=g, device=device)
            for old in [k for k in self._keys if k < c - 1]:
                del self._keys[old]
        return keys.to(device)

    def update(self, site, batch, ctx):
        if self.layers is not None and site.layer not in self.layers:
            return
        a, valid = batch.a, batch.valid
        n, d = a.shape
        b = batch.seqs
        if b is None or b < 1 or n % b:
            raise CaptureError(f"{site.name}: per-instance scores need the call's sequences (rows [B * S]); "
                               f"got {n} rows and B={b}. Call the model with input_ids [B, S] (and an "
                               "attention_mask), as wb.profile does")
        s = n // b
        with_rule = ctx.rule.kind != "zero"
        st = self.state.get(site.name)
        if st is None:
            z = lambda *shape, dt=torch.float32: torch.zeros(*shape, dtype=dt, device=a.device)  # noqa: E731
            st = self.state[site.name] = {
                "score": z(self.budget, d), "label": z(self.budget, dt=torch.int64) - 1,
                "tokens": z(self.budget, dt=torch.int64), "key": z(self.budget) - 1.0,
                "seen": z((), dt=torch.int64)}
            if with_rule:
                st["score_rule"] = z(self.budget, d)
        absa = a.abs().float()
        v = valid.view(b, s) if valid is not None else torch.ones(b, s, dtype=torch.bool, device=a.device)
        cnt = v.sum(1)  # [B]
        absa = torch.where(v.reshape(-1)[:, None], absa, torch.zeros((), device=a.device))
        denom = cnt.clamp(min=1).float()[:, None]
        new = {"score": absa.view(b, s, d).sum(1) / denom, "tokens": cnt,
               "label": (batch.labels.view(b, s)[:, 0] if batch.labels is not None
                         else torch.full((b,), -1, dtype=torch.int64, device=a.device))}
        if with_rule:
            act = ctx.rule.active(a, batch.g, layer=site.layer, gated=site.kind == GATED,
                                  down_norms=ctx.norms(site, a.device))
            new["score_rule"] = (absa * act).view(b, s, d).sum(1) / denom
        keys = self._call_keys(site.name, b, a.device)
        keys = torch.where(cnt > 0, keys, torch.full_like(keys, -1.0))  # empty sequences never enter
        st["seen"] += (cnt > 0).sum()
        if b > self.budget:
            top = keys.topk(self.budget).indices
            keys = keys[top]
            new = {k: t[top] for k, t in new.items()}
            b = self.budget
        # merge: new keys sorted descending against the store's b smallest keys ascending; pair j
        # replaces its slot iff its key is larger (this yields the top-`budget` keys of the union)
        order = keys.argsort(descending=True)
        slots = st["key"].topk(b, largest=False).indices  # ascending keys
        take = keys[order] > st["key"][slots]
        st["key"][slots] = torch.where(take, keys[order], st["key"][slots])
        for k, t in new.items():
            t = t[order]
            old = st[k][slots]
            st[k][slots] = torch.where(take.view(-1, *([1] * (t.dim() - 1))), t.to(old.dtype), old)

    def _merge_site(self, mine, theirs):
        keys = torch.cat([mine["key"], theirs["key"].to(mine["key"].device)])
        top = keys.topk(self.budget).indices
        for k in mine:
            if k != "seen":
                mine[k] = torch.cat([mine[k], theirs[k].to(mine[k].device)])[top]
        mine["seen"] = mine["seen"] + theirs["seen"].to(mine["seen"].device)
