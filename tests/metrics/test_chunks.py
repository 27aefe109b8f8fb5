"""Model-level CLS_L (chunks.py) against brute-force loops over the recorded activity masks."""

import numpy as np
import pytest
import torch

from tests import tiny
from workbench.metrics.chunks import chunk_table


def brute_cls(masks, attn, L):
    """masks: list over batches of [B, S, U] bool; per sequence, windows of L valid tokens."""
    num = den = 0
    for act, m in zip(masks, attn):
        for row in range(act.shape[0]):
            seq = act[row][m[row].bool()].numpy()
            for w in range(seq.shape[0] // L):
                union = seq[w * L:(w + 1) * L].any(0)
                num += union.sum()
                den += union.size
    return float("nan") if den == 0 else 1 - num / den


def _blockffn():
    from workbench.models.blockffn import BlockFFNConfig, BlockFFNForCausalLM

    torch.manual_seed(0)
    cfg = BlockFFNConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, n_experts=8, expert_size=8)
    return BlockFFNForCausalLM(cfg).eval()


@pytest.mark.parametrize("which", ["blockffn", "mixtral", "llama"])
def test_chunk_table_equals_brute_force(which):
    model = {"blockffn": _blockffn, "mixtral": lambda: tiny.build("mixtral"), "llama": lambda: tiny.build("llama")}[which]()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 23), generator=g)
    m = torch.ones_like(ids)
    m[0, :7] = 0  # left padding
    m[1, 15:] = 0  # right padding
    m[2, 4:] = 0  # shorter than most L
    lengths = (1, 2, 3, 4, 8, 64)
    df = chunk_table(model, [(ids, m)], lengths=lengths)
    # record the masks independently
    recorded = {}
    hooks = []
    if which == "llama":
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda mod, a, i=i: recorded.__setitem__(i, a[0] != 0)))
    elif which == "blockffn":
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.mlp.router.register_forward_hook(
                lambda mod, a, out, i=i: recorded.__setitem__(i, out != 0)))
    else:
        for i, layer in enumerate(model.model.layers):
            def h(mod, a, out, i=i):
                t = out[0] if isinstance(out, tuple) else out
                top = t.topk(model.config.num_experts_per_tok, -1).indices
                recorded[i] = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, top, True)
            hooks.append(layer.mlp.gate.register_forward_hook(h))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=m)
    for h in hooks:
        h.remove()
    units = "neurons" if which == "llama" else "experts"
    for L in lengths:
        for layer, act in recorded.items():
            act = act.reshape(4, 23, -1)
            got = df[(df.layer == layer) & (df.L == L)].iloc[0]
            assert got.units == units
            want = brute_cls([act], [m], L)
            if np.isnan(want):
                assert np.isnan(got.cls)
            else:
                assert got.cls == pytest.approx(want, abs=1e-12)
        pooled = brute_cls([a.reshape(4, 23, -1) for a in recorded.values()], [m] * len(recorded), L)
        got = df[(df.layer == -1) & (df.L == L)].iloc[0].cls
        assert (np.isnan(got) and np.isnan(pooled)) or got == pytest.approx(pooled, abs=1e-12)


def test_chunk_table_lengths_and_units_arguments():
    from workbench.errors import WorkbenchError

    model = tiny.build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    data = [(ids, torch.ones_like(ids))]
    one = chunk_table(model, data, lengths=8)  # a single length is [8]
    assert one.equals(chunk_table(model, data, lengths=[8])) and set(one.L) == {8}
    with pytest.raises(WorkbenchError, match=r"units='bogus': use one of \('auto', 'experts', 'neurons'\)"):
        chunk_table(model, data, units="bogus")
    for bad, match in (([], r"lengths=\(\): give at least one"), ([2.5], r"whole numbers >= 1 \(got 2.5\)"),
                       ([0, 4], r"whole numbers >= 1 \(got 0\)"), ("8", r"lengths='8'")):
        with pytest.raises(WorkbenchError, match=match):
            chunk_table(model, data, lengths=bad)
