"""Interventions and perplexity against brute-force float64 computations."""

import math

import numpy as np
import pytest
import torch

from tests.metrics.helpers import padded_batch, tiny_gpt2, tiny_llama
from workbench.capture.core import active_hooks
from workbench.capture.rules import Rule
from workbench.errors import AdapterError, CaptureError
from workbench.metrics import intervene, nll, perplexity, sparsity_table
from workbench.metrics._data import collect, ffn_sites


def brute_nll(model, ids, mask):
    """Each sequence alone, without padding, token by token in float64."""
    total, n = 0.0, 0
    with torch.no_grad():
        for row, m in zip(ids, mask):
            seq = row[m.bool()]
            if seq.numel() < 2:
                continue
            logits = model(input_ids=seq[None]).logits[0].double()
            for s in range(seq.numel() - 1):
                lp = logits[s] - torch.logsumexp(logits[s], 0)
                total -= float(lp[seq[s + 1]])
                n += 1
    return total, n


@pytest.mark.parametrize("side", ["right", "left", "mixed"])
def test_nll_equals_brute_force_with_padding(relu_llama, side):
    ids, m = padded_batch(seed=3)
    if side == "right":
        m = torch.ones_like(ids)
        m[0, 15:] = 0
        m[3, 2:] = 0
    elif side == "left":
        m = torch.ones_like(ids)
        m[1, :9] = 0
        m[2, :19] = 0  # one valid token: no prediction from that row
    got = nll(relu_llama, [(ids, m)])
    total, n = brute_nll(relu_llama, ids, m)
    assert got.tokens == n
    assert got.total == pytest.approx(total, rel=1e-5)
    assert perplexity(relu_llama, ids, attention_mask=m) == pytest.approx(math.exp(total / n), rel=1e-5)


@pytest.mark.parametrize("rule", ["zero", "fat(0.05)", "topk(5)", "magnitude(0.02)", Rule.magnitude({0: 0.01, 1: 0.03})])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_intervene_zeroes_exactly_the_inactive_entries(rule, act):
    model = tiny_llama(act)
    rule = Rule.parse(rule)
    ids, m = padded_batch(seed=1)
    site = ffn_sites(model)[0]  # layer 0 sees the same input with and without the intervention
    dense = collect(model, [(ids, m)], want_g=True)[site.name]
    with intervene(model, rule):
        seen = collect(model, [(ids, m)])[site.name]["a"]
    a, g = dense["a"].double().numpy(), dense["g"].double().numpy()
    norms = site.down_column_norms().numpy()
    want = np.zeros_like(a)
    for tok in range(a.shape[0]):
        if rule.kind == "topk":
            order = np.argsort(-np.abs(g[tok]), kind="stable")[: rule.k]
            keep = np.zeros(a.shape[1], bool)
            keep[order] = True
        for i in range(a.shape[1]):
            if rule.kind == "zero":
                on = a[tok, i] != 0
            elif rule.kind == "fat":
                on = abs(g[tok, i]) > rule.threshold
            elif rule.kind == "topk":
                on = keep[i]
            else:
                on = abs(a[tok, i]) * norms[i] > rule.layer_threshold(0)
            want[tok, i] = a[tok, i] if on else 0.0
    np.testing.assert_allclose(seen.double().numpy(), want, rtol=1e-6, atol=1e-7)
    assert active_hooks(model) == 0


def test_intervene_restores_model_also_after_an_error(relu_llama):
    ids, m = padded_batch()
    with torch.no_grad():
        before = relu_llama(input_ids=ids, attention_mask=m).logits
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(relu_llama, "topk(2)"):
            assert active_hooks(relu_llama) > 0
            raise RuntimeError("boom")
    assert active_hooks(relu_llama) == 0
    with torch.no_grad():
        after = relu_llama(input_ids=ids, attention_mask=m).logits
    assert torch.equal(before, after)
    # the zero rule changes nothing on a ReLU model
    with intervene(relu_llama, "zero"), torch.no_grad():
        assert torch.equal(relu_llama(input_ids=ids, attention_mask=m).logits, before)


def test_intervene_gpt2_plain_ffn():
    model = tiny_gpt2()
    ids, m = padded_batch()
    base = nll(model, [(ids, m)]).total
    with intervene(model, "topk(4)"):
        cut = nll(model, [(ids, m)]).total
    assert cut != base and active_hooks(model) == 0


def test_sparsity_table_matches_brute_force(relu_llama):
    ids, m = padded_batch(seed=2)
    df = sparsity_table(relu_llama, [(ids, m)], rules=["zero", "fat(0.05)"])
    rows = collect(relu_llama, [(ids, m)], want_g=True)
    for site in ffn_sites(relu_llama):
        a, g = rows[site.name]["a"].double(), rows[site.name]["g"].double()
        assert a.shape[0] == int(m.sum())
        for rule, act in (("zero", (a != 0)), ("fat(0.05)", (g.abs() > 0.05))):
            got = df[(df.rule == rule) & (df.layer == site.layer)].iloc[0]
            assert got.token_sparsity == pytest.approx(1 - float(act.double().mean()), abs=1e-12)


def test_bad_inputs_name_layer_and_cause(relu_llama):
    # a model without FFNs the adapters know
    class NoFFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(8, 4)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    with pytest.raises(AdapterError, match="FFN"):
        sparsity_table(NoFFN(), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(AdapterError, match="FFN"):
        with intervene(NoFFN(), "zero"):
            pass
    # an empty dataset
    with pytest.raises(CaptureError, match="empty"):
        perplexity(relu_llama, [])
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(CaptureError, match="empty"):
        perplexity(relu_llama, ids, attention_mask=torch.zeros_like(ids))
    # NaN activations: poison layer 1's up projection
    model = tiny_llama("relu")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("nan")
    with pytest.raises(CaptureError, match=r"layer 1 \(model\.layers\.1\.mlp\).*NaN"):
        collect(model, [padded_batch()])
    from workbench.metrics import cett_thresholds

    with pytest.raises(CaptureError, match=r"layer 1 \(model\.layers\.1\.mlp\)"):
        cett_thresholds(model, [padded_batch()], 0.1)


def test_sparsity_table_needs_a_rule(relu_llama):
    from workbench.errors import WorkbenchError

    ids, m = padded_batch(seed=2)
    with pytest.raises(WorkbenchError, match=r"rules=\[\]: give at least one rule"):
        sparsity_table(relu_llama, [(ids, m)], rules=[])
    df = sparsity_table(relu_llama, [(ids, m)], rules="zero")  # one rule as a string, not its letters
    assert set(df.rule) == {"zero"}


def test_intervene_refuses_topk_above_d_ff(relu_llama):
    with pytest.raises(CaptureError, match=r"topk\(65\) asks for more neurons than layer 0 .*d_ff = 64"):
        with intervene(relu_llama, "topk(65)"):
            pass
