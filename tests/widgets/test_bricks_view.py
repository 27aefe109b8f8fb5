"""Bricks figures and view: data in the traces, the view builds and follows its controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

go = pytest.importorskip("plotly.graph_objects", reason="plotly is not installed (the viz extra)")
pn = pytest.importorskip("panel", reason="panel is not installed (the viz extra)")

from workbench.widgets import figures_bricks as FB  # noqa: E402
from workbench.widgets.views import views_for  # noqa: E402
from workbench.widgets.views.bricks import BricksView  # noqa: E402

from workbench.capture import Run  # noqa: E402
from workbench.metrics import store  # noqa: E402

FUNCS = ["code", "math", "prose"]


def _ablation(layers=(0, 1), k=4, seeds=2):
    rng = np.random.default_rng(0)
    rows = []
    for la in layers:
        for b in range(k):
            for f in FUNCS:
                rows.append({"layer": la, "brick": b, "kind": "brick", "seed": -1, "size": 6, "function": f,
                             "delta": float(rng.random()) + la, "rel": 0.1})
        for s in range(seeds):
            for f in FUNCS:
                rows.append({"layer": la, "brick": -1, "kind": "random", "seed": s, "size": 6, "function": f,
                             "delta": 0.01 * (s + 1), "rel": 0.01})
    return pd.DataFrame(rows)


def _top():
    rows = [{"target": t, "seed": s, "function": f, "delta": 0.5 if t == f else 0.05, "rel": 0.2 if t == f else 0.02}
            for t, s in [(f, -1) for f in FUNCS] + [("random", 0), ("random", 1)] for f in FUNCS]
    return pd.DataFrame(rows)


@pytest.fixture()
def run():
    g = torch.Generator().manual_seed(0)
    r = Run({"sites": [], "rule": {"kind": "zero"}, "probes": []}, {})
    bricks = pd.DataFrame([{"layer": la, "brick": b, "size": 6, "name": f"L{la}.B{b}:{FUNCS[b % 3]}"}
                           for la in (0, 1) for b in range(4)])
    tensors = {}
    for la in (0, 1):
        tensors[f"funcscore/{la}"] = torch.rand(3, 24, generator=g)
        tensors[f"assignment/{la}"] = torch.arange(24) % 4
        tensors[f"baseline/{la}"] = torch.arange(24) // 6
    store(r, "bricks/bricks", bricks, tensors=tensors, info={"functions": FUNCS, "layers": [0, 1]})
    store(r, "bricks/ablation", _ablation())
    store(r, "bricks/top_ablation", _top())
    store(r, "bricks/summary", pd.DataFrame({"function": FUNCS, "delta_own": [0.1, 0.2, 0.3]}))
    return r


def test_brick_map_groups_by_brick_and_colours_by_function():
    fs = torch.zeros(3, 8, dtype=torch.float64)
    fs[0, :4] = 0.9  # neurons 0-3 best at code
    fs[1, 4:] = 0.7
    assign = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    fig = FB.brick_map_figure(fs, assign, FUNCS, names=["b0", "b1"])
    code = fig.data[0]
    assert code.name == "code" and sorted(code.y) == [0.9] * 4
    # brick 0 first: positions 0-3 hold brick 0 (neurons 1, 3 code; 5, 7 math)
    assert sorted(code.x) == [0, 1, 4, 5]
    assert [a.text for a in fig.layout.annotations] == ["b0", "b1"]
    with pytest.raises(ValueError, match="funcscore"):
        FB.brick_map_figure(fs[:, :5], assign, FUNCS)


def test_ablation_matrix_has_a_random_row_and_hist_and_top():
    abl = _ablation()
    fig = FB.ablation_matrix_figure(abl, layer=1)
    z = np.array(fig.data[0].z)
    assert z.shape == (5, 3) and list(fig.data[0].y)[-1] == "random same size"
    want = abl[(abl.layer == 1) & (abl.kind == "brick") & (abl.brick == 2) & (abl.function == "math")]["delta"].item()
    assert z[2, 1] == pytest.approx(want)
    assert z[4, 0] == pytest.approx(0.015)
    h = FB.funcscore_hist_figure(torch.rand(3, 10), FUNCS)
    assert [t.name for t in h.data] == FUNCS and len(h.data[0].x) == 10
    t = FB.top_ablation_figure(_top())
    assert t.data[0].name == "ablate top code" and list(t.data[0].y) == [0.2, 0.02, 0.02]
    assert t.data[-1].name == "random"


def test_view_builds_registers_and_follows_the_layer(run):
    assert BricksView in views_for(run)
    v = BricksView(run=run)
    assert v.param.layer.objects == [0, 1] and v.layer == 0
    panel = v.__panel__()
    assert isinstance(panel, pn.Column)
    before = np.array(v.ablation_figure().data[0].z)
    v.layer = 1
    after = np.array(v.ablation_figure().data[0].z)
    assert not np.allclose(before, after)
    v.method = "weights"
    assert v.ablation_figure() is None  # this run has no baseline ablation
    assert list(v.map_figure().data[0].x)  # the baseline partition's map
    empty = Run({"sites": [], "rule": {"kind": "zero"}}, {})
    assert not BricksView.applies(empty) and "brick_analysis" in BricksView.missing(empty)
