"""Pure data -> plotly Figure builders (no Panel, no hooks): unit-testable without a server.

Each builder takes the tidy table a public call returns:

- `layer_sparsity_figure(run.summary())`                     token sparsity per layer
- `layer_compare_figure({"a": run_a.summary(), "b": ...})`   a summary column per layer, one line per run
- `rule_sparsity_figure(wm.sparsity_table(...))`             layer x sparsity, one line per rule
- `cett_curve_figure(wm.cett_curve(...))`                     CETT vs activation ratio per layer
- `ppl_curve_figure(res.curve, goal=1 + p / 100)`             the PPL-p% outer search
- `threshold_figure(res.per_layer)`                           per-layer activation ratio, zero vs CETT
- `cls_curve_figure(df)`                                      CLS_L vs L (columns model, L, cls)
- `predictor_figure(pred.metrics)`                            recall vs predicted sparsity per layer
- `model_bar_figure(df, y=...)`                               one bar per model (e.g. PPL-1% sparsity)
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2))


def _need(df: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(cols)}; missing {missing} (have {list(df.columns)})")


def _white_figure() -> go.Figure:
    """An empty figure on the plotly_white template. Attached the way plotly attaches its default
    template (no validation pass): `update_layout(template=...)` re-validates the whole template,
    ~25x the cost of the rest of a small figure, and the dashboard builds figures on every control
    change."""
    fig = go.Figure()
    layout = fig._layout_obj
    try:
        layout._validate = False
        layout.template = pio.templates["plotly_white"]
    except Exception:  # noqa: BLE001 - a plotly without these internals: the validated path
        layout._validate = True
        fig.update_layout(template="plotly_white")
    finally:
        layout._validate = True
    return fig


def _fig(title: str, x: str, y: str, **kw) -> go.Figure:
    fig = _white_figure()
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y,
                      **{k: v for k, v in _LAYOUT.items() if k != "template"}, **kw)
    return fig


def layer_sparsity_figure(summary: pd.DataFrame, *, title: str | None = None, column: str = "token_sparsity") -> go.Figure:
    """Bars of `token_sparsity` per layer from `run.summary()` (one trace per FFN role)."""
    _need(summary, ["layer", column], "layer_sparsity_figure")
    fig = _fig(title or "Token sparsity per layer", "layer", column.replace("_", " "))
    roles = summary["role"].unique() if "role" in summary.columns else [None]
    for role in roles:
        d = summary if role is None else summary[summary["role"] == role]
        fig.add_bar(x=d["layer"], y=d[column], name=str(role or column),
                    hovertext=d["name"] if "name" in d.columns else None)
    fig.update_yaxes(range=[0, 1])
    return fig


def layer_compare_figure(summaries: dict, *, column: str = "token_sparsity", title: str | None = None) -> go.Figure:
    """`column` per layer for several runs ({name: run.summary()}), one line per run (and FFN role).
    Runs with different layer counts are put on relative depth, (layer + 0.5) / layers, and the
    axis says so."""
    for name, d in summaries.items():
        _need(d, ["layer", column], f"layer_compare_figure ({name})")
    counts = {int(d["layer"].nunique()) for d in summaries.values()}
    depth = len(counts) > 1
    fig = _fig(title or f"{column.replace('_', ' ')} per layer",
               "relative depth, (layer + 0.5) / layers (the runs' layer counts differ)" if depth else "layer",
               column.replace("_", " "))
    for name, d in summaries.items():
        n = max(int(d["layer"].max()) + 1, 1)
        roles = d["role"].unique() if "role" in d.columns and d["role"].nunique() > 1 else [None]
        for role in roles:
            r = d if role is None else d[d["role"] == role]
            g = r.groupby("layer", as_index=False)[column].mean()
            x = (g["layer"] + 0.5) / n if depth else g["layer"]
            fig.add_scatter(x=x, y=g[column], mode="lines+markers", name=name if role is None else f"{name} / {role}",
                            customdata=g["layer"], hovertemplate="layer %{customdata}: %{y:.4f}<extra>" + name
                            + "</extra>")
    return fig


def rule_sparsity_figure(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Layer x token sparsity, one line per rule (from `sparsity_table`; a `model` column, if
    present, splits lines per model too)."""
    _need(df, ["rule", "layer", "token_sparsity"], "rule_sparsity_figure")
    fig = _fig(title or "Token sparsity per layer and rule", "layer", "token sparsity")
    keys = ["model", "rule"] if "model" in df.columns else ["rule"]
    for key, d in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        fig.add_scatter(x=d["layer"], y=d["token_sparsity"], mode="lines+markers", name=" / ".join(map(str, key)))
    fig.update_yaxes(range=[0, 1])
    return fig


def cett_curve_figure(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """CETT against activation ratio, one line per layer (from `cett_curve`)."""
    _need(df, ["layer", "cett", "activation_ratio"], "cett_curve_figure")
    fig = _fig(title or "CETT vs activation ratio", "activation ratio", "CETT")
    keys = ["model", "layer"] if "model" in df.columns else ["layer"]
    for key, d in df.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        d = d.sort_values("activation_ratio")
        fig.add_scatter(x=d["activation_ratio"], y=d["cett"], mode="lines+markers",
                        name=" / ".join(f"layer {k}" if isinstance(k, (int,)) or str(k).isdigit() else str(k) for k in key),
                        hovertext=[f"target {t:.3g}, t {th:.3g}" for t, th in zip(d.get("target", d["cett"]),
                                                                                  d.get("threshold", d["cett"]))])
    return fig


def ppl_curve_figure(curve: pd.DataFrame, *, goal: float | None = None, tolerance: float | None = None,
                     title: str | None = None) -> go.Figure:
    """The PPL-p% outer search: perplexity ratio against activation ratio, one point per step
    (a `model` column splits traces); the goal 1 + p/100 and its tolerance band as lines."""
    _need(curve, ["ppl_ratio", "activation_ratio"], "ppl_curve_figure")
    fig = _fig(title or "PPL ratio along the CETT search", "activation ratio", "PPL ratio (sparse / dense)")
    groups = curve.groupby("model", sort=False) if "model" in curve.columns else [("search", curve)]
    for name, d in groups:
        d = d.sort_values("activation_ratio")
        fig.add_scatter(x=d["activation_ratio"], y=d["ppl_ratio"], mode="lines+markers", name=str(name),
                        hovertext=[f"step {s}, target {t:.4g}" for s, t in zip(d.get("step", d.index), d.get("target", d["ppl_ratio"]))])
    if goal is not None:
        fig.add_hline(y=goal, line_dash="dash", annotation_text=f"goal {goal:g}")
        if tolerance:
            fig.add_hrect(y0=goal - tolerance, y1=goal + tolerance, opacity=0.15, line_width=0)
    return fig


def threshold_figure(per_layer: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per-layer activation ratio under `zero` vs with the PPL-p% thresholds (`res.per_layer`)."""
    _need(per_layer, ["layer", "activation_ratio", "zero_activation_ratio"], "threshold_figure")
    fig = _fig(title or "Activation ratio per layer: zero rule vs CETT thresholds", "layer", "activation ratio")
    fig.add_bar(x=per_layer["layer"], y=per_layer["zero_activation_ratio"], name="zero")
    fig.add_bar(x=per_layer["layer"], y=per_layer["activation_ratio"], name="CETT thresholds")
    fig.update_layout(barmode="group")
    return fig


def cls_curve_figure(df: pd.DataFrame, *, title: str | None = None, y: str = "cls") -> go.Figure:
    """CLS_L against L (log2 axis), one line per model (columns: model, L, cls)."""
    _need(df, ["L", y], "cls_curve_figure")
    fig = _fig(title or "Chunk-level sparsity CLS_L", "chunk length L", "CLS_L")
    groups = df.groupby("model", sort=False) if "model" in df.columns else [("CLS", df)]
    for name, d in groups:
        d = d.sort_values("L")
        fig.add_scatter(x=d["L"], y=d[y], mode="lines+markers", name=str(name))
    fig.update_xaxes(type="log", dtick=0.30102999566)  # log10(2): ticks at powers of two
    fig.update_yaxes(range=[0, 1])
    return fig


def predictor_figure(metrics: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Recall against predicted sparsity, one point per layer; true sparsity as open markers at
    recall 1 for reference (from `Predictors.metrics`; a `model` column splits traces)."""
    _need(metrics, ["layer", "recall", "predicted_sparsity"], "predictor_figure")
    fig = _fig(title or "Predictor: recall vs predicted sparsity (held-out tokens)", "sparsity", "recall")
    groups = metrics.groupby("model", sort=False) if "model" in metrics.columns else [("predictor", metrics)]
    for name, d in groups:
        fig.add_scatter(x=d["predicted_sparsity"], y=d["recall"], mode="markers+text", name=f"{name} predicted",
                        text=[f"L{int(L)}" for L in d["layer"]], textposition="top center")
        if "true_sparsity" in d.columns:
            fig.add_scatter(x=d["true_sparsity"], y=[1.0] * len(d), mode="markers", name=f"{name} true sparsity",
                            marker=dict(symbol="circle-open", size=10), text=[f"L{int(L)}" for L in d["layer"]])
    fig.update_yaxes(range=[0, 1.05])
    fig.update_xaxes(range=[0, 1])
    return fig


def model_bar_figure(df: pd.DataFrame, *, x: str = "model", y: str = "sparsity", title: str | None = None,
                     color: str | None = None) -> go.Figure:
    """One bar per row (e.g. PPL-1% sparsity per model); `color` names a column for grouping."""
    _need(df, [x, y], "model_bar_figure")
    fig = _fig(title or f"{y.replace('_', ' ')} per {x}", x, y.replace("_", " "))
    if color is None:
        fig.add_bar(x=df[x], y=df[y], text=[f"{v:.3f}" for v in df[y]], textposition="outside")
    else:
        for key, d in df.groupby(color, sort=False):
            fig.add_bar(x=d[x], y=d[y], name=str(key), text=[f"{v:.3f}" for v in d[y]], textposition="outside")
        fig.update_layout(barmode="group")
    return fig


__all__ = ["cett_curve_figure", "cls_curve_figure", "layer_sparsity_figure", "model_bar_figure",
           "ppl_curve_figure", "predictor_figure", "rule_sparsity_figure", "threshold_figure"]


def speedup_target_figure(rows: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Measured speedup (bars) vs target (diamonds) per benchmark row (benchmarks/results/*.json).

    rows: columns `label` (x axis), `speedup`, `target`, and optionally `measure` (bar colour).
    """
    _need(rows, ["label", "speedup", "target"], "speedup_target_figure")
    fig = _fig(title or "speedup vs target", "", "speedup (x)")
    groups = rows.groupby("measure", sort=False) if "measure" in rows else [("speedup", rows)]
    for key, d in groups:
        fig.add_bar(x=d["label"], y=d["speedup"], name=str(key), text=[f"{v:.2f}" for v in d["speedup"]],
                    textposition="outside")
    fig.add_scatter(x=rows["label"], y=rows["target"], mode="markers", name="target",
                    marker=dict(symbol="diamond", size=10, color="black"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.update_layout(xaxis_tickangle=-45)
    return fig


__all__ += ["speedup_target_figure"]
