"""Pure data -> plotly builders for the acceleration view (from `handle.measure(ids)`)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from workbench.widgets.figures import _LAYOUT, _need, _white_figure


def accel_timing_figure(layers: pd.DataFrame, summary: dict, *, title: str | None = None) -> go.Figure:
    """Dense vs accelerated milliseconds: one decode step, then each FFN layer (grouped bars).

    layers: `Measurement.layers` (layer, dense_ms, ms); summary: `Measurement.summary`
    (step_dense_ms, step_ms, mode, backend)."""
    _need(layers, ["layer", "dense_ms", "ms"], "accel_timing_figure")
    x = ["decode step"] + [f"FFN {int(v)}" for v in layers["layer"]]
    dense = [summary.get("step_dense_ms")] + list(layers["dense_ms"])
    acc = [summary.get("step_ms")] + list(layers["ms"])
    fig = _white_figure()
    fig.add_bar(x=x, y=dense, name="dense", text=[f"{v:.3g}" for v in dense], textposition="outside")
    fig.add_bar(x=x, y=acc, name=f"accelerated ({summary.get('mode')}, {summary.get('backend')})",
                text=[f"{v:.3g}" for v in acc], textposition="outside")
    fig.update_layout(title=title or "Dense vs accelerated time (median, ms)", xaxis_title="", yaxis_title="ms",
                      barmode="group", **{k: v for k, v in _LAYOUT.items() if k != "template"})
    return fig


def realised_sparsity_figure(layers: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """True sparsity (inactive under the model's own activation) vs realised sparsity (rows the
    kernels skipped) per layer; predictor recall as markers where present."""
    _need(layers, ["layer", "true_sparsity", "realised_sparsity"], "realised_sparsity_figure")
    fig = _white_figure()
    x = [int(v) for v in layers["layer"]]
    fig.add_bar(x=x, y=layers["true_sparsity"], name="true sparsity")
    fig.add_bar(x=x, y=layers["realised_sparsity"], name="realised sparsity (rows skipped)")
    if "predictor_recall" in layers.columns:
        fig.add_scatter(x=x, y=layers["predictor_recall"], mode="markers", name="predictor recall",
                        marker=dict(symbol="diamond", size=10))
    fig.update_layout(title=title or "Sparsity realised by the kernels per layer", xaxis_title="layer",
                      yaxis_title="fraction", barmode="group", **{k: v for k, v in _LAYOUT.items() if k != "template"})
    fig.update_yaxes(range=[0, 1.05])
    return fig


def placeholder_figure(text: str, *, title: str = "") -> go.Figure:
    """An empty figure carrying a message (a plot area before the first measurement)."""
    fig = _white_figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, **{k: v for k, v in _LAYOUT.items() if k != "template"})
    return fig


__all__ = ["accel_timing_figure", "placeholder_figure", "realised_sparsity_figure"]
