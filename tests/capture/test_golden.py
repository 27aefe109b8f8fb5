"""Capture statistics equal a brute-force float64 computation from the full activation tensors,
for every family with a dense or shared FFN, under every rule, with right and left padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from tests import tiny
from workbench.adapters import GATED
from workbench.capture.sketch import SketchSpec

RULES = ["zero", "fat(0.02)", "topk(5)", "magnitude"]


def _batch(side: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, tiny.VOCAB, (3, 11), generator=g)
    lengths = [11, 6, 3]
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 11 - n:] = 1
    return ids, mask


def _record_full(model, sites, ids, mask):
    """Plain hooks that keep every FFN's full a and act output (the brute-force source)."""
    store, handles = {}, []
    for s in sites:
        handles.append(s.down.register_forward_pre_hook(
            lambda m, args, name=s.name: store.setdefault(name, {}).__setitem__("a", args[0].detach().clone())))
        if s.act is not None:
            handles.append(s.act.register_forward_hook(
                lambda m, args, out, name=s.name: store.setdefault(name, {}).__setitem__("g", out.detach().clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return store


def _brute_active(rule: str, site, a: np.ndarray, g: np.ndarray | None, thr_mag: float) -> np.ndarray:
    gated = site.kind == GATED
    if rule == "zero":
        return a != 0
    if rule.startswith("fat"):
        src = g if gated else a
        return np.abs(src) > 0.02
    if rule.startswith("topk"):
        src = np.abs(g if gated else a)
        out = np.zeros_like(src, dtype=bool)
        order = np.argsort(-src, axis=1, kind="stable")[:, :5]
        np.put_along_axis(out, order, True, axis=1)
        return out
    w = site.down_weight().detach().double().numpy()
    norms = np.sqrt((w ** 2).sum(axis=0))
    return np.abs(a) * norms > thr_mag


@pytest.mark.parametrize("family", tiny.DENSE_FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_stats_match_brute_force(family, side):
    model = tiny.build(family)
    layout = wb.locate(model)
    sites = layout.ffns
    assert sites, family
    ids, mask = _batch(side, seed=hash((family, side)) % 1000)
    full = _record_full(model, sites, ids, mask)
    valid = mask.reshape(-1).numpy().astype(bool)
    for rule_name in RULES:
        rule = wb.Rule.magnitude(0.01) if rule_name == "magnitude" else rule_name
        with wb.capture(model, rule=rule) as run:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        summary = run.summary().set_index("name")
        for s in sites:
            a = full[s.name]["a"].reshape(-1, s.d_ff).double().numpy()
            g = full[s.name].get("g")
            g = None if g is None else g.reshape(-1, g.shape[-1]).double().numpy()
            if g is not None and g.shape[1] != s.d_ff:
                g = None if s.kind != GATED else g
            act = _brute_active(rule_name, s, a, g, 0.01)[valid]
            av = np.abs(a[valid])
            st = run.neuron_stats(s.name)
            assert int(st["tokens"]) == valid.sum()
            np.testing.assert_array_equal(st["active"].numpy(), act.sum(0), err_msg=f"{family} {rule_name} {s.name}")
            np.testing.assert_array_equal(st["nonzero"].numpy(), (a[valid] != 0).sum(0))
            np.testing.assert_allclose(st["abs_sum"].numpy(), av.sum(0), rtol=1e-12, atol=1e-15)
            np.testing.assert_array_equal(st["abs_max"].numpy(), av.max(0))
            ts = 1.0 - act.sum() / (valid.sum() * s.d_ff)
            assert summary.loc[s.name, "token_sparsity"] == pytest.approx(ts, abs=1e-12)
            assert summary.loc[s.name, "layer"] == s.layer


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantile_sketch_within_bound(family):
    model = tiny.build(family)
    ids, mask = _batch("right", seed=7)
    sites = wb.locate(model).ffns
    full = _record_full(model, sites, ids, mask)
    valid = mask.reshape(-1).numpy().astype(bool)
    with wb.capture(model, probes=["neuron_stats", "abs_sketch"]) as run:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    spec = SketchSpec()
    qs = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999]
    for s in sites:
        x = np.sort(np.abs(full[s.name]["a"].reshape(-1, s.d_ff).double().numpy()[valid]).ravel())
        exact = x[np.floor(np.array(qs) * (x.size - 1)).astype(int)]
        est = run.quantiles(s.name, qs).numpy()
        for q, e, v in zip(qs, exact, est):
            if e == 0:
                assert v == 0, (q, e, v)
            else:
                assert abs(v - e) <= spec.alpha * e * (1 + 1e-9), (q, e, v)


def test_sketch_bound_on_wide_range():
    spec = SketchSpec()
    g = torch.Generator().manual_seed(3)
    x = torch.exp(torch.randn(20001, generator=g, dtype=torch.float64) * 6)  # ~1e-8 .. 1e8 in the tails
    x = x.clamp(spec.min_value, spec.max_value)
    hist = torch.bincount(spec.bucket(x), minlength=spec.n_buckets)
    from workbench.capture.sketch import quantiles

    qs = torch.linspace(0, 1, 101, dtype=torch.float64)
    xs = x.sort().values
    exact = xs[torch.floor(qs * (x.numel() - 1)).long()]
    est = quantiles(hist, qs, spec)
    assert torch.all((est - exact).abs() <= spec.alpha * exact * (1 + 1e-9))
