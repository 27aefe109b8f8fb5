"""Adapter registry, `locate(model)`, and the structural fallback for unknown families."""

from __future__ import annotations

from torch import nn

from workbench.adapters.base import (
    GATED,
    PLAIN,
    Adapter,
    FFNSite,
    Layout,
    MixerSite,
    RouterSite,
    get_path,
    layer_index,
    linear_dims,
    normalize_activation,
)
from workbench.adapters.families import BUILTIN
from workbench.errors import AdapterError

_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, override: bool = False) -> Adapter:
    """Make `adapter` the one used for each of its `model_types`.

    Refuses to replace an existing registration unless `override=True`, so two packages cannot
    silently fight over a family.
    """
    if not adapter.model_types:
        raise AdapterError(f"adapter {adapter.name!r} names no model_types; give the config.model_type values it serves")
    for mt in adapter.model_types:
        old = _REGISTRY.get(mt)
        if old is not None and old is not adapter and not override:
            raise AdapterError(
                f"model_type {mt!r} already has adapter {old.name!r}; pass override=True to replace it"
            )
    for mt in adapter.model_types:
        _REGISTRY[mt] = adapter
    return adapter


def registered_adapters() -> dict[str, Adapter]:
    return dict(_REGISTRY)


def adapter_for(model: nn.Module) -> Adapter | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _REGISTRY.get(model_type) if model_type else None


for _a in BUILTIN:
    register_adapter(_a)


def _activation_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_activation", "hidden_act", "activation_function", "hidden_activation_fn"):
        val = getattr(cfg, attr, None)
        if isinstance(val, str):
            return val
    return None


def _find_blocks(model: nn.Module, adapter: Adapter) -> tuple[str, nn.ModuleList] | None:
    for path in adapter.blocks:
        mod = get_path(model, path)
        if isinstance(mod, nn.ModuleList):
            return path, mod
    return None


def _ffn_site(model, adapter, layer, name, ffn, role) -> FFNSite | None:
    down = get_path(ffn, adapter.down)
    if down is None or linear_dims(down) is None:
        return None
    d_ff, d_model = linear_dims(down)
    act = get_path(ffn, adapter.act) if adapter.act else None
    gate = up = None
    fused = False
    if adapter.fused_gate_up:
        gate = up = get_path(ffn, adapter.fused_gate_up)
        fused = True
        kind = GATED
    else:
        up = get_path(ffn, adapter.up) if adapter.up else None
        gate = get_path(ffn, adapter.gate) if adapter.gate else None
        kind = GATED if (adapter.kind == GATED and gate is not None) else PLAIN
    activation, threshold = normalize_activation(_activation_name(model), act)
    if act is not None:
        # the module is the source of truth where it says more than the config (FATReLU swap)
        act_name, act_t = normalize_activation(None, act)
        if act_name == "fatrelu":
            activation, threshold = act_name, act_t
    return FFNSite(layer=layer, name=name, kind=kind, activation=activation, module=ffn, down=down,
                   act=act, gate=gate, up=up, d_ff=d_ff, d_model=d_model, role=role,
                   threshold=threshold, fused_gate_up=fused)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _count(module: nn.Module, *names: str) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int):
            return v
    return None


def locate(model: nn.Module, adapter: Adapter | None = None) -> Layout:
    """Find every FFN, router and mixer of `model` through its family's adapter.

    Falls back to a structural search for models no adapter names. Raises `AdapterError` naming
    what was not found and how to register an adapter.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    adapter = adapter or adapter_for(model)
    if adapter is None:
        layout = _structural_layout(model, model_type)
        if layout.ffns or layout.routers or layout.mixers:
            return layout
        raise AdapterError(_unsupported_message(model, model_type, "no adapter is registered and the "
                                                "structural search found no FFN (a module with an "
                                                "up and a down projection and an activation)"))
    found = _find_blocks(model, adapter)
    if found is None:
        raise AdapterError(_unsupported_message(
            model, model_type, f"adapter {adapter.name!r} looked for the block list at "
            f"{list(adapter.blocks)} and found no ModuleList there"))
    blocks_path, blocks = found
    layout = Layout(adapter=adapter.name, model_type=model_type)
    for i, block in enumerate(blocks):
        base = _join(blocks_path, str(i))
        if adapter.router:
            router = get_path(block, adapter.router)
            if router is not None:
                experts_path = _join(base, adapter.experts) if adapter.experts else None
                experts = get_path(block, adapter.experts) if adapter.experts else None
                n_exp = _count(router, "num_experts", "n_experts") or _count(experts or router, "num_experts")
                if n_exp is None and hasattr(router, "weight"):
                    n_exp = int(router.weight.shape[0])
                shared_gate = get_path(block, adapter.shared_gate) if adapter.shared_gate else None
                layout.routers.append(RouterSite(
                    layer=i, name=_join(base, adapter.router), module=router, kind=adapter.router_kind,
                    n_experts=int(n_exp or 0), top_k=_count(router, "top_k", "num_experts_per_tok"),
                    experts_name=experts_path, shared_gate=shared_gate,
                    shared_gate_name=_join(base, adapter.shared_gate) if shared_gate is not None else None))
                if adapter.shared_ffn:
                    shared = get_path(block, adapter.shared_ffn)
                    if shared is not None:
                        site = _ffn_site(model, adapter, i, _join(base, adapter.shared_ffn), shared,
                                         "shared_expert")
                        if site is not None:
                            layout.ffns.append(site)
                continue
        if adapter.ffn is not None:
            ffn = get_path(block, adapter.ffn)
            if ffn is not None:
                site = _ffn_site(model, adapter, i, _join(base, adapter.ffn), ffn, "dense")
                if site is not None:
                    layout.ffns.append(site)
        if adapter.mixer:
            mixer = get_path(block, adapter.mixer)
            if mixer is not None:
                layout.mixers.append(MixerSite(layer=i, name=_join(base, adapter.mixer), module=mixer,
                                               kind=adapter.mixer_kind or "ssm"))
    if not (layout.ffns or layout.routers or layout.mixers):
        raise AdapterError(_unsupported_message(
            model, model_type, f"adapter {adapter.name!r} found blocks at {blocks_path!r} but no "
            f"FFN ({adapter.ffn}.{adapter.down}), router ({adapter.router}) or mixer ({adapter.mixer}) in them"))
    return layout


_DOWN_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "wo", "out_proj", "down")
_UP_NAMES = ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "w3", "wi", "up", "fc_in")
_GATE_NAMES = ("gate_proj", "w1", "gate", "wi_0")
_ACT_MARKERS = ("act", "gelu", "relu", "silu", "swish", "activation", "tanh", "mish")


def _is_activation(m: nn.Module) -> bool:
    mod = type(m).__module__
    name = type(m).__name__.lower()
    return (mod.startswith("torch.nn.modules.activation") or mod.startswith("transformers.activations")
            or any(k in name for k in ("relu", "gelu", "silu", "swish", "activation")))


def _structural_layout(model: nn.Module, model_type: str) -> Layout:
    """Find FFNs by shape: a module whose children include an up (d_model -> d_ff) projection,
    a down (d_ff -> d_model) projection and an activation module."""
    layout = Layout(adapter="structural", model_type=model_type)
    act_name = _activation_name(model)
    for name, mod in model.named_modules():
        children = dict(mod.named_children())
        lins = {n: linear_dims(c) for n, c in children.items() if linear_dims(c) is not None}
        acts = [n for n, c in children.items() if _is_activation(c)]
        if len(lins) < 2 or len(lins) > 3 or not acts:
            continue
        downs = [n for n, (i, o) in lins.items() if i > o]
        if len(downs) != 1:
            continue
        down_name = downs[0]
        d_ff, d_model = lins[down_name]
        ups = [n for n, (i, o) in lins.items() if n != down_name and i == d_model and o == d_ff]
        if not ups:
            continue
        gate_name = next((n for n in ups if n in _GATE_NAMES or "gate" in n), None) if len(ups) == 2 else None
        up_name = next(n for n in ups if n != gate_name)
        act_mod = children[acts[0]]
        activation, threshold = normalize_activation(act_name, act_mod)
        layout.ffns.append(FFNSite(
            layer=layer_index(name), name=name, kind=GATED if gate_name else PLAIN, activation=activation,
            module=mod, down=children[down_name], act=act_mod,
            gate=children[gate_name] if gate_name else None, up=children[up_name], d_ff=d_ff,
            d_model=d_model, threshold=threshold))
    return layout


def _unsupported_message(model: nn.Module, model_type: str, what: str) -> str:
    return (
        f"cannot locate the FFNs of {type(model).__name__} (model_type {model_type!r}): {what}. "
        "Register an adapter for it, e.g.\n"
        "  wb.register_adapter(wb.Adapter(name='mine', model_types=('"
        f"{model_type}',), blocks=('model.layers',), ffn='mlp', kind='gated', gate='gate_proj', "
        "up='up_proj', down='down_proj', act='act_fn'))\n"
        "(paths are relative to each block; see workbench.adapters.Adapter)"
    )
