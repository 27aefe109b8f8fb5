"""`capture(model, ...)`: the one hook mechanism of the workbench, feeding streaming probes.

Hooks (a handle per hook, all removed in `finally`, also on exceptions and KeyboardInterrupt):
- a forward pre-hook on the model itself records attention_mask (and input_ids) of each call;
- a forward pre-hook on each FFN's down projection sees a = its input (FFN probes);
- a forward hook on the activation module sees act(gate) where the rule needs it;
- the hooks that site probes (routers, SSM mixers, the model call) ask for through
  `SiteProbe.points`, each call handed to `SiteProbe.observe` with the call's mask and ids.

Nothing here reads a device value back to the host during the capture; the NaN/Inf check runs
once, when the block exits, and names the layer.
"""

from __future__ import annotations

import inspect
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.adapters import GATED, FFNSite, Layout, locate
from workbench.capture.probes import (
    AbsSketch,
    Batch,
    NeuronStats,
    ProbeContext,
    SiteCall,
    SiteProbe,
    make_probes,
)
from workbench.capture.rules import Rule
from workbench.capture.run import Run, new_meta
from workbench.errors import CaptureError


@dataclass
class HookHandle:
    """One registered hook: where, what for, and the torch handle that removes it."""

    module_name: str
    role: str
    handle: torch.utils.hooks.RemovableHandle

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class _CallState:
    mask: torch.Tensor | None = None  # [B, S] attention mask of the current call
    input_ids: torch.Tensor | None = None
    valid_cache: dict = field(default_factory=dict)
    pending_g: dict = field(default_factory=dict)
    calls: int = 0
    tokens: torch.Tensor | int = 0  # valid tokens over all calls (a device tensor: no host sync)
    labels: torch.Tensor | None = None  # [B] label id per sequence of the coming calls (set_labels)
    label_cache: dict = field(default_factory=dict)


def _mask_and_ids(fn_sig: inspect.Signature | None, args, kwargs):
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids")
    if fn_sig is not None and (mask is None or ids is None):
        try:
            bound = fn_sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {}
        mask = bound.get("attention_mask", mask)
        ids = bound.get("input_ids", ids)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        mask = None  # 4-D custom masks carry no padding information we can trust
    if not isinstance(ids, torch.Tensor):
        ids = None
    return mask, ids


def _no_ffn_message(model: nn.Module, layout: Layout) -> str:
    """Why activation probes cannot run on `model`, and what to use instead."""
    name, ad = type(model).__name__, layout.adapter
    if layout.routers:
        return (f"{name}'s FFNs are routed experts (adapter {ad!r}: {len(layout.routers)} routers, no dense "
                "or shared FFN), so the activation probes have nothing to watch; profile its routing "
                "instead: wb.profile(model, docs, probes=[wb.RoutingProbe()])")
    if layout.mixers:
        return (f"{name} has SSM mixers and no FFN (adapter {ad!r}: {len(layout.mixers)} mixers), so the "
                "activation probes have nothing to watch; scan its state instead: "
                "workbench.metrics.state.state_scan(model, ids)")
    return (f"{name} has no dense or shared FFN the adapters know (adapter {ad!r}); activation probes need "
            "an FFN. Register an adapter with wb.register_adapter if the model has FFNs under other names.")


class Capture:
    """The state of one capture; use through `capture(...)`."""

    def __init__(self, model: nn.Module, probes=None, rule="zero", layout: Layout | None = None,
                 fused: bool | str = "auto", data: dict | None = None, roles=("dense", "shared_expert")):
        swapped = next((n for n, m in model.named_modules() if getattr(m, "_wb_accelerated", False)), None)
        if swapped is not None:
            raise CaptureError(
                f"{swapped} is swapped by an active wb.accelerate handle, so the FFN activations are not where the "
                "adapters look for them: capture the dense model (call the handle's .off(), or capture outside its "
                "`with` block); handle.measure(ids) reports the accelerated model's realised sparsity")
        self.model = model
        self.rule = Rule.parse(rule)
        self.layout = layout or locate(model)
        self.probes = make_probes(probes)
        self.ffn_probes = [p for p in self.probes if not isinstance(p, SiteProbe)]
        self.site_probes = [p for p in self.probes if isinstance(p, SiteProbe)]
        self.sites = [s for s in self.layout.ffns if s.role in roles] if self.ffn_probes else []
        if self.ffn_probes and not self.sites:
            raise CaptureError(_no_ffn_message(model, self.layout))
        self.rule.check_width(self.sites)
        self.probe_sites = {}
        for p in self.site_probes:
            found = p.sites(self.layout, model)
            if not found:
                what = {"router": "router", "mixer": "SSM mixer"}.get(p.site_kind, p.site_kind)
                raise CaptureError(
                    f"{type(model).__name__} has no {what} the adapters know (adapter "
                    f"{self.layout.adapter!r}: {len(self.layout.ffns)} FFNs, {len(self.layout.routers)} "
                    f"routers, {len(self.layout.mixers)} mixers), so the {p.name!r} probe has nothing to "
                    f"watch. Use it on a model with {what}s, or register an adapter naming them "
                    "(wb.register_adapter).")
            self.probe_sites[id(p)] = found
        self.fused = fused
        self.handles: list[HookHandle] = []
        self.call = _CallState()
        norms = {}
        if self.rule.needs_down_norms():
            for s in self.sites:
                norms[s.name] = s.down_column_norms()
        self.ctx = ProbeContext(rule=self.rule, down_norms=norms)
        self.run = Run(new_meta(model, self.layout, self.rule, data), probes=self.probes)
        self._stats = next((p for p in self.ffn_probes if isinstance(p, NeuronStats)), None)
        self._sketch = next((p for p in self.ffn_probes if isinstance(p, AbsSketch)), None)

    # -- hooks ---------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        mask, ids = _mask_and_ids(self._sig, args, kwargs)
        self.call.mask = mask
        self.call.input_ids = ids
        self.call.valid_cache = {}
        self.call.label_cache = {}
        self.call.pending_g = {}
        self.call.calls += 1
        if mask is not None:
            self.call.tokens = self.call.tokens + (mask != 0).sum()
        elif ids is not None:
            self.call.tokens = self.call.tokens + ids.numel()
        else:  # inputs_embeds [batch, tokens, d] without a mask: every position counts, as in the stats
            emb = kwargs.get("inputs_embeds")
            if emb is None and self._sig is not None:
                try:
                    emb = self._sig.bind_partial(*args, **kwargs).arguments.get("inputs_embeds")
                except TypeError:
                    emb = None
            if isinstance(emb, torch.Tensor) and emb.dim() == 3:
                self.call.tokens = self.call.tokens + emb.shape[0] * emb.shape[1]

    def _valid(self, n: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        key = (n, str(device))
        hit = self.call.valid_cache.get(key)
        if hit is not None:
            return hit
        mask, ids = self.call.mask, self.call.input_ids
        valid = tok = None
        if mask is not None:
            b = mask.shape[0]
            if n % b == 0 and mask.shape[1] >= n // b:
                valid = (mask[:, -(n // b):] != 0).reshape(-1).to(device, non_blocking=True)
            else:
                raise CaptureError(
                    f"an FFN saw {n} token rows but the call's attention_mask has shape "
                    f"{tuple(mask.shape)}; pass an attention_mask matching the input (or none)")
        if ids is not None and ids.dim() == 2 and n % ids.shape[0] == 0 and ids.shape[1] >= n // ids.shape[0]:
            tok = ids[:, -(n // ids.shape[0]):].reshape(-1).to(device, non_blocking=True)
        self.call.valid_cache[key] = (valid, tok)
        return valid, tok

    def _n_seqs(self) -> int | None:
        """B, the number of sequences of the current call (from its mask, ids or labels)."""
        for t in (self.call.mask, self.call.input_ids, self.call.labels):
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                return int(t.shape[0])
        return None

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Label ids [B] (one per sequence, -1 = unlabelled) of the forward calls that follow,
        until changed; probes get them per token row (`Batch.labels`, `SiteCall.row_labels`)."""
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            if labels.dim() != 1:
                raise CaptureError(f"labels must be one id per sequence, shape [batch]; got {tuple(labels.shape)}")
        self.call.labels = labels
        self.call.label_cache = {}

    def _row_labels(self, n: int, device) -> torch.Tensor | None:
        """The label id of each of n token rows of this call ([n] int64), or None."""
        lab = self.call.labels
        if lab is None:
            return None
        key = (n, str(device))
        hit = self.call.label_cache.get(key)
        if hit is not None:
            return hit
        b = lab.shape[0]
        if n % b:
            raise CaptureError(f"a site saw {n} token rows but {b} sequence labels were set; "
                               "set one label per sequence of the call")
        out = lab.to(device, non_blocking=True).repeat_interleave(n // b)
        self.call.label_cache[key] = out
        return out

    def _make_act_hook(self, site: FFNSite):
        def hook(module, args, output):
            self.call.pending_g[site.name] = output
        return hook

    def _make_down_hook(self, site: FFNSite, needs_g: bool):
        def hook(module, args):
            a = args[0]
            a2 = a.reshape(-1, a.shape[-1])
            g = None
            if needs_g:
                g = self.call.pending_g.pop(site.name, None)
                if g is None:
                    raise CaptureError(f"{site.name}: the rule {self.rule} needs act(gate) but the "
                                       "activation module was not called before the down projection")
                g = g.reshape(-1, g.shape[-1])
            valid, tok = self._valid(a2.shape[0], a2.device)
            batch = Batch(a=a2.detach(), g=None if g is None else g.detach(), valid=valid, token_ids=tok,
                          labels=self._row_labels(a2.shape[0], a2.device), seqs=self._n_seqs())
            with torch.no_grad():
                self._update(site, batch)
        return hook

    def _update(self, site: FFNSite, batch: Batch) -> None:
        done = set()
        if self._use_fused(batch.a, site):
            from workbench.capture import fused

            fused.update(site, batch, self.ctx, self._stats, self._sketch)
            done = {id(self._stats), id(self._sketch)}
        for p in self.ffn_probes:
            if id(p) not in done:
                p.update(site, batch, self.ctx)

    def _make_site_hook(self, probe: SiteProbe, site, role: str, when: str):
        def observe(args, kwargs, output):
            call = SiteCall(role=role, args=args, kwargs=kwargs, output=output, mask=self.call.mask,
                            input_ids=self.call.input_ids, call_index=self.call.calls, _rows=self._valid,
                            _labels=self._row_labels, labels=self.call.labels)
            with torch.no_grad():
                probe.observe(site, call)

        if when == "pre":
            return lambda module, args, kwargs: observe(args, kwargs, None)
        return lambda module, args, kwargs, output: observe(args, kwargs, output)

    def _use_fused(self, a: torch.Tensor, site: FFNSite) -> bool:
        if self.fused is False or a.device.type != "cuda" or self._stats is None:
            return False
        if self.rule.elementwise(site.layer, site.kind == GATED) is None:
            return False
        from workbench.capture import fused

        # under TRITON_INTERPRET=1 (the CPU test setting) Triton cannot launch on CUDA tensors
        return fused.available() and os.environ.get("TRITON_INTERPRET") != "1"

    def install(self) -> None:
        try:
            self._sig = inspect.signature(self.model.forward)
        except (TypeError, ValueError):
            self._sig = None
        h = self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True, prepend=True)
        self.handles.append(HookHandle("", "model_call", h))
        for site in self.sites:
            needs_g = self.rule.needs_gate_act(site.kind == GATED)
            if needs_g:
                if site.act is None:
                    raise CaptureError(f"{site.name}: rule {self.rule} needs act(gate) but the adapter "
                                       "found no activation module to hook")
                h = site.act.register_forward_hook(self._make_act_hook(site))
                self.handles.append(HookHandle(site.name, "act", h))
            h = site.down.register_forward_pre_hook(self._make_down_hook(site, needs_g))
            self.handles.append(HookHandle(site.name, "down_input", h))
        for p in self.site_probes:
            for site in self.probe_sites[id(p)]:
                for pt in p.points(site):
                    if pt.when not in ("pre", "post"):
                        raise CaptureError(f"{p.name}: hook point {pt.role!r} has when={pt.when!r}; "
                                           "use 'pre' or 'post'")
                    fn = self._make_site_hook(p, site, pt.role, pt.when)
                    if pt.when == "pre":
                        h = pt.module.register_forward_pre_hook(fn, with_kwargs=True)
                    else:
                        h = pt.module.register_forward_hook(fn, with_kwargs=True)
                    self.handles.append(HookHandle(getattr(site, "name", ""), f"{p.name}:{pt.role}", h))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> Capture:
        self.install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()
        if exc_type is not None:
            return
        data_meta = self.run.meta.setdefault("data", {})
        data_meta["forward_calls"] = self.call.calls
        if not self.call.calls:
            warnings.warn("wb.capture saw no forward call of the model, so the Run holds no statistics: call "
                          "the model inside the `with` block (model(**batch)), or use wb.profile(model, data)",
                          stacklevel=2)
        data_meta.setdefault("n_tokens", int(self.call.tokens))
        for p in self.site_probes:
            p.finish(self.run)
        try:
            self.check_finite()
        except CaptureError as err:
            self.run.finalize()
            err.run = self.run
            raise
        self.run.finalize()

    def check_finite(self) -> None:
        """Deferred NaN/Inf check (one host sync per capture)."""
        if self._stats is None:
            return
        bad = []
        for s in self.sites:
            st = self._stats.state.get(s.name)
            if st is not None and int(st["nonfinite"]) > 0:
                bad.append(f"layer {s.layer} ({s.name}): {int(st['nonfinite'])} non-finite activations")
        if bad:
            raise CaptureError("NaN/Inf in FFN activations: " + "; ".join(bad) +
                               ". Check the model's dtype (fp16 overflow is common: try bfloat16 or "
                               "float32) and its weights.")


@contextmanager
def capture(model: nn.Module, probes=None, rule="zero", *, layout: Layout | None = None,
            fused: bool | str = "auto", data: dict | None = None):
    """Capture FFN activation statistics over any number of forward calls.

        with wb.capture(model, rule="zero") as run:
            model(**batch)
        run.summary()

    probes: Probe instances or names (default: NeuronStats; add "abs_sketch" for |a| quantiles,
    "activation_sample" for raw rows; SiteProbe instances watch routers, SSM mixers or the model
    call instead of FFNs, and a capture of site probes alone needs no FFN). rule: "zero",
    "fat(T)", "topk(k)", "magnitude(t)" or a Rule. Hooks are removed when the block exits, also
    on exceptions and KeyboardInterrupt. On exit the statistics move to the host and are checked
    for NaN/Inf (CaptureError names the layer; the partial run is on the error as `.run`).
    """
    with Capture(model, probes=probes, rule=rule, layout=layout, fused=fused, data=data) as cap:
        yield cap.run


def active_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on the model and its submodules (0 after a capture)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks)
    return n
