"""Shared plumbing of the metrics: token batches with masks, and raw per-token collection.

Every metric drives the forward passes itself, so it knows each call's attention mask. Padding
(attention_mask == 0) is excluded from every statistic and every loss.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from workbench.adapters import GATED, FFNSite, Layout, locate
from workbench.data import Batches, model_device, pad_rows, token_batches  # noqa: F401  (re-exported)
from workbench.errors import AdapterError, CaptureError


def ffn_sites(model: nn.Module, layout: Layout | None = None, roles=("dense", "shared_expert")) -> list[FFNSite]:
    """The FFN sites of `model`; a clear AdapterError when there is none."""
    layout = layout or locate(model)
    sites = [s for s in layout.ffns if s.role in roles]
    if not sites:
        raise AdapterError(
            f"{type(model).__name__} (adapter {layout.adapter!r}) has no dense FFN the adapters know "
            f"({len(layout.routers)} routers, {len(layout.mixers)} mixers found): the activation "
            "metrics need FFNs with a down projection. Register an adapter with wb.register_adapter "
            "if the model has FFNs under other names.")
    return sites


#: Names of the norm that opens a decoder layer's FFN block, most specific first (Gemma 2/3 have a
#: `post_attention_layernorm` that closes the attention block, so `pre_feedforward_layernorm` wins).
PRE_FFN_NORMS = ("pre_feedforward_layernorm", "ffn_norm", "post_attention_layernorm", "final_layer_norm", "ln_2",
                 "norm2")


def pre_ffn_norm(model: nn.Module, site: FFNSite) -> nn.Module:
    """The norm whose input is the residual stream entering `site`'s FFN block (Llama's
    `post_attention_layernorm`, OPT's `final_layer_norm`, GPT-2's `ln_2`, ...): looked up on the
    FFN module itself, then on its ancestors, nearest first (the decoder layer; for a shared
    expert, the decoder layer around its MoE block). AdapterError when none is found (post-norm
    models such as BERT have none: there the FFN input is the residual stream)."""
    owners, name = [site.module], site.name
    while name:
        name = name.rpartition(".")[0]
        owners.append(model.get_submodule(name) if name else model)
    for owner in owners[:-1] or owners:  # not the model's root (its `norm` is the final one)
        for n in PRE_FFN_NORMS:
            m = getattr(owner, n, None)
            if isinstance(m, nn.Module):
                return m
    raise AdapterError(
        f"layer {site.layer} ({site.name}): no norm before the FFN found (looked for {', '.join(PRE_FFN_NORMS)} "
        f"on the FFN and its ancestors), so the residual stream entering the FFN block cannot be read; train the "
        "predictors on the FFN input instead: train_predictors(..., input='ffn_input')")


def split_batches(batches: Batches, holdout: float) -> tuple[Batches, Batches]:
    """Split by whole sequences: a `holdout` fraction of the sequences, spread evenly over the
    data (sequence i is held out when floor((i + 1) h) > floor(i h)), so that every part of the
    corpus is in both splits."""
    rows = [(ids[i], m[i]) for ids, m in batches for i in range(ids.shape[0])]
    held = [math.floor((i + 1) * holdout) > math.floor(i * holdout) for i in range(len(rows))]
    n_hold = sum(held)
    if holdout > 0 and n_hold == 0:
        held[-1], n_hold = True, 1
    if n_hold >= len(rows):
        raise CaptureError(f"cannot hold out {holdout:.0%} of {len(rows)} sequences and keep any for "
                           "training; give more sequences")
    bs = max(ids.shape[0] for ids, _ in batches)

    def regroup(part):
        return [(torch.stack([r[0] for r in part[i:i + bs]]), torch.stack([r[1] for r in part[i:i + bs]]))
                for i in range(0, len(part), bs)]

    train = [r for r, h in zip(rows, held) if not h]
    test = [r for r, h in zip(rows, held) if h]
    return regroup(train), regroup(test)


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def collect(model: nn.Module, batches: Batches, *, sites: list[FFNSite] | None = None,
            want_x: bool = False, want_g: bool = False, want_r: bool = False, max_tokens: int | None = None,
            dtype: torch.dtype = torch.float32, store_device: str | torch.device | None = None) -> dict:
    """Raw rows of the valid tokens, per FFN: {name: {"a": [N, d_ff], "x": [N, d_model], "g": ...}}.

    a is the down projection's input, x the FFN input (input of the up/gate projection), g the
    activation module's output (gated FFNs), r the residual stream entering the FFN block (the
    input of the norm before the FFN, `pre_ffn_norm`). Only the first `max_tokens` valid tokens are kept.
    Raises CaptureError naming the layer when an activation is NaN/Inf.
    """
    sites = sites or ffn_sites(model)
    device = model_device(model)
    store_device = torch.device(store_device) if store_device is not None else device
    out = {s.name: {"a": [], "x": [], "g": [], "r": []} for s in sites}
    state = {"valid": None}
    handles = []

    def keep(name, key, t):
        t2 = t.reshape(-1, t.shape[-1])
        v = state["valid"]
        if v.shape[0] != t2.shape[0]:
            raise CaptureError(f"{name}: saw {t2.shape[0]} token rows but the batch has {v.shape[0]} positions")
        out[name][key].append(t2[v.to(t2.device)].detach().to(store_device, dtype))

    for s in sites:
        handles.append(s.down.register_forward_pre_hook(
            lambda mod, args, name=s.name: keep(name, "a", args[0])))
        if want_x:
            src = s.gate if s.gate is not None else s.up
            if src is None:
                raise AdapterError(f"layer {s.layer} ({s.name}): no up/gate projection found to read the FFN input from")
            handles.append(src.register_forward_pre_hook(
                lambda mod, args, name=s.name: keep(name, "x", args[0])))
        if want_r:
            handles.append(pre_ffn_norm(model, s).register_forward_pre_hook(
                lambda mod, args, name=s.name: keep(name, "r", args[0])))
        if want_g and s.kind == GATED:
            if s.act is None:
                raise AdapterError(f"layer {s.layer} ({s.name}): no activation module to read act(gate) from")
            handles.append(s.act.register_forward_hook(
                lambda mod, args, output, name=s.name: keep(name, "g", output)))
    used = 0
    with _hooks(handles), torch.no_grad():
        for ids, m in batches:
            if max_tokens is not None and used >= max_tokens:
                break
            if max_tokens is not None and used + int(m.sum()) > max_tokens:
                rank = torch.cumsum(m.reshape(-1), 0).reshape(m.shape)
                m = m * (rank <= max_tokens - used).long()
            state["valid"] = m.reshape(-1) != 0
            _forward(model, ids.to(device), m.to(device))
            used += int(m.sum())
    res = {}
    for s in sites:
        d = {k: torch.cat(v) for k, v in out[s.name].items() if v}
        a = d.get("a")
        if a is None or a.shape[0] == 0:
            raise CaptureError(f"layer {s.layer} ({s.name}): no valid tokens reached this FFN "
                               "(empty dataset, or a mask that is all padding)")
        for k, t in d.items():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CaptureError(
                    f"layer {s.layer} ({s.name}): {bad} NaN/Inf values in the FFN "
                    f"{ {'a': 'activation a', 'x': 'input', 'r': 'block input', 'g': 'act(gate)'}[k]}. Check "
                    "the model's dtype (fp16 overflow is common: try bfloat16 or float32) and weights.")
        res[s.name] = d
    return res


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    return model(input_ids=ids, attention_mask=mask)
