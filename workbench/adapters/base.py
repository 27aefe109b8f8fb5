"""Adapters: where each FFN, router and SSM mixer lives in a model, as data.

An `Adapter` is declarative (module paths and roles), never a subclass of a Hugging Face model.
`locate(model)` turns it into a `Layout`: concrete `FFNSite`, `RouterSite` and `MixerSite`
records that capture, metrics and acceleration all share.

The activation `a` of an FFN is the input of its down projection, per token, shape
[tokens, d_ff]: act(gate) * up for gated FFNs, act(up) for non-gated ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.errors import AdapterError

GATED = "gated"
PLAIN = "plain"


@dataclass(frozen=True)
class Adapter:
    """Where a model family keeps its FFNs, routers and mixers (paths relative to a block).

    blocks: candidate paths of the ModuleList of transformer/SSM blocks, tried in order
        (e.g. "model.layers" for a *ForCausalLM, "layers" for the bare *Model).
    ffn: path of the FFN inside a block ("" means the block itself holds the projections).
    kind: "gated" (down(act(gate(x)) * up(x))) or "plain" (down(act(up(x)))).
    gate, up, down, act: child paths inside the FFN. `fused_gate_up` names a single projection
        producing [gate | up] (Phi-3); then `gate`/`up` are ignored.
    router, experts: paths of the router and the fused experts of an MoE layer (relative to a block).
    router_kind: how the router turns logits into a selection (see workbench.capture.routing):
        "topk_softmax" (softmax, then top-k: Mixtral, Qwen2/3-MoE, OLMoE), "sigmoid_topk"
        (sigmoid scores, a selection-only bias, grouped top-k: DeepSeek-V3), "topk_logits"
        (top-k of the logits, softmax over the k: GPT-OSS) or "relu" (BlockFFN/DECO: every
        expert with a nonzero score is active).
    shared_ffn: path of a shared expert that is an FFN with the same child names (Qwen2-MoE).
    shared_gate: path of the shared expert's scalar gate (Qwen2-MoE: sigmoid(gate(x)) scales it).
    mixer, mixer_kind: the SSM mixer of a block ("mamba" or "mamba2").
    """

    name: str
    model_types: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ("model.layers", "layers")
    ffn: str | None = "mlp"
    kind: str = GATED
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    down: str = "down_proj"
    act: str = "act_fn"
    fused_gate_up: str | None = None
    router: str | None = None
    router_kind: str = "topk_softmax"
    experts: str | None = None
    shared_ffn: str | None = None
    shared_gate: str | None = None
    mixer: str | None = None
    mixer_kind: str | None = None


@dataclass(eq=False)
class FFNSite:
    """One FFN of a model: its modules and what its activation means."""

    layer: int
    name: str
    kind: str
    activation: str
    module: nn.Module
    down: nn.Module
    act: nn.Module | None
    gate: nn.Module | None
    up: nn.Module | None
    d_ff: int
    d_model: int
    role: str = "dense"  # "dense" | "shared_expert"
    threshold: float | None = None  # FATReLU threshold T where the activation is FATReLU
    fused_gate_up: bool = False

    @property
    def key(self) -> str:
        return self.name

    def down_weight(self) -> torch.Tensor:
        """W_down as [d_model, d_ff] (Conv1D stores it transposed)."""
        w = self.down.weight
        if tuple(w.shape) == (self.d_model, self.d_ff):
            return w
        return w.t()

    def down_column_norms(self) -> torch.Tensor:
        """||W_down[:, i]||_2 for each neuron i, float64 [d_ff] (ReLU^2 Wins / CETT)."""
        w = _materialized_weight(self.down)
        if tuple(w.shape) != (self.d_model, self.d_ff):
            w = w.t()
        return w.detach().double().norm(dim=0)


@dataclass(eq=False)
class RouterSite:
    layer: int
    name: str
    module: nn.Module
    kind: str
    n_experts: int
    top_k: int | None
    experts_name: str | None = None
    shared_gate: nn.Module | None = None  # the shared expert's scalar gate (Qwen2-MoE), if any
    shared_gate_name: str | None = None


@dataclass(eq=False)
class MixerSite:
    layer: int
    name: str
    module: nn.Module
    kind: str


@dataclass(eq=False)
class Layout:
    """Everything the adapters found in one model."""

    adapter: str
    model_type: str
    ffns: list[FFNSite] = field(default_factory=list)
    routers: list[RouterSite] = field(default_factory=list)
    mixers: list[MixerSite] = field(default_factory=list)

    def ffn(self, layer: int, role: str = "dense") -> FFNSite:
        for site in self.ffns:
            if site.layer == layer and site.role == role:
                return site
        raise AdapterError(f"no {role} FFN at layer {layer}; layers with FFNs: {[s.layer for s in self.ffns]}")


def _materialized_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight, loaded from accelerate's offload if it currently lives on `meta`."""
    w = module.weight
    if w.device.type != "meta":
        return w
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is not None:
        return weights_map["weight"]
    raise AdapterError(
        "the down projection's weight is on the meta device and no offload map was found; "
        "load the model with real weights (or through accelerate's device_map) first"
    )


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    if path == "":
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise AdapterError("module is not part of the model")


_ACT_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "relu2": "relu2",
    "relu_squared": "relu2",
    "fatrelu": "fatrelu",
}


def normalize_activation(name: str | None, act_module: nn.Module | None = None) -> tuple[str, float | None]:
    """Activation family name ("silu", "gelu", "relu", "relu2", "fatrelu", or the raw name) and T."""
    threshold = getattr(act_module, "threshold", None) if act_module is not None else None
    cls = type(act_module).__name__.lower() if act_module is not None else ""
    if "fatrelu" in cls:
        return "fatrelu", float(threshold) if threshold is not None else None
    if "relusquared" in cls or "relu2" in cls:
        return "relu2", None
    if name is None:
        if "silu" in cls or "swish" in cls:
            return "silu", None
        if "gelu" in cls:
            return "gelu", None
        if "relu" in cls:
            return "relu", None
        return cls or "unknown", None
    n = str(name).lower()
    if n in _ACT_ALIASES:
        return _ACT_ALIASES[n], None
    if n.startswith("gelu"):
        return "gelu", None
    return n, None


def layer_index(path: str) -> int:
    """0-based block index: the first integer component of a module path."""
    for part in path.split("."):
        if re.fullmatch(r"\d+", part):
            return int(part)
    return 0


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or HF Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None
