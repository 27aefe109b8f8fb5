"""Probes: streaming reducers over what a capture sees, one state per site.

FFN probes (`Probe`, site_kind "ffn") see the down projection's input of every FFN. Site probes
(`SiteProbe`) watch other sites the adapters locate: routers ("router"), SSM mixers ("mixer") or
the model's own call ("model"); each names the modules it needs hooked (`points`) and the
capture registers those hooks with every other hook, so they are removed together.

Each probe has `update(site, batch)` and `merge(other)`; its state lives on the device of the
activations it sees, and its size does not depend on the number of tokens. Updates never read a
value back to the host, so a capture adds no synchronisation to a forward pass.

A `Batch` holds, for one FFN call: a [N, d_ff] (the down projection's input), g [N, d_ff] or
None (act(gate), when the rule needs it), valid [N] bool or None (attention_mask != 0) and
token_ids [N] or None, labels [N] int64 or None (the data label of each row's sequence, when
the data carries labels: `wb.profile(..., labels=...)`, names in run.meta["labels"]), seqs: the
number B of sequences of the call (rows are [B * S] flattened from [B, S]) or None when the call
gave neither an attention mask nor input ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workbench.adapters.base import GATED, FFNSite
from workbench.capture.rules import Rule
from workbench.capture.sketch import SketchSpec
from workbench.errors import CaptureError


@dataclass
class Batch:
    a: torch.Tensor
    g: torch.Tensor | None
    valid: torch.Tensor | None
    token_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [N] label id per row (profile(labels=...)), else None
    seqs: int | None = None  # B, the call's sequences: rows are [B * S] flattened from [B, S]


class Probe:
    """Base class: per-site tensors in `self.state[site_name][field]`."""

    name = "probe"
    site_kind = "ffn"

    def __init__(self):
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def config(self) -> dict:
        return {}

    def update(self, site: FFNSite, batch: Batch, ctx: ProbeContext) -> None:
        raise NotImplementedError

    def merge(self, other: Probe) -> Probe:
        """Fold `other` (same probe type and config, e.g. from another process) into self."""
        if type(other) is not type(self) or other.config() != self.config():
            raise CaptureError(f"cannot merge {type(other).__name__}{other.config()} into "
                               f"{type(self).__name__}{self.config()}: probes differ")
        for site, fields in other.state.items():
            if site not in self.state:
                self.state[site] = {k: v.clone() for k, v in fields.items()}
            else:
                self._merge_site(self.state[site], fields)
        return self

    def _merge_site(self, mine: dict, theirs: dict) -> None:
        for k, v in theirs.items():
            mine[k] += v.to(mine[k].device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}/{site}/{k}": v for site, fields in self.state.items() for k, v in fields.items()}

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        prefix = self.name + "/"
        for key, v in flat.items():
            if key.startswith(prefix):
                site, field = key[len(prefix):].rsplit("/", 1)
                self.state.setdefault(site, {})[field] = v


@dataclass
class ProbeContext:
    rule: Rule
    down_norms: dict[str, torch.Tensor]

    def norms(self, site: FFNSite, device) -> torch.Tensor | None:
        n = self.down_norms.get(site.name)
        if n is None:
            return None
        if n.device != device:
            n = n.to(device)
            self.down_norms[site.name] = n
        return n


def _where_valid(x: torch.Tensor, valid: torch.Tensor | None, fill=0):
    if valid is None:
        return x
    return torch.where(valid[:, None], x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


class NeuronStats(Probe):
    """Per neuron: active count under the run's rule, nonzero count, sum |a|, max |a| (exact
    int64 / float64 accumulators), plus the layer's token count and non-finite count."""

    name = "neuron_stats"

    def _init(self, site: FFNSite, device) -> dict:
        d = site.d_ff
        z = lambda dt: torch.zeros(d, dtype=dt, device=device)  # noqa: E731
        return {"active": z(torch.int64), "nonzero": z(torch.int64), "abs_sum": z(torch.float64),
                "abs_max": z(torch.float64), "tokens": torch.zeros((), dtype=torch.int64, device=device),
                "nonfinite": torch.zeros((), dtype=torch.int64, device=device)}

    def update(self, site, batch, ctx):
        a, valid = batch.a, batch.valid
        st = self.state.get(site.name)
        if st is None:
            st = self.state[site.name] = self._init(site, a.device)
        active = ctx.rule.active(a, batch.g, layer=site.layer, gated=site.kind == GATED,
                                 down_norms=ctx.norms(site, a.device))
        absa = a.abs()
        if valid is not None:
            active = active & valid[:, None]
            nz = (a != 0) & valid[:, None]
            absa = _where_valid(absa, valid)
            st["tokens"] += valid.sum()
            st["nonfinite"] += (~torch.isfinite(a) & valid[:, None]).sum()
        else:
            nz = a != 0
            st["tokens"] += a.shape[0]
            st["nonfinite"] += (~torch.isfinite(a)).sum()
        st["active"] += active.sum(0)
        st["nonzero"] += nz.sum(0)
        st["abs_sum"] += absa.sum(0, dtype=torch.float64)
        if absa.shape[0]:
            st["abs_max"] = torch.maximum(st["abs_max"], absa.amax(0).double())

    def _merge_site(self, mine, theirs):
        for k, v in theirs.items():
            v = v.to(mine[k].device)
            if k == "abs_max":
                mine[k] = torch.maximum(mine[k], v)
            else:
                mine[k] += v


class AbsSketch(Probe):
    """Per layer, a DDSketch of |a| over every valid (token, neuron) pair (see sketch.py)."""

    name = "abs_sketch"

    def __init__(self, spec: SketchSpec | None = None):
        super().__init__()
        self.spec = spec or SketchSpec()

    def config(self):
        return self.spec.to_json()

    def update(self, site, batch, ctx):
        a, valid = batch.a, batch.valid
        st = self.state.get(site.name)
        if st is None:
            st = self.state[site.name] = {
                "hist": torch.zeros(self.spec.n_buckets, dtype=torch.int64, device=a.device)}
        idx = self.spec.bucket(a)
        if valid is not None:
            # invalid positions go to an overflow bin that is dropped: no data-dependent shapes
            idx = torch.where(valid[:, None], idx, torch.full_like(idx, self.spec.n_buckets))
        st["hist"] += torch.bincount(idx.reshape(-1), minlength=self.spec.n_buckets + 1)[: self.spec.n_buckets]


class ActivationSample(Probe):
    """A uniform random sample of at most `budget` valid tokens' activation rows per layer.

    Reservoir sampling by random priorities (keep the `budget` largest uniform keys), done with
    fixed-size tensors on the device: memory is budget x d_ff whatever the token count.
    """

    name = "activation_sample"

    def __init__(self, budget: int = 256, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if budget < 1:
            raise CaptureError("ActivationSample needs a token budget >= 1")
        self.budget = int(budget)
        self.seed = seed
        self.dtype = dtype
        self._gens: dict = {}

    def config(self):
        return {"budget": self.budget}

    def _gen(self, device):
        g = self._gens.get(str(device))
        if g is None:
            g = self._gens[str(device)] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    def update(self, site, batch, ctx):
        a, valid = batch.a, batch.valid
        n = a.shape[0]
        st = self.state.get(site.name)
        if st is None:
            st = self.state[site.name] = {
                "acts": torch.zeros(self.budget, site.d_ff, dtype=self.dtype, device=a.device),
                "keys": torch.full((self.budget,), -1.0, device=a.device),
                "token_ids": torch.full((self.budget,), -1, dtype=torch.int64, device=a.device)}
        keys = torch.rand(n, generator=self._gen(a.device), device=a.device)
        if valid is not None:
            keys = torch.where(valid, keys, torch.full_like(keys, -1.0))
        tids = batch.token_ids if batch.token_ids is not None else torch.full((n,), -1, dtype=torch.int64,
                                                                              device=a.device)
        all_keys = torch.cat([st["keys"], keys])
        top = all_keys.topk(self.budget).indices
        st["keys"] = all_keys[top]
        st["acts"] = torch.cat([st["acts"], a.to(self.dtype)])[top]
        st["token_ids"] = torch.cat([st["token_ids"], tids.to(a.device)])[top]

    def _merge_site(self, mine, theirs):
        keys = torch.cat([mine["keys"], theirs["keys"].to(mine["keys"].device)])
        top = keys.topk(self.budget).indices
        for k in ("acts", "token_ids"):
            mine[k] = torch.cat([mine[k], theirs[k].to(mine[k].device)])[top]
        mine["keys"] = keys[top]

    def samples(self, site_name: str) -> torch.Tensor:
        """The sampled rows [n <= budget, d_ff] (slots never filled are dropped)."""
        st = self.state[site_name]
        return st["acts"][st["keys"] >= 0]


@dataclass
class HookPoint:
    """A module a site probe wants hooked: `when` "pre" (inputs only) or "post" (with output)."""

    module: nn.Module
    role: str = "output"
    when: str = "post"


@dataclass
class ModelSite:
    """The model itself as a site (site_kind "model"): its own forward call."""

    module: nn.Module
    layer: int = -1
    name: str = "model"


@dataclass
class SiteCall:
    """What a site probe sees at one hook call.

    args / kwargs: the hooked module's inputs; output: its output (None for "pre" points).
    mask / input_ids: the current model call's attention_mask [B, S] and input_ids (or None).
    `rows(n, device)` gives (valid [n] bool or None, token_ids [n] or None) for a tensor of n
    token rows of this call (the last n // B positions of each sequence, as the FFN probes get).
    """

    role: str
    args: tuple
    kwargs: dict
    output: Any
    mask: torch.Tensor | None
    input_ids: torch.Tensor | None
    call_index: int
    _rows: Any = field(default=None, repr=False)
    _labels: Any = field(default=None, repr=False)
    labels: torch.Tensor | None = None  # [B] label id per sequence of this call, or None

    def rows(self, n: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self._rows(n, device)

    def row_labels(self, n: int, device) -> torch.Tensor | None:
        """The data label id of each of n token rows ([n] int64; -1 unlabelled), or None."""
        return self._labels(n, device)


class SiteProbe(Probe):
    """Base class of probes on routers, SSM mixers or the model call (not FFN activations).

    Subclasses set `site_kind` ("router" | "mixer" | "model"), may override `sites(layout,
    model)` and `points(site)`, and implement `observe(site, call)`. The capture owns the hooks.
    """

    site_kind = "router"

    def sites(self, layout, model) -> list:
        if self.site_kind == "router":
            return list(layout.routers)
        if self.site_kind == "mixer":
            return list(layout.mixers)
        if self.site_kind == "model":
            return [ModelSite(model)]
        raise CaptureError(f"{type(self).__name__}: unknown site_kind {self.site_kind!r}")

    def points(self, site) -> list[HookPoint]:
        return [HookPoint(site.module)]

    def observe(self, site, call: SiteCall) -> None:
        raise NotImplementedError

    def update(self, site, batch, ctx):  # FFN batches never reach a site probe
        raise CaptureError(f"{type(self).__name__} is a {self.site_kind} probe, not an FFN probe")

    def finish(self, run) -> None:
        """Called once when the capture ends (before the state moves to the host)."""


PROBES = {"neuron_stats": NeuronStats, "abs_sketch": AbsSketch, "activation_sample": ActivationSample}


def default_probes() -> list[Probe]:
    """NeuronStats only. AbsSketch is opt-in: its per-layer histogram costs ~0.9 ms per
    [2048, 11008] bf16 activation on an H100 (Triton's tl.histogram), ~15x the rest of the fused
    reduction, which would break the capture's ~3 % prefill budget."""
    return [NeuronStats()]


def make_probes(spec) -> list[Probe]:
    """Probe instances from a list of instances and/or names ('neuron_stats', 'abs_sketch',
    'activation_sample')."""
    if spec is None:
        return default_probes()
    out = []
    for p in spec:
        if isinstance(p, Probe):
            out.append(p)
        elif isinstance(p, str) and p in PROBES:
            out.append(PROBES[p]())
        else:
            raise CaptureError(f"unknown probe {p!r}; use one of {sorted(PROBES)} or a Probe instance")
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise CaptureError(f"probe listed twice: {names}")
    return out
