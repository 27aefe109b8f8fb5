"""Adapters locate every FFN, router and mixer, checked against the module tree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb
from tests import tiny
from workbench.errors import AdapterError


def _modules_of(model, cls_suffix: str):
    return sorted(n for n, m in model.named_modules() if type(m).__name__.endswith(cls_suffix))


@pytest.mark.parametrize("family,router_cls", [("mixtral", "TopKRouter"), ("qwen2_moe", "TopKRouter"),
                                               ("olmoe", "TopKRouter")])
def test_every_router_found(family, router_cls):
    model = tiny.build(family)
    layout = wb.locate(model)
    assert sorted(r.name for r in layout.routers) == _modules_of(model, router_cls)
    for r in layout.routers:
        assert r.n_experts == 4 and r.top_k == 2
        assert r.experts_name and type(model.get_submodule(r.experts_name)).__name__.endswith("Experts")


def test_qwen2_moe_shared_and_dense_ffns():
    model = tiny.build("qwen2_moe")
    layout = wb.locate(model)
    shared = [s.name for s in layout.ffns if s.role == "shared_expert"]
    dense = [s.name for s in layout.ffns if s.role == "dense"]
    assert shared == [n for n in _modules_of(model, "MLP") if n.endswith("shared_expert")]
    assert dense == ["model.layers.1.mlp"]  # mlp_only_layers=[1]


@pytest.mark.parametrize("family,mixer_cls", [("mamba", "MambaMixer"), ("mamba2", "Mamba2Mixer")])
def test_every_mixer_found(family, mixer_cls):
    model = tiny.build(family)
    layout = wb.locate(model)
    assert [m.name for m in layout.mixers] == _modules_of(model, mixer_cls)
    assert {m.kind for m in layout.mixers} == {family}


@pytest.mark.parametrize("family", tiny.DENSE_FAMILIES)
def test_every_dense_ffn_found(family):
    model = tiny.build(family)
    layout = wb.locate(model)
    n_blocks = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    assert [s.layer for s in layout.ffns] == list(range(n_blocks))
    for s in layout.ffns:
        assert s.down_weight().shape == (s.d_model, s.d_ff)
        assert s.act is not None


def test_activation_names():
    assert {s.activation for s in wb.locate(tiny.build("llama")).ffns} == {"relu"}
    assert {s.activation for s in wb.locate(tiny.build("mistral")).ffns} == {"silu"}
    assert {s.activation for s in wb.locate(tiny.build("gpt2")).ffns} == {"gelu"}
    assert {s.activation for s in wb.locate(tiny.build("llama", act="relu2")).ffns} == {"relu2"}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.ffn = nn.ModuleDict({"w_in": nn.Linear(16, 32), "nonlin": nn.GELU(), "w_out": nn.Linear(32, 16)})


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([_Block() for _ in range(3)])

    def forward(self, x):
        for b in self.stack:
            x = x + b.attn(x)
            x = x + b.ffn["w_out"](b.ffn["nonlin"](b.ffn["w_in"](x)))
        return x


def test_structural_fallback_finds_ffns_by_shape():
    layout = wb.locate(_Custom())
    assert layout.adapter == "structural"
    assert [(s.layer, s.name, s.kind, s.d_ff) for s in layout.ffns] == [
        (i, f"stack.{i}.ffn", "plain", 32) for i in range(3)]


def test_unsupported_model_error_names_what_and_how():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)

    with pytest.raises(AdapterError, match=r"register_adapter"):
        wb.locate(Opaque())


def test_register_custom_adapter():
    class Cfg:
        model_type = "my-arch"

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.blocks = nn.ModuleList([nn.ModuleDict({"mix": nn.ModuleDict({
                "g": nn.Linear(8, 16), "u": nn.Linear(8, 16), "a": nn.SiLU(), "d": nn.Linear(16, 8)})})
                for _ in range(2)])

    adapter = wb.Adapter(name="mine", model_types=("my-arch",), blocks=("blocks",), ffn="mix", gate="g",
                         up="u", act="a", down="d")
    wb.register_adapter(adapter)
    try:
        layout = wb.locate(Mine())
        assert [(s.name, s.kind, s.activation) for s in layout.ffns] == [
            ("blocks.0.mix", "gated", "silu"), ("blocks.1.mix", "gated", "silu")]
        with pytest.raises(AdapterError, match="override=True"):
            wb.register_adapter(wb.Adapter(name="other", model_types=("my-arch",)))
    finally:
        from workbench.adapters import registry

        registry._REGISTRY.pop("my-arch", None)


def test_adapter_with_wrong_paths_says_what_it_looked_for():
    model = tiny.build("llama")
    bad = wb.Adapter(name="bad", model_types=("llama",), blocks=("nope.layers",))
    with pytest.raises(AdapterError, match="nope.layers"):
        wb.locate(model, adapter=bad)


def test_conv1d_down_weight_orientation():
    model = tiny.build("gpt2")
    s = wb.locate(model).ffns[0]
    a = torch.randn(5, s.d_ff)
    # c_proj(a) == a @ W_down^T + b with W_down [d_model, d_ff]
    torch.testing.assert_close(s.down(a), a @ s.down_weight().t() + s.down.bias)
