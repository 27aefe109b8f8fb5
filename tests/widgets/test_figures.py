"""Figure builders: pure data in, plotly Figure out, with the data where it should be."""

import pandas as pd
import pytest
import torch

go = pytest.importorskip("plotly.graph_objects", reason="plotly is not installed (the viz extra)")

import workbench.widgets as ww  # noqa: E402
from workbench.widgets import figures as F  # noqa: E402

from tests.metrics.helpers import tiny_llama  # noqa: E402
from workbench.capture import profile  # noqa: E402


def test_layer_sparsity_from_run_summary():
    model = tiny_llama("relu")
    run = profile(model, torch.randint(0, 64, (2, 10)), progress=False)
    s = run.summary()
    fig = ww.layer_sparsity_figure(s)
    assert isinstance(fig, go.Figure)
    assert list(fig.data[0].y) == pytest.approx(list(s.token_sparsity))
    assert list(fig.data[0].x) == [0, 1]


def test_builders_put_data_in_traces():
    rules = pd.DataFrame({"rule": ["zero"] * 2 + ["fat(0.01)"] * 2, "layer": [0, 1, 0, 1],
                          "token_sparsity": [0.5, 0.6, 0.7, 0.8]})
    fig = F.rule_sparsity_figure(rules)
    assert [t.name for t in fig.data] == ["zero", "fat(0.01)"] and list(fig.data[1].y) == [0.7, 0.8]
    cett = pd.DataFrame({"layer": [0, 0, 1, 1], "target": [0.1, 0.2] * 2, "threshold": [1, 2, 3, 4],
                         "cett": [0.1, 0.2, 0.1, 0.2], "activation_ratio": [0.5, 0.3, 0.4, 0.2]})
    fig = F.cett_curve_figure(cett)
    assert len(fig.data) == 2 and list(fig.data[0].x) == [0.3, 0.5]
    curve = pd.DataFrame({"step": [0, 1], "target": [0.5, 0.25], "ppl_ratio": [1.05, 1.01],
                          "activation_ratio": [0.1, 0.2]})
    fig = F.ppl_curve_figure(curve, goal=1.01, tolerance=0.001)
    assert list(fig.data[0].y) == [1.05, 1.01] and fig.layout.shapes
    per_layer = pd.DataFrame({"layer": [0, 1], "activation_ratio": [0.1, 0.2], "zero_activation_ratio": [0.3, 0.4]})
    assert len(F.threshold_figure(per_layer).data) == 2
    cls = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "L": [1, 2, 4] * 2, "cls": [0.8, 0.7, 0.6, 0.8, 0.5, 0.3]})
    fig = F.cls_curve_figure(cls)
    assert [t.name for t in fig.data] == ["a", "b"] and fig.layout.xaxis.type == "log"
    pm = pd.DataFrame({"layer": [0, 1], "recall": [0.95, 0.9], "predicted_sparsity": [0.6, 0.5],
                       "true_sparsity": [0.7, 0.65]})
    fig = F.predictor_figure(pm)
    assert list(fig.data[0].y) == [0.95, 0.9] and list(fig.data[1].x) == [0.7, 0.65]
    bars = pd.DataFrame({"model": ["relu", "silu"], "sparsity": [0.9, 0.4]})
    assert list(F.model_bar_figure(bars).data[0].y) == [0.9, 0.4]


def test_missing_columns_say_which():
    with pytest.raises(ValueError, match="missing \\['recall'\\]"):
        F.predictor_figure(pd.DataFrame({"layer": [0], "predicted_sparsity": [0.5]}))
