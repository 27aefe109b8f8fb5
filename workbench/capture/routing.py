"""Routing probes: what every MoE router decides, as streaming state on the model's device.

`RoutingProbe` hooks the router modules that the adapters locate (transformers 5 fuses the
experts, so the router is the one place where the decision is visible) and keeps, per layer:

- ``counts [E]`` int64: valid tokens that selected each expert; ``mass [E]`` float64: the
  routing weight they gave it (the weight the MoE multiplies the expert's output by);
- ``active_hist [E + 1]`` int64: tokens by number of selected experts (variable for ReLU routers);
- ``entropy``, ``margin`` float64 sums: per-token entropy (nats) of the router's distribution p
  and its top-1 margin p_(1) - p_(2) (p: see `decode_router_output`);
- ``cosel [E, E]`` int64: tokens that selected both a and b, over all pairs (diagonal = counts);
- ``reuse_num`` float64 / ``reuse_den`` int64: consecutive-token reuse |S_i n S_i+1| / |S_i|;
- ``cls_num`` / ``cls_den [len(lengths)]`` int64: CLS_L window unions (BlockFFN arXiv 2507.08771;
  per sequence, over valid tokens, tail dropped; TLS comes from ``counts``);
- ``label_counts [labels, E]`` / ``label_tokens [labels]``: per data label (`profile(labels=...)`);
- ``vocab_counts [V, E]`` / ``vocab_tokens [V]`` int32: per input (or next) token id (ids >= V not kept;
  V = min(vocab size, vocab_cells // E));
- a token sample: the first ``budget`` valid tokens in reading order, with token id, sequence,
  position, data label and each layer's selection and weights ``[budget, E]``;
- ``shared_gate`` float64: sum of sigmoid(shared expert gate) (Qwen2-MoE), when the model has one.

Sequences are taken per forward call (a prefill); windows and consecutive pairs do not cross
calls. Nothing here reads a device value back to the host during the capture.

`ChunkProbe` keeps only the TLS / CLS_L / reuse counts, over router experts or over FFN neurons
(under the run's rule); `workbench.metrics.chunks.chunk_table` runs on it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from workbench.adapters.base import GATED
from workbench.capture.probes import HookPoint, ModelSite, SiteProbe
from workbench.capture.rules import Rule
from workbench.errors import AdapterError, CaptureError

LENGTHS = (1, 2, 4, 8, 16, 32, 64)
ROUTER_KINDS = ("topk_softmax", "sigmoid_topk", "topk_logits", "relu")


@dataclass
class RouterOut:
    """One router call, decoded: selected [N, E] bool, weights [N, E] float32 (0 where not
    selected), probs [N, E] float32 (the router's distribution over experts)."""

    selected: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor


def _describe(output) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of ({', '.join(_describe(o) for o in output)})"
    return f"a {type(output).__name__}"


def decode_router_output(site, output) -> RouterOut:
    """Turn a router module's output into (selected, weights, probs) per token row.

    Formats (transformers 5.17 to 5.25, and the zoo's BlockFFN):
    - ``(logits [N, E], top-k weights [N, k], top-k indices [N, k])``: Mixtral, Qwen2/3-MoE,
      OLMoE, DeepSeek-V3, GPT-OSS routers. The weights are the router's own (renormalised or
      not, scaled or not, as the family does); p is softmax(logits) for "topk_softmax" and
      "topk_logits" and sigmoid(logits) / sum for "sigmoid_topk".
    - one tensor ``[..., E]``: "relu" routers (BlockFFN, DECO) give the scores A (an expert is
      selected iff A != 0, weight A, p = A / sum A, all-zero rows p = 0); a softmax router
      that is a plain Linear (older transformers) gives logits, and the probe takes the top_k
      of softmax(logits), weights the probabilities.
    Anything else raises AdapterError naming what was seen and what to register.
    """
    kind = site.kind
    e = int(site.n_experts)
    if kind not in ROUTER_KINDS:
        raise AdapterError(f"router {site.name} has router_kind {kind!r}; the routing probe knows "
                           f"{list(ROUTER_KINDS)}: register an adapter with one of them "
                           "(wb.register_adapter(wb.Adapter(..., router_kind=...), override=True))")
    if (isinstance(output, (tuple, list)) and len(output) >= 3 and all(isinstance(o, torch.Tensor) for o in output[:3])
            and not output[2].is_floating_point() and output[0].shape[-1] == e):
        logits = output[0].reshape(-1, e)
        idx = output[2].reshape(logits.shape[0], -1).long()
        w = output[1].reshape(logits.shape[0], -1).float()
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)
        if w.shape == idx.shape:
            weights = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, idx, w)
        elif w.shape[-1] == e:
            weights = torch.where(selected, w, torch.zeros_like(w))
        else:
            raise AdapterError(f"router {site.name} returned top-k weights of shape {tuple(output[1].shape)} "
                               f"for indices of shape {tuple(output[2].shape)}; expected [tokens, k] or "
                               "[tokens, experts]")
        if kind == "sigmoid_topk":
            s = torch.sigmoid(logits.float())
            probs = s / s.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(logits, -1, dtype=torch.float32)
        return RouterOut(selected, weights, probs)
    if isinstance(output, torch.Tensor) and output.shape[-1] == e and e > 0:
        t = output.reshape(-1, e).float()
        if kind == "relu":
            selected = t != 0
            a = t.clamp_min(0)
            probs = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            return RouterOut(selected, torch.where(selected, t, torch.zeros_like(t)), probs)
        if kind == "topk_softmax" and site.top_k:
            probs = torch.softmax(t, -1)
            idx = probs.topk(int(site.top_k), -1).indices
            selected = torch.zeros_like(t, dtype=torch.bool).scatter_(1, idx, True)
            return RouterOut(selected, torch.where(selected, probs, torch.zeros_like(probs)), probs)
    raise AdapterError(
        f"router {site.name} (router_kind {kind!r}, {e} experts) returned {_describe(output)}; the "
        "routing probe reads either (logits [tokens, E], top-k weights [tokens, k], top-k indices "
        "[tokens, k]) or one score tensor [..., E]. Register an adapter whose `router` path names "
        "a module with one of these outputs (wb.register_adapter(wb.Adapter(..., router=..., "
        "router_kind=...), override=True))")


# -- device-side counts over [B, S, U] activity (no host sync) ---------------------------------

def compact(active: torch.Tensor, valid: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq [G*B, S, U], n_valid [B, 1]): each sequence's valid tokens moved to the front, in order
    (the rest zero). active [G*B, S, U] bool: G groups (layers) of the same B sequences, group-major,
    already False at invalid positions; valid [B, S] bool (left or right padding, or holes)."""
    order = torch.sort(valid.to(torch.uint8), dim=1, descending=True, stable=True).indices
    b, s = valid.shape
    u = active.shape[-1]
    seq = active.reshape(groups, b, s, u).gather(2, order[None, ..., None].expand(groups, -1, -1, u))
    return seq.reshape(groups * b, s, u), valid.sum(1, keepdim=True)


_WINDOWS: dict = {}
_CUMSUM_MAX = 1 << 23  # window_union_counts: largest G x B x P x U for the cumulative-sum path


def _padded(s: int) -> int:
    return max(64, 1 << max(int(s) - 1, 0).bit_length())


def _window_table(s: int, lengths, dev) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(padded length P >= s, window ends then starts [2W], ends [W], length index [W]) of every
    window of every length in `lengths` over P positions; P is a power of two (>= 64), so one table serves
    every call length up to it. Made once per (P, lengths, device): a host-to-device copy."""
    pad = _padded(s)
    key = (pad, tuple(lengths), str(dev))
    hit = _WINDOWS.get(key)
    if hit is None:
        st, en, li = [], [], []
        for j, L in enumerate(lengths):
            m = pad // L
            st += range(0, m * L, L)
            en += range(L, (m + 1) * L, L)
            li += [j] * m
        if len(_WINDOWS) > 32:
            _WINDOWS.clear()
        bounds = torch.tensor(en + st, dtype=torch.int64, device=dev)
        hit = _WINDOWS[key] = (pad, bounds, bounds[: len(en)], torch.tensor(li, dtype=torch.int64, device=dev))
    return hit


def window_union_counts(seq: torch.Tensor, n_valid: torch.Tensor, lengths,
                        lens: torch.Tensor | None = None, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS_L counts from `compact`'s output: (active unions summed over windows and units,
    windows x units), int64 [len(lengths)] each; with groups G > 1 (seq [G*B, S, U], G layers of
    the same sequences) the unions are [G, len(lengths)] (the windows x units are the same for
    every group). Windows of L valid tokens per sequence, from its first valid token; the tail
    is dropped.

    Few units (router experts): every window of every length at once, from one cumulative sum
    (a unit is active in a window iff its count grows across it): a fixed number of kernels,
    int32 temporaries of about 5 x G x B x S x U. Many units (FFN neurons) or long calls: unions
    by reshape, a length that is a multiple of an earlier one built from that one's unions (less
    memory, a few kernels per length)."""
    gb, s, u = seq.shape
    b = gb // groups
    dev = seq.device
    nl = len(lengths)
    if s > 0 and gb * _padded(s) * u <= _CUMSUM_MAX:
        pad, bounds, ends, lid = _window_table(s, lengths, dev)
        cs = torch.nn.functional.pad(seq.cumsum(1, dtype=torch.int32), (0, 0, 1, pad - s))  # [G*B, P + 1, U]
        at = cs.index_select(1, bounds)  # [G*B, 2W, U]: at every window's end, then at its start
        w = ends.shape[0]
        cnt = (at[:, :w] - at[:, w:] > 0).sum(-1)  # [G*B, W] unions
        okw = ends <= n_valid  # [B, W]: the window lies within the sequence's valid tokens
        if groups == 1:
            both = torch.stack([(cnt * okw).sum(0), okw.sum(0) * u])
            out = torch.zeros(2, nl, dtype=torch.int64, device=dev).index_add_(1, lid, both)
            return out[0], out[1]
        # [G + 1, W]: each group's unions, then the windows x units (the same for every group)
        both = torch.cat([(cnt.reshape(groups, b, w) * okw).sum(1), (okw.sum(0) * u)[None]])
        out = torch.zeros(groups + 1, nl, dtype=torch.int64, device=dev).index_add_(1, lid, both)
        return out[:groups], out[groups]
    if lens is None:  # pass it cached: a host-to-device copy waits for the stream on CUDA
        lens = torch.tensor(list(lengths), dtype=torch.int64, device=dev)
    n_win = n_valid // lens  # [B, n_L]
    dens = n_win.sum(0) * u
    unions: dict[int, torch.Tensor] = {1: seq}
    pos = torch.arange(s, device=dev)
    nums = []
    for j, L in enumerate(lengths):
        if L not in unions:
            base = max(x for x in unions if L % x == 0)
            cur, f = unions[base], L // base
            w = cur.shape[1]
            if w % f:
                cur = torch.cat([cur, cur.new_zeros(gb, f - w % f, u)], 1)
            unions[L] = cur.reshape(gb, -1, f, u).any(2)
        cur = unions[L]
        ok = pos[: cur.shape[1]][None, :] < n_win[:, j:j + 1]  # [B, W]
        nums.append((cur.reshape(groups, b, -1, u) & ok[None, ..., None]).sum((1, 2, 3)))
    num = torch.stack(nums, -1)  # [G, n_L]
    return (num[0], dens) if groups == 1 else (num, dens)


def _arange(n: int, dev) -> torch.Tensor:
    """arange(n) on `dev`, made once per (n, device) (a few sizes: call lengths)."""
    key = ("arange", n, str(dev))
    t = _WINDOWS.get(key)
    if t is None:
        if len(_WINDOWS) > 32:
            _WINDOWS.clear()
        t = _WINDOWS[key] = torch.arange(n, device=dev)
    return t


def reuse_sums(seq: torch.Tensor, n_valid: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over consecutive valid pairs with |S_i| > 0 of |S_i n S_i+1| / |S_i| (float64),
    number of such pairs (int64)), from `compact`'s output; [G] each with groups G > 1."""
    gb, s, u = seq.shape
    if s < 2:
        z = torch.zeros(() if groups == 1 else (groups,), device=seq.device)
        return z.double(), z.long()
    size = seq[:, :-1].sum(-1)
    # a pair past the valid tokens meets an all-False row: its intersection (and ratio) is 0
    ratio = (seq[:, :-1] & seq[:, 1:]).sum(-1).double() / size.clamp_min(1)
    ok = (size.reshape(groups, gb // groups, s - 1) > 0) & (_arange(s, seq.device)[1:] < n_valid)
    if groups == 1:
        return ratio.sum(), ok.sum()
    return ratio.reshape(groups, -1).sum(1), ok.reshape(groups, -1).sum(1)


def _lens(probe, device) -> torch.Tensor:
    """The probe's window lengths as a device tensor, made once per device."""
    cache = probe.__dict__.setdefault("_lens_cache", {})
    t = cache.get(str(device))
    if t is None:
        t = cache[str(device)] = torch.tensor(list(probe.lengths), dtype=torch.int64, device=device)
    return t


def _batch_shape(call, n: int) -> int:
    """Sequences in this call: from the attention mask or the ids (1 when neither is known)."""
    for t in (call.mask, call.input_ids):
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] and n % t.shape[0] == 0:
            return int(t.shape[0])
    return 1


class _RouterSites(SiteProbe):
    site_kind = "router"

    def sites(self, layout, model):
        found = super().sites(layout, model)
        for r in found:
            if r.kind not in ROUTER_KINDS:
                raise AdapterError(f"router {r.name} has router_kind {r.kind!r}; the routing probe knows "
                                   f"{list(ROUTER_KINDS)}: register an adapter naming one of them")
            if not r.n_experts:
                raise AdapterError(f"router {r.name}: the adapters found no expert count (no "
                                   "num_experts attribute or weight); register an adapter for the family")
        return found


_SAMPLE_IDS = ("token", "rank", "seq", "pos", "label")
# RoutingProbe's per-layer counters, packed in one int64 and one float64 row per layer (see
# _Bank): (field, shape given e experts and n_l window lengths). The router update writes the
# leading columns up to and including "seqs"; the shared-expert gate the last one.
_INT_FIELDS = (("counts", lambda e, nl: (e,)), ("active_hist", lambda e, nl: (e + 2,)), ("tokens", lambda e, nl: ()),
               ("cosel", lambda e, nl: (e, e)), ("cls_num", lambda e, nl: (nl,)), ("cls_den", lambda e, nl: (nl,)),
               ("reuse_den", lambda e, nl: ()), ("seqs", lambda e, nl: ()), ("shared_gate_tokens", lambda e, nl: ()))
_FLOAT_FIELDS = (("mass", lambda e, nl: (e,)), ("entropy", lambda e, nl: ()), ("margin", lambda e, nl: ()),
                 ("reuse_num", lambda e, nl: ()), ("shared_gate", lambda e, nl: ()))
_STASH_MAX_BYTES = 256 << 20  # router outputs held back within one forward call before an early update
_BATCH_BYTES = 256 << 20  # largest float64 table of one batch of layers counted together


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Bank:
    """The state of all routers with the same expert count on one device, stacked by layer:
    ``ints [layers, K_i]`` / ``floats [layers, K_f]`` (the counters of _INT_FIELDS / _FLOAT_FIELDS
    side by side), ``label_counts [layers, labels, E]``, ``label_tokens [layers, labels]``,
    ``vocab_counts [layers, V, E]``, ``vocab_tokens [layers, V]`` and the token sample
    ``sample_ids [layers, budget + 1, 5]``, ``sample_weights`` / ``sample_selected [layers,
    budget + 1, E]`` (the last slot is the dump slot that padding and tokens past the budget are
    written to: fixed shapes, no host sync). One update covers every layer of a forward call.

    Each router's fields in ``probe.state[name]`` are views into its row (``views``); a field that
    was replaced from outside (a merge, load_state_dict) is copied back in before the next update."""

    _uids = itertools.count()

    def __init__(self, names: list[str], e: int, nl: int, v: int, budget: int, device):
        self.names, self.e, self.budget, self.device = list(names), e, budget, device
        self.uid, self.version = next(_Bank._uids), 0  # CUDA graphs are made per (uid, version)
        self.row = {n: i for i, n in enumerate(self.names)}
        ly = len(self.names)
        z = lambda *shape, dt=torch.int64: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        self.ispec = [(k, f(e, nl)) for k, f in _INT_FIELDS]
        self.fspec = [(k, f(e, nl)) for k, f in _FLOAT_FIELDS]
        self.n_router_ints = sum(_numel(s) for k, s in self.ispec[:-1])
        self.n_router_floats = sum(_numel(s) for k, s in self.fspec[:-1])
        self.t = {"ints": z(ly, sum(_numel(s) for _, s in self.ispec)),
                  "floats": z(ly, sum(_numel(s) for _, s in self.fspec), dt=torch.float64),
                  "label_counts": z(ly, 0, e), "label_tokens": z(ly, 0),
                  "vocab_counts": z(ly, v, e, dt=torch.int32), "vocab_tokens": z(ly, v, dt=torch.int32)}
        if budget:
            self.t.update(sample_ids=torch.full((ly, budget + 1, len(_SAMPLE_IDS)), -1, dtype=torch.int64, device=device),
                          sample_weights=z(ly, budget + 1, e, dt=torch.float32),
                          sample_selected=z(ly, budget + 1, e, dt=torch.bool))
        self.views: dict[str, dict] = {}
        self.fresh = dict.fromkeys(self.names, True)  # rows never handed out (still all zero / -1)
        self._snap: dict[str, dict] = {}
        self._index: dict[tuple, torch.Tensor] = {}
        self._col = {}
        off = 0
        for k, s in self.ispec:
            self._col[k] = off
            off += _numel(s)
        off = 0
        for k, s in self.fspec:
            self._col[k] = off
            off += _numel(s)
        for n in self.names:
            self._make_views(n)

    def _make_views(self, name: str) -> None:
        i = self.row[name]
        d = {}
        for buf, spec in (("ints", self.ispec), ("floats", self.fspec)):
            off = 0
            for k, s in spec:
                m = _numel(s)
                d[k] = self.t[buf][i, off:off + m].view(s)
                off += m
        for k, t in self.t.items():
            if k not in ("ints", "floats"):
                d[k] = t[i]
        self.views[name] = d
        self._snap[name] = dict(d)

    def intact(self, name: str, state: dict | None) -> bool:
        snap = self._snap[name]
        return state is self.views[name] and len(state) == len(snap) and all(state.get(k) is v for k, v in snap.items())

    def adopt(self, name: str, state: dict) -> dict:
        """Copy a router's state dict (from a merge or load_state_dict; {} = cleared) into its row;
        a fresh dict of views into the row."""
        src_all = dict(state)  # `state` may be the views dict itself, with replaced fields
        labels = max((src_all[k].shape[0] for k in ("label_counts", "label_tokens") if k in src_all), default=0)
        self.grow_labels(labels)
        d = dict(self._snap[name])
        for k, v in d.items():
            src = src_all.get(k)
            if src is None:
                v.fill_(-1) if k == "sample_ids" else v.zero_()
                continue
            src = src.to(v.device)
            if k in ("label_counts", "label_tokens"):
                v.zero_()
                v[: src.shape[0]] = src
            else:
                v.copy_(src.reshape(v.shape))
        self.views[name] = d
        return d

    def grow_labels(self, n: int) -> None:
        have = self.t["label_tokens"].shape[1]
        if n <= have:
            return
        self.version += 1  # the label tensors move: graphs made before are stale
        for k in ("label_counts", "label_tokens"):
            old = self.t[k]
            new = old.new_zeros(old.shape[0], n, *old.shape[2:])
            new[:, :have] = old
            self.t[k] = new
            for name in self.names:
                view = new[self.row[name]]
                if self.views[name].get(k) is self._snap[name][k]:  # not replaced from outside
                    self.views[name][k] = view
                self._snap[name][k] = view

    def index(self, names: tuple) -> torch.Tensor:
        """The rows of `names` as a device tensor (made once per tuple)."""
        t = self._index.get(names)
        if t is None:
            t = self._index[names] = torch.tensor([self.row[n] for n in names], dtype=torch.int64, device=self.device)
        return t

    def column(self, field: str) -> torch.Tensor:
        """The [layers] column of a scalar counter."""
        buf = "ints" if any(k == field for k, _ in self.ispec) else "floats"
        return self.t[buf][:, self._col[field]]


class RoutingProbe(_RouterSites):
    """Streaming routing statistics of every router (see the module docstring).

    budget: tokens kept in the token sample (the first valid ones, in reading order); 0 = none.
    lengths: the CLS_L window lengths. max_labels: the largest number of data labels counted.
    vocab_cells: bound on the per-(token id, expert) table of one layer (ids >= cells // E are
    not counted; the bound is stated in run.meta["routing"]). vocab: count per "input" token id
    (the token routed) or per "next" token id (the true next token, OLMoE's other variant; the
    last token of each sequence has none). Memory per layer is independent of the token count.

    The router hooks only keep a reference to each router's output; at the end of the model call
    (a hook on the model's own forward) the outputs of all routers with the same expert count
    are decoded and counted together, stacked by layer: one set of kernels per forward call
    instead of one per router, so the probe's cost does not grow with the number of layers.
    cuda_graphs: on CUDA, count a call shape seen before through a CUDA graph of that update (a
    handful of launches per forward instead of about a hundred; opt-in: equal to eager on an H100,
    1.038x against the eager path's 1.045x, inside the timing noise).
    """

    name = "routing"

    def __init__(self, budget: int = 2048, lengths=LENGTHS, max_labels: int = 64, vocab_cells: int = 1 << 22,
                 vocab: str = "input", cuda_graphs: bool = False):
        super().__init__()
        self.cuda_graphs = bool(cuda_graphs)
        if vocab not in ("input", "next"):
            raise CaptureError(f"vocab must be 'input' (the token routed) or 'next' (the true next token), got {vocab!r}")
        self.vocab = vocab
        if budget < 0:
            raise CaptureError("RoutingProbe needs a token budget >= 0")
        self.budget = int(budget)
        self.lengths = tuple(int(L) for L in lengths)
        if any(L < 1 for L in self.lengths):
            raise CaptureError(f"window lengths must be >= 1, got {self.lengths}")
        self.max_labels = int(max_labels)
        self.vocab_cells = int(vocab_cells)
        self._vocab = None
        self._tokenizer = None
        self._sites = []
        self._stash: list = []
        self._stash_bytes = 0
        self._banks: dict = {}

    def config(self):
        return {"budget": self.budget, "lengths": list(self.lengths), "max_labels": self.max_labels,
                "vocab_cells": self.vocab_cells, "vocab": self.vocab}

    def __getstate__(self):  # deep copies (distributed blanks) carry no banks or held outputs
        d = dict(self.__dict__)
        d["_stash"], d["_stash_bytes"], d["_banks"] = [], 0, {}
        for k in ("_lens_cache", "_arange_cache", "_const_cache", "_ones_cache", "_graphs", "_graph_keys"):
            d.pop(k, None)
        return d

    def sites(self, layout, model):
        found = super().sites(layout, model)
        self._vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self._tokenizer = getattr(model, "tokenizer", None)
        self._sites = found
        self._site_device = {}
        for r in found:
            w = next(r.module.parameters(), None)
            self._site_device[r.name] = str(w.device) if w is not None else None
        return [*found, ModelSite(model)] if found else []

    def points(self, site):
        if isinstance(site, ModelSite):
            return [HookPoint(site.module, "model_output", "post")]
        pts = [HookPoint(site.module, "router", "post")]
        if getattr(site, "shared_gate", None) is not None:
            pts.append(HookPoint(site.shared_gate, "shared_gate", "post"))
        return pts

    def _vocab_rows(self, e: int) -> int:
        if not self._vocab:
            return 0
        return int(min(self._vocab, self.vocab_cells // e))

    # -- per call: keep the output; per model call: count ------------------------------------
    def observe(self, site, call):
        if isinstance(site, ModelSite):
            self._flush()
            return
        if call.role == "shared_gate":
            g = call.output
            g = g.reshape(-1, g.shape[-1])[:, 0]
            valid, _ = call.rows(g.shape[0], g.device)
            self._hold(("gate", call.call_index, g.shape[0], str(g.device)), site, (g, valid), g.numel() * g.element_size())
            return
        out = call.output
        if (isinstance(out, (tuple, list)) and len(out) >= 3 and all(isinstance(o, torch.Tensor) for o in out[:3])
                and not out[2].is_floating_point() and out[0].shape[-1] == int(site.n_experts)):
            e = int(site.n_experts)
            n = out[0].numel() // e
            parts = (out[0].reshape(n, e), out[1].reshape(n, -1), out[2].reshape(n, -1))
            sig = ("tuple",) + tuple((p.dtype, p.shape[1]) for p in parts)
        elif isinstance(out, torch.Tensor) and int(site.n_experts) > 0 and out.shape[-1] == int(site.n_experts):
            e = int(site.n_experts)
            n = out.numel() // e
            parts = out.reshape(n, e)
            sig = ("tensor", parts.dtype)
        else:
            decode_router_output(site, out)  # raises the AdapterError naming what to register
            raise AssertionError("unreachable")
        dev = parts[0].device if isinstance(parts, tuple) else parts.device
        valid, tok = call.rows(n, dev)
        lab, n_labels = None, 0
        if call.labels is not None and call.labels.numel():
            n_labels = int(call.labels.max()) + 1  # labels live on the host: no sync
            if n_labels > self.max_labels:
                raise CaptureError(f"the data carries {n_labels} labels but RoutingProbe(max_labels={self.max_labels}) "
                                   "counts at most that many: pass a larger max_labels")
            lab = call.row_labels(n, dev)
        key = ("router", call.call_index, n, e, site.kind, site.top_k, sig, str(dev))
        size = sum(p.numel() * p.element_size() for p in (parts if isinstance(parts, tuple) else (parts,)))
        self._hold(key, site, (parts, valid, tok, lab, n_labels, _batch_shape(call, n)), size)

    def _hold(self, key, site, item, size):
        self._stash.append((key, site, item))
        self._stash_bytes += size
        if self._stash_bytes > _STASH_MAX_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Count every held router output: the routers of one call and one shape together."""
        if not self._stash:
            return
        stash, self._stash, self._stash_bytes = self._stash, [], 0
        groups: dict = {}
        for key, site, item in stash:
            g = groups.setdefault(key, ([], []))
            if site.name in {s.name for s in g[0]}:  # a router called twice in one model call
                g = groups.setdefault(key + (len(groups),), ([], []))
            g[0].append(site)
            g[1].append(item)
        for key, (sites, items) in groups.items():
            if key[0] == "gate":
                self._count_gates(sites, items)
            else:
                self._count_routers(sites, items)

    def _bank(self, sites, device) -> tuple[_Bank, torch.Tensor]:
        """The bank of these routers (same expert count, one device), made on first use, with
        every router's fields as views into it; and the rows of `sites`."""
        e = int(sites[0].n_experts)
        key = (e, str(device))
        bank = self._banks.get(key)
        if bank is None or any(s.name not in bank.row for s in sites):
            # the routers of this expert count whose weights are on this device (a model split
            # over devices has one bank per device), and any router seen here that is not
            place = getattr(self, "_site_device", {})
            names = [s.name for s in self._sites if int(s.n_experts) == e and place.get(s.name) in (None, str(device))]
            names += [n for n in (bank.names if bank is not None else []) if n not in names]
            names += [s.name for s in sites if s.name not in names]
            old = bank
            bank = self._banks[key] = _Bank(names, e, len(self.lengths), self._vocab_rows(e), self.budget, device)
            if old is not None:  # a router seen late (another device's bank): keep what was counted
                for n in old.names:
                    if self.state.get(n) is old.views[n]:
                        self.state[n] = dict(old.views[n])
        for s in sites:
            st = self.state.get(s.name)
            if st is None:  # a row never handed out is still zero; another is cleared first
                self.state[s.name] = bank.views[s.name] if bank.fresh.pop(s.name, False) else bank.adopt(s.name, {})
            elif not bank.intact(s.name, st):
                self.state[s.name] = bank.adopt(s.name, st)
        return bank, bank.index(tuple(s.name for s in sites))

    def _count_gates(self, sites, items) -> None:
        g = torch.stack([it[0] for it in items])  # [G, n]
        valid = items[0][1]
        bank, rows = self._bank(sites, g.device)
        s = torch.sigmoid(g.double())
        if valid is not None:
            s = s * valid
            t = valid.sum().expand(len(items))
        else:
            t = torch.full((len(items),), g.shape[1], dtype=torch.int64, device=g.device)
        bank.column("shared_gate").index_add_(0, rows, s.sum(1))
        bank.column("shared_gate_tokens").index_add_(0, rows, t)

    def _count_routers(self, sites, items) -> None:
        parts0 = items[0][0]
        first = parts0[0] if isinstance(parts0, tuple) else parts0
        n, e = first.shape[0], int(sites[0].n_experts)
        # layers per batch: the [G, n, ~3E] float64 temporaries stay under _BATCH_BYTES
        per = max(1, _BATCH_BYTES // max(1, n * (3 * e + 8) * 8))
        for i in range(0, len(items), per):
            self._count_batch(sites[i:i + per], items[i:i + per], n, e, first.device)

    def _count_batch(self, sites, items, n, e, dev) -> None:
        parts0, valid, tok, lab, n_labels, b = items[0]
        bank, rows = self._bank(sites, dev)
        if n_labels:
            bank.grow_labels(n_labels)
        if valid is None:
            valid = self._ones(n, dev)
        tup = isinstance(parts0, tuple)
        if self.cuda_graphs and dev.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            key = (bank.uid, bank.version, tuple(s.name for s in sites), n, b, tok is None, lab is None,
                   tuple((p.dtype, p.shape[1]) for p in parts0) if tup else parts0.dtype)
            if self._replay(key, sites, items, bank, rows, valid, tok, lab, b):
                return
        cat = tuple(torch.cat([it[0][j] for it in items]) for j in range(3)) if tup else torch.cat([it[0] for it in items])
        self._count_core(sites[0], bank, rows, cat, valid, tok, lab, b)

    def _replay(self, key, sites, items, bank, rows, valid, tok, lab, b) -> bool:
        """CUDA: count through a CUDA graph of _count_core made for this key (the routers, the call
        shape, the bank): the inputs are copied into the graph's buffers and the graph replayed,
        a handful of launches instead of about a hundred. A key seen for the first time is
        counted eagerly (that also makes every cached constant); the second time the graph is
        captured. False: count eagerly."""
        graphs = self.__dict__.setdefault("_graphs", {})
        hit = graphs.get(key)
        tup = isinstance(items[0][0], tuple)
        if hit is None:
            seen = self.__dict__.setdefault("_graph_keys", set())
            if key not in seen or self.__dict__.get("_graphs_failed"):
                if len(seen) > 64:
                    seen.clear()
                seen.add(key)
                return False
            parts = [torch.cat([it[0][j] for it in items]) for j in range(3)] if tup else [torch.cat([it[0] for it in items])]
            static = {"parts": parts, "valid": valid.clone(), "tok": None if tok is None else tok.clone(),
                      "lab": None if lab is None else lab.clone()}
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self._count_core(sites[0], bank, rows, tuple(parts) if tup else parts[0], static["valid"],
                                     static["tok"], static["lab"], b)
            except Exception:  # noqa: BLE001 - an op that cannot be captured here: stay eager
                self._graphs_failed = True
                return False
            # the graph reads the cached constants (window tables, aranges, lengths) and the bank at
            # the addresses they had when it was captured: keep them alive as long as the graph
            static["keep"] = (list(_WINDOWS.values()), dict(self.__dict__.get("_arange_cache", {})),
                              dict(self.__dict__.get("_const_cache", {})), dict(self.__dict__.get("_lens_cache", {})),
                              dict(self.__dict__.get("_ones_cache", {})), bank, rows)
            if len(graphs) >= 16:
                graphs.pop(next(iter(graphs)))
            graphs[key] = hit = (graph, static)
        else:
            graph, static = hit
            if tup:
                for j, buf in enumerate(static["parts"]):
                    torch.cat([it[0][j] for it in items], out=buf)
            else:
                torch.cat([it[0] for it in items], out=static["parts"][0])
            static["valid"].copy_(valid)
            for k, t in (("tok", tok), ("lab", lab)):
                if t is not None:
                    static[k].copy_(t)
        hit[0].replay()
        return True

    def _ones(self, n: int, dev) -> torch.Tensor:
        cache = self.__dict__.setdefault("_ones_cache", {})
        t = cache.get((n, str(dev)))
        if t is None:
            t = cache[(n, str(dev))] = torch.ones(n, dtype=torch.bool, device=dev)
        return t

    def _count_core(self, site, bank, rows, cat, valid, tok, lab, b) -> None:
        """Count one batch of G routers' outputs (`cat`: their outputs stacked by rows) into the
        bank rows `rows`. Device work only, fixed shapes: no host sync, and capturable."""
        out = decode_router_output(site, cat)
        G, e = rows.shape[0], int(site.n_experts)
        n = out.selected.shape[0] // G
        dev = out.selected.device
        sel = out.selected.reshape(G, n, e) & valid[:, None]
        w = out.weights.reshape(G, n, e)
        p = out.probs.reshape(G, n, e)
        sf = sel.double()
        ent = torch.special.entr(p).sum(-1)  # [G, n]
        if e > 1:
            top2 = p.topk(2, -1).values
            margin = top2[..., 0] - top2[..., 1]
        else:
            margin = p[..., 0]
        # one [G, n, C] float64 table, summed over valid tokens by one batched matrix product:
        # per expert selections, the one-hot of the number selected (the last column, the dump
        # slot, stays 0), tokens, routed weight, entropy, margin. Integer columns stay exact
        # (< 2^53); a NaN router output reaches the entropy sum (checked once, in finish)
        cols = self._arange(e + 2, dev)
        x = torch.cat([sf, sel.sum(-1, keepdim=True) == cols, valid[:, None].expand(G, n, 1), w, ent[..., None],
                       margin[..., None]], -1)
        tot = valid.double() @ x  # [G, C]: counts [e], active_hist [e + 2], tokens, mass [e], entropy, margin
        cosel = sf.transpose(1, 2) @ sf  # [G, e, e]
        seq, n_valid = compact(sel.reshape(G * b, n // b, e), valid.reshape(b, n // b), groups=G)
        num, den = window_union_counts(seq, n_valid, self.lengths, _lens(self, dev), groups=G)
        rn, rd = reuse_sums(seq, n_valid, groups=G)
        if G == 1:
            num, rn, rd = num[None], rn.reshape(1), rd.reshape(1)
        if lab is not None:
            keep = valid & (lab >= 0)
            nlab = bank.t["label_tokens"].shape[1]
            idx = (rows[:, None] * nlab + lab.clamp_min(0)).reshape(-1)
            bank.t["label_counts"].view(-1, e).index_add_(0, idx, (sel & keep[:, None]).long().reshape(-1, e))
            bank.t["label_tokens"].view(-1).index_add_(0, idx, keep.long().expand(G, n).reshape(-1))
        v = bank.t["vocab_tokens"].shape[1]
        if tok is not None and v:
            vt, keep = tok, valid
            if self.vocab == "next":  # the token at the next position of the same sequence
                t2, v2 = tok.reshape(b, -1), valid.reshape(b, -1)
                vt = torch.cat([t2[:, 1:], t2[:, :1]], 1).reshape(-1)
                keep = valid & torch.cat([v2[:, 1:], torch.zeros_like(v2[:, :1])], 1).reshape(-1)
            if self.vocab == "next" or not self._vocab or v < self._vocab:
                keep = keep & (vt < v)
                vt = torch.where(keep, vt, 0)
                vsel = sel & keep[:, None]
            else:  # ids index the model's embedding, so all are < v; padding rows add 0 (sel is masked)
                vsel = sel
            idx = (rows[:, None] * v + vt).reshape(-1)
            bank.t["vocab_counts"].view(-1, e).index_add_(0, idx, vsel.to(torch.int32).reshape(-1, e))
            bank.t["vocab_tokens"].view(-1).index_add_(0, idx, keep.to(torch.int32).expand(G, n).reshape(-1))
        if self.budget:  # before the counters: it reads the tokens and sequences seen so far
            self._sample(bank, rows, sel, w, valid, tok, lab, b)
        ints = torch.cat([tot[:, : 2 * e + 3], cosel.reshape(G, -1), num, den.expand(G, -1), rd[:, None],
                          self._const(b, G, dev)[:, None]], 1).long()
        bank.t["ints"][:, : bank.n_router_ints].index_add_(0, rows, ints)
        bank.t["floats"][:, : bank.n_router_floats].index_add_(0, rows, torch.cat([tot[:, 2 * e + 3:], rn[:, None]], 1))

    def _arange(self, n: int, dev) -> torch.Tensor:
        """arange(n) on `dev`, made once per (n, device)."""
        cache = self.__dict__.setdefault("_arange_cache", {})
        key = (n, str(dev))
        t = cache.get(key)
        if t is None:
            t = cache[key] = torch.arange(n, device=dev)
        return t

    def _const(self, value: int, n: int, dev) -> torch.Tensor:
        """An int64 [n] tensor filled with `value` on `dev`, made once (never written to)."""
        cache = self.__dict__.setdefault("_const_cache", {})
        key = (value, n, str(dev))
        t = cache.get(key)
        if t is None:
            if len(cache) > 64:
                cache.clear()
            t = cache[key] = torch.full((n,), value, dtype=torch.int64, device=dev)
        return t

    def _sample(self, bank, rows, sel, w, valid, tok, lab, b):
        G, n, e = sel.shape
        if not n:
            return
        dev = sel.device
        bud = self.budget
        before = valid.cumsum(0) - 1
        rank = bank.column("tokens").index_select(0, rows)[:, None] + before  # [G, n]
        dest = torch.where(valid, rank, bud).clamp_max_(bud)  # the rest to the dump slot
        seqs = bank.column("seqs").index_select(0, rows)[:, None]
        if b == 1:
            pos, seq = before.expand(G, n), seqs.expand(G, n)
        else:
            pos = (valid.reshape(b, -1).cumsum(1).reshape(-1) - 1).expand(G, n)
            seq = seqs + self._arange(n, dev) // (n // b)
        minus = self._const(-1, n, dev)
        ids = torch.stack([(tok if tok is not None else minus).expand(G, n), rank, seq, pos,
                           (lab if lab is not None else minus).expand(G, n)], -1)
        flat = (rows[:, None] * (bud + 1) + dest).reshape(-1)
        bank.t["sample_ids"].view(-1, len(_SAMPLE_IDS)).index_copy_(0, flat, ids.reshape(-1, len(_SAMPLE_IDS)))
        bank.t["sample_weights"].view(-1, e).index_copy_(0, flat, w.reshape(-1, e))
        bank.t["sample_selected"].view(-1, e).index_copy_(0, flat, sel.reshape(-1, e))

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        self._flush()
        out = {}
        for site, st in self.state.items():
            for k, v in st.items():
                if k == "sample_ids":
                    for j, name in enumerate(_SAMPLE_IDS):
                        out[f"{self.name}/{site}/sample_{name}"] = v[:-1, j].clone()
                elif k in ("sample_weights", "sample_selected", "active_hist"):
                    out[f"{self.name}/{site}/{k}"] = v[:-1].clone()
                elif k == "seqs" and not self.budget:
                    continue
                else:
                    out[f"{self.name}/{site}/{k}"] = v.clone()
            if self.budget and "tokens" in st:
                out[f"{self.name}/{site}/seen"] = st["tokens"].clone()
        return out

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        """The inverse of state_dict: each router's fields, with the dump slots back."""
        prefix = self.name + "/"
        loaded: dict[str, dict] = {}
        for key, v in flat.items():
            if key.startswith(prefix):
                site, field = key[len(prefix):].rsplit("/", 1)
                loaded.setdefault(site, {})[field] = v
        for site, f in loaded.items():
            st = {}
            ids = [f.pop(f"sample_{k}", None) for k in _SAMPLE_IDS]
            if all(t is not None for t in ids):
                st["sample_ids"] = torch.cat([torch.stack(ids, 1), ids[0].new_full((1, len(_SAMPLE_IDS)), -1)])
            for k in ("sample_weights", "sample_selected", "active_hist"):
                if k in f:
                    t = f.pop(k)
                    st[k] = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
            f.pop("seen", None)
            if "seqs" not in f and "tokens" in f:
                f["seqs"] = torch.zeros_like(f["tokens"])
            st.update(f)
            self.state[site] = st

    def merge(self, other):
        self._flush()
        if isinstance(other, RoutingProbe):
            other._flush()
        return super().merge(other)

    def _merge_site(self, mine, theirs):
        theirs = {k: v.to(mine["tokens"].device) for k, v in theirs.items()}
        if self.budget and "sample_ids" in theirs:
            # the other part comes after this one: offset its ranks and sequences, keep the first
            bud = self.budget
            other = theirs["sample_ids"][:-1].clone()
            filled = other[:, 1] >= 0
            other[:, 1] = torch.where(filled, other[:, 1] + mine["tokens"], -1)
            other[:, 2] = torch.where(filled, other[:, 2] + mine["seqs"], -1)
            ids = torch.cat([mine["sample_ids"][:-1], other])
            ranks = ids[:, 1]
            top = torch.argsort(torch.where(ranks >= 0, ranks, torch.full_like(ranks, 1 << 62)))[:bud]
            for f, both in (("sample_ids", ids),
                            ("sample_weights", torch.cat([mine["sample_weights"][:-1], theirs["sample_weights"][:-1]])),
                            ("sample_selected", torch.cat([mine["sample_selected"][:-1],
                                                           theirs["sample_selected"][:-1]]))):
                mine[f] = torch.cat([both[top], mine[f][-1:]])
        for k in ("label_counts", "label_tokens"):
            n = max(mine[k].shape[0], theirs[k].shape[0])
            for d in (mine, theirs):
                if d[k].shape[0] < n:
                    pad = d[k].new_zeros(n - d[k].shape[0], *d[k].shape[1:])
                    d[k] = torch.cat([d[k], pad])
        for k, v in theirs.items():
            if not k.startswith("sample_"):
                mine[k] = mine[k] + v

    def finish(self, run) -> None:
        self._flush()
        calls = (run.meta.get("data") or {}).get("forward_calls") or 0
        silent = [s.name for s in self._sites if s.name not in self.state]
        if calls and silent:
            raise CaptureError(
                f"router module(s) {silent} were never called during {calls} forward call(s): the MoE block "
                "computes its routing elsewhere (a hub kernel or a custom forward replacing the block?). Load the "
                "model without such kernels (e.g. use_kernels=False), or register an adapter whose `router` "
                "names the module that is called (wb.register_adapter(..., override=True))")
        bad = [f"layer {s.layer} ({s.name})" for s in self._sites
               if s.name in self.state and not bool(torch.isfinite(self.state[s.name]["entropy"]))]
        if bad:
            raise CaptureError("NaN/Inf in router outputs: " + "; ".join(bad) + " gave non-finite router scores. "
                               "Check the model's dtype (fp16 overflow is common: try bfloat16 or float32) and "
                               "its weights.")
        meta = {"lengths": list(self.lengths), "budget": self.budget, "vocab": self.vocab,
                "vocab_rows": {s.name: int(self.state[s.name]["vocab_tokens"].shape[0])
                               for s in self._sites if s.name in self.state},
                "vocab_size": self._vocab}
        first = next((self.state[s.name] for s in self._sites if s.name in self.state), None)
        if self.budget and first is not None:
            ids = first["sample_ids"][:-1, 0].cpu().tolist()
            meta["sample_text"] = _pieces(self._tokenizer, ids)
        run.meta["routing"] = meta


def _pieces(tokenizer, ids: list[int]) -> list[str] | None:
    """The text piece of each token id (None without a tokenizer; "" for empty slots)."""
    if tokenizer is None:
        return None
    out = []
    for i in ids:
        if i < 0:
            out.append("")
            continue
        try:
            out.append(tokenizer.decode([int(i)]))
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id: show the id
            out.append(f"<{i}>")
    return out


class ChunkProbe(_RouterSites):
    """TLS, CLS_L and reuse counts per layer over router experts (units="experts") or FFN neurons
    (units="neurons", active under `rule`, the capture's FFN sites). State per layer: ``tls_num``
    / ``tls_den``, ``cls_num`` / ``cls_den [len(lengths)]``, ``reuse_num`` / ``reuse_den``,
    ``nonfinite`` (checked once at the end, naming the layer)."""

    name = "chunks"

    def __init__(self, units: str = "experts", lengths=LENGTHS, rule="zero"):
        super().__init__()
        if units not in ("experts", "neurons"):
            raise CaptureError(f"units must be 'experts' or 'neurons', got {units!r}")
        self.units = units
        self.site_kind = "router" if units == "experts" else "ffn"
        self.lengths = tuple(int(L) for L in lengths)
        if any(L < 1 for L in self.lengths):
            raise CaptureError(f"window lengths must be >= 1, got {self.lengths}")
        self.rule = Rule.parse(rule)
        self._pending: dict = {}
        self._norms: dict = {}
        self._sites = []

    def config(self):
        return {"units": self.units, "lengths": list(self.lengths), "rule": str(self.rule)}

    def sites(self, layout, model):
        if self.units == "experts":
            found = super().sites(layout, model)
        else:
            found = [s for s in layout.ffns if s.role in ("dense", "shared_expert")]
        self._sites = found
        return found

    def points(self, site):
        if self.units == "experts":
            return [HookPoint(site.module, "router", "post")]
        pts = []
        if self.rule.needs_gate_act(site.kind == GATED):
            if site.act is None:
                raise CaptureError(f"{site.name}: rule {self.rule} needs act(gate) but the adapter found no "
                                   "activation module to hook")
            pts.append(HookPoint(site.act, "act", "post"))
        pts.append(HookPoint(site.down, "down_input", "pre"))
        return pts

    def observe(self, site, call):
        if call.role == "act":
            self._pending[site.name] = call.output
            return
        if self.units == "experts":
            act = decode_router_output(site, call.output).selected
            out = call.output[0] if isinstance(call.output, (tuple, list)) else call.output
            fin = (~torch.isfinite(out)).sum()
        else:
            a = call.args[0]
            a = a.reshape(-1, a.shape[-1])
            g = self._pending.pop(site.name, None)
            if g is not None:
                g = g.reshape(-1, g.shape[-1])
            norms = None
            if self.rule.needs_down_norms():
                norms = self._norms.get(site.name)
                if norms is None:
                    norms = self._norms[site.name] = site.down_column_norms().to(a.device)
            act = self.rule.active(a, g, layer=site.layer, gated=site.kind == GATED, down_norms=norms)
            fin = (~torch.isfinite(a)).sum()
        n, u = act.shape
        dev = act.device
        st = self.state.get(site.name)
        if st is None:
            nl = len(self.lengths)
            z = lambda *s, dt=torch.int64: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
            st = self.state[site.name] = {"tls_num": z(()), "tls_den": z(()), "cls_num": z(nl), "cls_den": z(nl),
                                          "reuse_num": z((), dt=torch.float64), "reuse_den": z(()),
                                          "nonfinite": z(())}
        valid, _ = call.rows(n, dev)
        if valid is None:
            valid = torch.ones(n, dtype=torch.bool, device=dev)
        b = _batch_shape(call, n)
        act = act & valid[:, None]
        st["nonfinite"] += fin
        st["tls_num"] += act.sum()
        st["tls_den"] += valid.sum() * u
        seq, n_valid = compact(act.reshape(b, n // b, u), valid.reshape(b, n // b))
        num, den = window_union_counts(seq, n_valid, self.lengths, _lens(self, dev))
        st["cls_num"] += num
        st["cls_den"] += den
        rn, rd = reuse_sums(seq, n_valid)
        st["reuse_num"] += rn
        st["reuse_den"] += rd

    def finish(self, run) -> None:
        for s in self._sites:
            st = self.state.get(s.name)
            if st is not None and int(st["nonfinite"]) > 0:
                what = "router outputs" if self.units == "experts" else "FFN activations"
                raise CaptureError(f"layer {s.layer} ({s.name}): NaN/Inf {what}; check dtype and weights")


__all__ = ["ChunkProbe", "LENGTHS", "ROUTER_KINDS", "RouterOut", "RoutingProbe", "compact",
           "decode_router_output", "reuse_sums", "window_union_counts"]
