"""Pure data -> plotly Figure builders for the bricks analysis (no Panel, no hooks).

- `brick_map_figure(funcscore, assignment, functions)`   neurons grouped by brick, coloured by
                                                          their best function (height = FuncScore)
- `funcscore_hist_figure(funcscore, functions)`          FuncScore distribution per function
- `ablation_matrix_figure(ablation, layer=...)`           brick x function loss increase, with the
                                                          random same-size sets as the last row
- `top_ablation_figure(top_ablation)`                     the paper's top-5 % FuncScore ablation

`funcscore` is [F, d_ff] (a tensor or array, e.g. `res.funcscore[layer]`), `assignment` [d_ff]
brick ids; the tables are `res.ablation` / `res.top_ablation` (or `wm.table(run, "bricks/...")`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2))
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _need(df: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(cols)}; missing {missing} (have {list(df.columns)})")


def brick_map_figure(funcscore, assignment, functions: list[str], *, names: list[str] | None = None,
                     title: str | None = None) -> go.Figure:
    """One bar per neuron, grouped by brick (then by best function, then by score), height = its
    best FuncScore, colour = that function; dotted lines separate the bricks."""
    fs, a = _np(funcscore).astype(float), _np(assignment).astype(int)
    if fs.ndim != 2 or fs.shape[1] != a.shape[0] or fs.shape[0] != len(functions):
        raise ValueError(f"brick_map_figure needs funcscore [F={len(functions)}, d_ff] and assignment [d_ff]; "
                         f"got {fs.shape} and {a.shape}")
    best, top = fs.argmax(0), fs.max(0)
    order = np.lexsort((-top, best, a))
    fig = go.Figure()
    fig.update_layout(title=title or "Brick map: neurons by brick, coloured by their best function",
                      xaxis_title="neuron (grouped by brick)", yaxis_title="FuncScore of its best function",
                      bargap=0, **_LAYOUT)
    pos = np.arange(a.shape[0])
    for f, name in enumerate(functions):
        sel = best[order] == f
        fig.add_bar(x=pos[sel], y=top[order][sel], name=name, marker_color=_COLORS[f % len(_COLORS)],
                    hovertext=[f"neuron {int(i)}, brick {int(a[i])}" for i in order[sel]])
    k = int(a.max()) + 1 if a.size else 0
    edges = np.cumsum(np.bincount(a, minlength=k))
    for e in edges[:-1]:
        fig.add_vline(x=float(e) - 0.5, line_dash="dot", line_color="gray")
    starts = np.r_[0, edges[:-1]]
    for b in range(k):
        label = names[b] if names is not None and b < len(names) else f"B{b}"
        fig.add_annotation(x=float(starts[b] + edges[b]) / 2 - 0.5, y=1.02, yref="paper", text=label,
                           showarrow=False, textangle=-30, font=dict(size=9))
    fig.update_yaxes(range=[0, 1])
    return fig


def funcscore_hist_figure(funcscore, functions: list[str], *, title: str | None = None,
                          bins: int = 40) -> go.Figure:
    """Overlaid histograms of FuncScore over the neurons, one per function."""
    fs = _np(funcscore).astype(float)
    if fs.ndim != 2 or fs.shape[0] != len(functions):
        raise ValueError(f"funcscore_hist_figure needs funcscore [F={len(functions)}, d_ff]; got {fs.shape}")
    fig = go.Figure()
    fig.update_layout(title=title or "FuncScore distribution per function", xaxis_title="FuncScore (AP)",
                      yaxis_title="neurons", barmode="overlay", **_LAYOUT)
    for f, name in enumerate(functions):
        fig.add_histogram(x=fs[f], name=name, opacity=0.55, xbins=dict(start=0, end=1, size=1 / bins),
                          marker_color=_COLORS[f % len(_COLORS)])
    return fig


def ablation_matrix_figure(ablation: pd.DataFrame, *, layer: int | None = None, names: pd.DataFrame | None = None,
                           value: str = "delta", title: str | None = None) -> go.Figure:
    """Heatmap brick x function of the loss increase when the brick is ablated; the last row is
    random neuron sets of the same size (mean over seeds, std in the hover)."""
    _need(ablation, ["layer", "brick", "kind", "function", value], "ablation_matrix_figure")
    d = ablation if layer is None else ablation[ablation["layer"] == layer]
    br = d[d["kind"] == "brick"]
    piv = br.pivot_table(index=["layer", "brick"], columns="function", values=value, aggfunc="mean")
    funcs = list(piv.columns)
    labels = []
    for la, b in piv.index:
        nm = None
        if names is not None:
            hit = names[(names["layer"] == la) & (names["brick"] == b)]["name"]
            nm = str(hit.iloc[0]) if len(hit) else None
        labels.append(nm or f"L{la}.B{b}")
    z = piv.to_numpy()
    text = [[f"{v:+.3f}" for v in row] for row in z]
    rnd = d[d["kind"] == "random"]
    if len(rnd):
        g = rnd.groupby("function")[value]
        mean, std = g.mean().reindex(funcs), g.std(ddof=1).reindex(funcs).fillna(0.0)
        z = np.vstack([z, mean.to_numpy()[None]])
        text.append([f"{m:+.3f}±{s:.3f}" for m, s in zip(mean, std)])
        labels.append("random same size")
    fig = go.Figure(go.Heatmap(z=z, x=funcs, y=labels, text=text, texttemplate="%{text}", colorscale="Reds",
                               colorbar=dict(title="Δ loss" if value == "delta" else value)))
    fig.update_layout(title=title or f"Ablation: loss increase per function{'' if layer is None else f' (layer {layer})'}",
                      xaxis_title="function (evaluation domain)", yaxis_title="ablated brick",
                      height=max(300, 28 * len(labels) + 120), **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def top_ablation_figure(top: pd.DataFrame, *, value: str = "rel", title: str | None = None) -> go.Figure:
    """Grouped bars: for each ablated target (top FuncScore neurons of a function, or random
    sets), the loss change on every function (mean over seeds, std as error bars)."""
    _need(top, ["target", "function", value], "top_ablation_figure")
    fig = go.Figure()
    fig.update_layout(title=title or "Ablating the top FuncScore neurons of one function",
                      xaxis_title="evaluated function", yaxis_title="relative loss increase" if value == "rel" else value,
                      barmode="group", **_LAYOUT)
    targets = [t for t in top["target"].unique() if t != "random"] + (["random"] if (top["target"] == "random").any() else [])
    for i, t in enumerate(targets):
        g = top[top["target"] == t].groupby("function")[value]
        mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
        fig.add_bar(x=list(mean.index), y=mean.to_numpy(), name=f"ablate top {t}" if t != "random" else "random",
                    error_y=dict(type="data", array=std.to_numpy(), visible=t == "random"),
                    marker_color="lightgray" if t == "random" else _COLORS[i % len(_COLORS)])
    return fig
