"""BlockFFN layer, its Auto registration, the DECO options and the two training objectives."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import workbench  # noqa: F401  (registers BlockFFN)
from workbench.models.blockffn import (
    BlockFFNConfig,
    BlockFFNForCausalLM,
    BlockFFNModel,
    chunk_sparsity_loss,
    locality_loss,
)


def tiny(**kw):
    base = dict(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        n_experts=4, expert_size=64, intermediate_size=256, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    return BlockFFNConfig(**{**base, **kw})


@pytest.mark.parametrize("act,scale", [("silu", False), ("normsilu", True)])
def test_save_load_generate_through_auto_classes(tmp_path, act, scale):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny(expert_act=act, router_scale=scale)).eval()
    assert isinstance(model, BlockFFNForCausalLM)
    x = torch.randint(2, 97, (2, 12))
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "blockffn"
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, again(x).logits, atol=1e-5)
        out = again.generate(x[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 9)
    assert isinstance(AutoModel.from_pretrained(tmp_path), BlockFFNModel)


def test_layer_matches_its_definition():
    """output = sum_i A_i * down_i(SiLU(up_i x)), A = RMSNorm(ReLU(W_r x))."""
    torch.manual_seed(1)
    model = BlockFFNForCausalLM(tiny())
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        a1 = torch.relu(x @ mlp.router.proj.weight.T)
        a = a1 * torch.rsqrt(a1.pow(2).mean(-1, keepdim=True) + 1e-6) * mlp.router.norm.weight
        want = torch.zeros_like(x)
        for i in range(4):
            up = mlp.up_proj.weight[i * 64 : (i + 1) * 64]
            down = mlp.down_proj.weight[:, i * 64 : (i + 1) * 64]
            want += a[..., i : i + 1] * (torch.nn.functional.silu(x @ up.T) @ down.T)
        assert torch.allclose(mlp(x), want, atol=1e-5)
        assert torch.equal(mlp.router(x) == 0, a1 == 0)


def test_locality_loss_brute_force():
    torch.manual_seed(2)
    a0 = torch.randn(2, 6, 3) * 0.05
    want = []
    for b in range(2):
        for t in range(1, 6):
            for e in range(3):
                z, y = 100 * a0[b, t - 1, e], torch.sigmoid(100 * a0[b, t, e])
                want.append(-(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))))
    assert locality_loss(a0) == pytest.approx(float(torch.stack(want).mean()), rel=1e-4)


def test_chunk_sparsity_loss_brute_force():
    torch.manual_seed(3)
    a1 = torch.relu(torch.randn(2, 9, 4))
    vals = []
    for b in range(2):
        for c in range(2):  # chunks of 4 tokens; the 9th token is dropped
            for i in range(4):
                keep = 1.0
                for k in range(c * 4, c * 4 + 4):
                    s = float(a1[b, k].sum())
                    keep *= 1 - (float(a1[b, k, i]) / s if s > 0 else 0.0)
                vals.append(1 - keep)
    assert float(chunk_sparsity_loss(a1, chunk=4)) == pytest.approx(sum(vals) / len(vals), rel=1e-4)
    # concentrating every token on one expert gives the minimum, 1 / n_experts
    one = torch.zeros(1, 8, 4)
    one[..., 2] = 1.0
    assert float(chunk_sparsity_loss(one, chunk=8)) == pytest.approx(0.25, abs=1e-5)


def test_objectives_have_finite_gradients():
    torch.manual_seed(4)
    model = BlockFFNForCausalLM(tiny())
    for layer in model.model.layers:
        layer.mlp.router.record = True
    x = torch.randint(2, 97, (2, 16))
    out = model(input_ids=x, labels=x)
    rts = [layer.mlp.router for layer in model.model.layers]
    loss = out.loss + 2e-3 * sum(locality_loss(r.last[0]) for r in rts)
    loss = loss + 0.2 * sum(chunk_sparsity_loss(r.last[1], chunk=8) for r in rts)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
