"""Recurrent-state figures and view: the data lands in the traces; the view follows its controls."""

import numpy as np
import pandas as pd
import pytest
import torch

go = pytest.importorskip("plotly.graph_objects", reason="plotly is not installed (the viz extra)")
pn = pytest.importorskip("panel")

from workbench.widgets import figures_state as fs  # noqa: E402
from workbench.widgets.views import views_for  # noqa: E402
from workbench.widgets.views.state import StateView  # noqa: E402

from tests import tiny  # noqa: E402
from workbench.metrics import state as ms  # noqa: E402
from workbench.metrics.store import store  # noqa: E402


@pytest.fixture(scope="module")
def run():
    model = tiny.build("mamba2")
    ids = torch.randint(2, tiny.VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    r = ms.state_scan(model, ids, bucket=8, chunk=16, hist_positions=(16, 64), data={"train_len": 16})
    grid = pd.DataFrame({"length": [32, 32, 64, 64], "depth": [0.0, 1.0, 0.0, 1.0], "n": 2,
                         "correct": [2, 1, 0, 1], "accuracy": [1.0, 0.5, 0.0, 0.5]})
    store(r, "passkey", grid)
    return r


def test_figures_carry_the_data(run):
    heads = ms.head_stats(run)
    fig = fs.state_position_figure(heads, "rms", train_len=16)
    assert len(fig.data) == 2  # one line per layer
    want = heads[heads.layer == 1].groupby("position").rms.mean()
    assert list(fig.data[1].y) == pytest.approx(list(want))
    assert any("training length" in a.text for a in fig.layout.annotations)
    fig = fs.state_position_figure(heads, "erank", layer=0)
    assert len(fig.data) == 8  # one line per head
    layers = ms.layer_stats(run)
    for f in (fs.state_position_figure(heads, "rms", train_len=16), fs.loss_position_figure(layers, train_len=16)):
        # log x axis: the line in data units, its label in log10 units (x=16 would stretch the axis to 1e16)
        assert f.layout.xaxis.type == "log" and f.layout.shapes[0].x0 == 16
        assert [a.x for a in f.layout.annotations if "training length" in a.text] == pytest.approx([np.log10(16)])
    lin = fs.state_position_figure(heads, "rms", train_len=16, log_x=False)
    assert [a.x for a in lin.layout.annotations if "training length" in a.text] == [16]
    assert list(fs.loss_position_figure(layers).data[0].y) == pytest.approx(list(layers[layers.layer == 0].loss))
    hist = ms.histograms(run)
    assert len(fs.state_histogram_figure(hist, layer=0, train_len=16).data) == 2
    flags = ms.collapse(run, 16, tol=0.0)
    fig = fs.collapse_figure(flags, 2, 8)
    assert fig.data[0].z.shape == (2, 8)
    grid = fs.passkey_grid_figure(pd.DataFrame({"length": [32, 32], "depth": [0.0, 1.0], "accuracy": [1.0, 0.5]}))
    assert grid.data[0].z.tolist() == [[1.0, 0.5]]
    with pytest.raises(ValueError, match="needs columns"):
        fs.passkey_grid_figure(pd.DataFrame({"length": [1]}))


def test_view_follows_its_controls(run):
    assert StateView in views_for(run)
    v = StateView(run=run)
    layout = v.__panel__()
    assert layout is not None
    a = v.position_figure()
    v.stat = "cos"
    b = v.position_figure()
    assert a.layout.yaxis.title.text == "rms" and b.layout.yaxis.title.text == "cos"
    v.layer = 1
    assert len(v.position_figure().data) == 8
    assert v.train_len == 16 and v.collapse_figure() is not None  # train_len from the run's data meta
    v.train_len = 0  # no training length: nothing marked, no flags
    assert v.collapse_figure() is None and not v.position_figure().layout.shapes
    v.train_len = 16
    assert [f.data[0].z.tolist() for f in v.passkey_figures()] == [[[1.0, 0.5], [0.0, 0.5]]]
    assert "state_scan" in StateView.missing(run)


def test_view_compares_two_runs(run):
    model = tiny.build("mamba2")
    ids = torch.randint(2, tiny.VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    other = ms.state_scan(model, ids, bucket=8, chunk=16, data={"train_len": 16})
    v = StateView(run=run, other=other, names=("a", "b"))
    v.__panel__()
    fig = v.position_figure()
    names = [t.name for t in fig.data]
    assert names == ["a: layer 0", "a: layer 1"] + [f"b: layer {i}" for i in range(model.config.num_hidden_layers)]
    want = ms.head_stats(other).query("layer == 0").groupby("position").rms.mean()
    assert list(fig.data[2].y) == pytest.approx(list(want))
    assert [t.line.dash for t in fig.data][-1] == "dash"
    v.layer = 1
    assert [t.name for t in v.position_figure().data] == ["a: layer 1", "b: layer 1"]
    assert [t.name for t in v.loss_figure().data] == ["a", "b"]
    assert len(v.passkey_figures()) == 1  # only `run` stores a passkey grid
    # flags of both runs, each titled by its run; histograms of the run that stores them
    flags = v.collapse_figures()
    assert [f.layout.title.text.split(" (")[0] for f in flags] == ["collapse flags: a", "collapse flags: b"]
    want_a, want_b = ms.collapse(run, 16, tol=v.tol), ms.collapse(other, 16, tol=v.tol)
    assert flags[1].layout.title.text.startswith(f"collapse flags: b ({len(want_b)})<br><sup>out of [lo - span")
    both = list(want_a.position) + list(want_b.position)
    assert [(f.data[0].zmin, f.data[0].zmax) for f in flags] == [(min(both), max(both))] * 2  # one colour scale
    assert [f.layout.title.text for f in v.histogram_figures()] == ["state values, layer 1: a"]
    v.layer = 99  # past the last layer: the last layer's histogram, not an empty plot
    assert [len(f.data) for f in v.histogram_figures()] == [2]
