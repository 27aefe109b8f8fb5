"""Recurrent-state figures: pure data -> plotly Figure builders (no Panel, no hooks).

Each builder takes a table of workbench.metrics.state / workbench.metrics.passkey:

- `state_position_figure(head_stats(run), "rms", train_len=...)`   a statistic against position,
  one line per layer (mean over heads) or per head of one layer; the training length marked
- `state_compare_figure({"a": head_stats(a), "b": ...}, "rms")`     the same for two runs, dashed apart
- `loss_position_figure(layer_stats(run), train_len=...)`          token loss per bucket (a dict: per run)
- `state_histogram_figure(histograms(run), layer=0)`               value histograms at positions
- `collapse_figure(collapse(run, train_len), n_layers, n_heads)`   first flagged position per head
- `passkey_grid_figure(passkey_grid(...))`                          accuracy over length x depth
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.colors as px_colors
import plotly.graph_objects as go

_COLORS = px_colors.qualitative.Plotly
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2))


def _need(df: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(cols)}; missing {missing} (have {list(df.columns)})")


def _mark(fig: go.Figure, train_len: int | None, *, log_x: bool = False) -> None:
    """A dashed line at the training length with its label. On a log x axis plotly places shapes
    in data units but annotations in log10 units (an annotation at x=256 would stretch the axis to
    1e256), so the label is added apart, at log10(train_len)."""
    if train_len:
        fig.add_vline(x=train_len, line_dash="dash", line_color="gray")
        fig.add_annotation(x=float(np.log10(train_len)) if log_x else train_len, y=1, yref="paper",
                           text=f"training length {train_len}", showarrow=False, xanchor="right",
                           yanchor="top")


def state_position_figure(df: pd.DataFrame, stat: str = "rms", *, train_len: int | None = None,
                          layer: int | None = None, title: str | None = None, log_x: bool = True) -> go.Figure:
    """`stat` against position from `head_stats(run)` (or `layer_stats(run)`): one line per layer
    (the mean over heads), or one line per head when `layer` is given."""
    _need(df, ["layer", "position", stat], "state_position_figure")
    fig = go.Figure()
    if layer is None:
        g = df.groupby(["layer", "position"], as_index=False)[stat].mean()
        for lay, d in g.groupby("layer"):
            fig.add_trace(go.Scatter(x=d.position, y=d[stat], mode="lines", name=f"layer {lay}"))
    else:
        d0 = df[df.layer == layer]
        if "head" not in d0.columns:
            d0 = d0.assign(head=0)
        for h, d in d0.groupby("head"):
            fig.add_trace(go.Scatter(x=d.position, y=d[stat], mode="lines", name=f"head {h}"))
    _mark(fig, train_len, log_x=log_x)
    fig.update_layout(title=title or f"state {stat} by position" + (f" (layer {layer})" if layer is not None else ""),
                      xaxis_title="position (tokens, bucket end)", yaxis_title=stat, **_LAYOUT)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def state_compare_figure(tables: dict, stat: str = "rms", *, train_len: int | None = None, layer: int | None = None,
                         title: str | None = None, log_x: bool = True) -> go.Figure:
    """`stat` against position for several runs ({name: head_stats(run)}): one line per run and
    layer (the mean over heads; with `layer`, that layer only): the colour is the layer, the dash
    the run.
    `train_len` marks the first run's training length."""
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot"]
    for i, (name, df) in enumerate(tables.items()):
        _need(df, ["layer", "position", stat], f"state_compare_figure ({name})")
        d0 = df if layer is None else df[df.layer == layer]
        g = d0.groupby(["layer", "position"], as_index=False)[stat].mean()
        for lay, d in g.groupby("layer"):
            fig.add_trace(go.Scatter(x=d.position, y=d[stat], mode="lines", name=f"{name}: layer {lay}",
                                     line=dict(dash=dashes[i % len(dashes)], color=_COLORS[int(lay) % len(_COLORS)]),
                                     legendgroup=name))
    _mark(fig, train_len, log_x=log_x)
    fig.update_layout(title=title or f"state {stat} by position: {' vs '.join(tables)}"
                      + (f" (layer {layer})" if layer is not None else ""),
                      xaxis_title="position (tokens, bucket end)", yaxis_title=stat, **_LAYOUT)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def loss_position_figure(df, *, train_len: int | None = None, title: str | None = None) -> go.Figure:
    """Mean next-token NLL per bucket from `layer_stats(run)` (the same in every layer); a dict
    {name: layer_stats(run)} draws one line per run."""
    tables = df if isinstance(df, dict) else {"loss": df}
    fig = go.Figure()
    for name, t in tables.items():
        _need(t, ["position", "loss"], "loss_position_figure")
        d = t.drop_duplicates("position").sort_values("position")
        fig.add_trace(go.Scatter(x=d.position, y=d.loss, mode="lines+markers", name=name))
    _mark(fig, train_len, log_x=True)
    fig.update_layout(title=title or "token loss by position", xaxis_title="position (tokens, bucket end)",
                      yaxis_title="mean NLL (nats)", **_LAYOUT)
    fig.update_xaxes(type="log")
    return fig


def state_histogram_figure(df: pd.DataFrame, *, layer: int = 0, train_len: int | None = None,
                           title: str | None = None) -> go.Figure:
    """Value histograms of the state of `layer` at each recorded position (from `histograms(run)`):
    x is the signed bin centre on a symmetric log scale (sign x log10 |v|, |v| >= 1e-6)."""
    _need(df, ["layer", "position", "lo", "hi", "density"], "state_histogram_figure")
    d = df[df.layer == layer]
    fig = go.Figure()
    for p, g in d.groupby("position"):
        lo, hi = g.lo.to_numpy(), g.hi.to_numpy()
        lo = np.where(np.isfinite(lo), lo, hi * 10 ** np.sign(-hi))
        hi = np.where(np.isfinite(hi), hi, lo * 10 ** np.sign(lo))
        c = (lo + hi) / 2
        x = np.sign(c) * (np.log10(np.maximum(np.abs(c), 1e-6)) + 6)
        when = "" if not train_len else (" (within training length)" if p <= train_len else " (past training length)")
        fig.add_trace(go.Scatter(x=x, y=g.density, mode="lines", name=f"@{p}{when}", line_shape="hvh"))
    fig.update_layout(title=title or f"state values, layer {layer}",
                      xaxis_title="sign(v) * (log10|v| + 6)", yaxis_title="fraction of values", **_LAYOUT)
    return fig


def collapse_figure(flags: pd.DataFrame, n_layers: int, n_heads: int, *, title: str | None = None,
                    zrange: tuple | None = None) -> go.Figure:
    """Heat map layer x head: the first position where any watched statistic left its range
    (empty cells: no flag), the flagged statistics in the hover text, the rule under the title.
    zrange: (min, max) of the colour scale, shared when two runs are shown side by side."""
    _need(flags, ["layer", "head", "stat", "position"], "collapse_figure")
    z = np.full((n_layers, n_heads), np.nan)
    text = [["" for _ in range(n_heads)] for _ in range(n_layers)]
    for (lay, h), g in flags.groupby(["layer", "head"]):
        z[lay, h] = g.position.min()
        text[lay][h] = ", ".join(f"{r.stat}@{r.position}" for r in g.itertuples())
    zr = dict(zmin=zrange[0], zmax=zrange[1]) if zrange else {}
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertemplate="layer %{y} head %{x}<br>%{text}<extra></extra>",
                               colorscale="Reds_r", colorbar=dict(title="first flag"), **zr))
    rule = flags.attrs.get("rule", "")
    head = title or f"collapse flags ({len(flags)})"
    sub = "".join(f"<br><sup>{part}</sup>" for part in rule.replace(", span", ",\nspan").splitlines())
    margin = dict(_LAYOUT["margin"], t=50 + 24 * sub.count("<br>"))  # room for the rule's lines
    fig.update_layout(title=head + sub, xaxis_title="head", yaxis_title="layer", **{**_LAYOUT, "margin": margin})
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    return fig


def passkey_grid_figure(df: pd.DataFrame, *, title: str | None = None, train_len: int | None = None) -> go.Figure:
    """Accuracy heat map, total length (rows) x key depth (columns), from `passkey_grid(...)`."""
    _need(df, ["length", "depth", "accuracy"], "passkey_grid_figure")
    p = df.pivot(index="length", columns="depth", values="accuracy").sort_index()
    ys = [f"{L}" + (f" ({L / train_len:g}x)" if train_len else "") for L in p.index]
    fig = go.Figure(go.Heatmap(z=p.to_numpy(), x=[f"{d:.2f}" for d in p.columns], y=ys, zmin=0, zmax=1,
                               colorscale="Viridis", text=np.round(p.to_numpy(), 2), texttemplate="%{text}",
                               colorbar=dict(title="accuracy")))
    fig.update_layout(title=title or "passkey retrieval", xaxis_title="key depth", yaxis_title="total length (tokens)",
                      **_LAYOUT)
    return fig
