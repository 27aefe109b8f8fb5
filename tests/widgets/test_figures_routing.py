"""Routing figures and the routing view, on tiny runs (no server)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import panel as pn
import pytest
import torch
from workbench.widgets import figures_routing as fr
from workbench.widgets.views import views_for
from workbench.widgets.views.routing import RoutingView

import workbench as wb
import workbench.metrics as wm
from tests import tiny
from workbench.capture import Capture
from workbench.metrics.routing import Sample, sample


def _run(family, seed=0, labels=True):
    model = tiny.build_router(family)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, tiny.VOCAB, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with Capture(model, probes=[wb.RoutingProbe(budget=40)]) as cap:
        if labels:
            cap.set_labels(torch.tensor([0, 1, 0, 1]))
        model(input_ids=ids, attention_mask=mask)
    if labels:
        cap.run.meta["labels"] = {"names": ["code", "prose"]}
    return cap.run


@pytest.fixture(scope="module")
def runs():
    return _run("mixtral"), _run("blockffn")


def test_heatmap_pools_past_max_columns_and_says_so():
    t, e = 4096, 64
    rng = np.random.default_rng(0)
    w = rng.random((t, e)).astype(np.float32)
    s = Sample(3, w, w > 0.5, pd.DataFrame({"text": [f"w{i}" for i in range(t)]}))
    fig = fr.routing_heatmap_figure(s, max_columns=512)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (64, 512)
    np.testing.assert_allclose(z[:, 0], w[:8].mean(0), atol=1e-4)
    assert "pooled: mean over 8 consecutive tokens" in fig.layout.title.text
    assert fig.data[0].x[1].startswith("8-15: w8w9")
    assert len(fig.to_json()) < 2_000_000
    small = fr.routing_heatmap_figure(Sample(0, w[:20], w[:20] > 0.5, pd.DataFrame({"text": ["a"] * 20})))
    assert "pooled" not in small.layout.title.text and np.asarray(small.data[0].z).shape == (64, 20)


def test_figures_from_tables(runs):
    a, _ = runs
    s = sample(a, 1)
    fig = fr.routing_heatmap_figure(s, value="selected")
    assert np.asarray(fig.data[0].z).shape == (4, s.weights.shape[0])
    load = wm.routing_load(a)
    z = np.asarray(fr.load_figure(load).data[0].z)
    np.testing.assert_allclose(z, load.pivot(index="layer", columns="expert", values="load").to_numpy())
    cos = wm.coselection(a, 1)
    lift = fr.lift_figure(cos, 1)
    row = cos[(cos.a == 0) & (cos.b == 1)].iloc[0]
    assert lift.data[0].customdata[0][1][0] == pytest.approx(row.lift)
    dom = fr.domain_figure(wm.domain_specialisation(a), 1)
    assert list(dom.data[0].y) == ["code", "prose"] and "baseline 0.500" in dom.layout.title.text
    vfig = fr.vocab_figure(wm.vocab_specialisation(a, min_count=1), 1)
    assert len(vfig.data) == 2
    lm = fr.layer_metric_figure({"a": wm.routing_layers(a)}, "reuse")
    assert list(lm.data[0].x) == [0.25, 0.75]


def test_compare_figures(runs):
    a, b = runs
    al = wm.align_experts(a, b, 1, 1)
    xa, xb, toks = wm.token_difference(a, b, 1, 1, alignment=al)
    side = fr.compare_heatmap_figure(xa, xb, toks, mode="side", names=("moe", "bffn"), alignment=al)
    assert len(side.data) == 2 and "matched to moe's by assignment" in side.layout.title.text
    diff = fr.compare_heatmap_figure(xa, xb, toks, mode="difference")
    np.testing.assert_allclose(np.asarray(diff.data[0].z), np.round((xb - xa).T, 4), atol=1e-4)
    fig = fr.alignment_figure(al)
    assert f"quality {al.quality:.3f}" in fig.layout.title.text
    with pytest.raises(ValueError, match="mode must be"):
        fr.compare_heatmap_figure(xa, xb, toks, mode="nope")


def test_view_controls_change_the_figure(runs):
    a, b = runs
    assert RoutingView in views_for(a)
    v = RoutingView(run=a)
    assert isinstance(v.__panel__(), pn.Column)
    assert v.param.layer.objects == [0, 1]
    t0 = v.figures()[0].layout.title.text
    v.layer = 1
    assert v.figures()[0].layout.title.text != t0
    v.figure = "lift"
    assert "co-selection lift" in v.figures()[0].layout.title.text
    for f in ("load", "domain", "vocabulary", "layers"):
        v.figure = f
        assert len(v.figures()) == 1
    # two runs: side by side and difference, with the expert alignment stated
    c = RoutingView(run=a, other=b, names=("topk", "relu"))
    assert c.mode == "side"
    figs = c.figures()
    assert len(figs) == 2 and "quality" in figs[1].layout.title.text
    c.mode = "difference"
    assert "relu - topk" in c.figures()[0].layout.title.text
    c.figure = "layers"
    assert [d.name for d in c.figures()[0].data] == ["topk", "relu"]
    c.figure = "load"
    assert len(c.figures()) == 2
    pn.panel(c)


def test_view_says_what_is_missing():
    dense = tiny.build("llama")
    with wb.capture(dense) as run:
        dense(input_ids=torch.tensor([[3, 4]]))
    assert not RoutingView.applies(run) and "RoutingProbe" in RoutingView.missing(run)
    v = RoutingView(run=_run("mixtral", labels=False), figure="domain")
    pane = v._panes()
    assert isinstance(pane, pn.pane.Alert) and "no data labels" in pane.object
