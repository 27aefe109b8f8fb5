"""Routing figures: pure data -> plotly Figure builders (no Panel, no hooks).

Inputs are what `workbench.metrics.routing` returns:

- `routing_heatmap_figure(wm.routing.sample(run, layer))`      tokens x experts, token text on hover,
  pooled over consecutive tokens past `max_columns` (the title says so)
- `load_figure(wm.routing_load(run))`                           layer x expert load
- `lift_figure(wm.coselection(run, layer))`                     co-selection lift matrix
- `domain_figure(wm.domain_specialisation(run), layer)`         label x expert specialisation
- `vocab_figure(wm.vocab_specialisation(run, ...), layer)`      token ids owned per expert and their VS
- `layer_metric_figure({"a": wm.routing_layers(a), ...}, "reuse")`  one line per run over relative depth
- `compare_heatmap_figure(xa, xb, tokens, mode=...)`            two runs at matched tokens: side by side or b - a
- `alignment_figure(wm.align_experts(a, b, la, lb))`            expert similarity, matched pairs, quality
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=80, b=50))
MAX_COLUMNS = 512  # token columns a browser receives per heatmap; more are pooled on the server


def _need(df: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(cols)}; missing {missing} (have {list(df.columns)})")


def _short(s: str, n: int = 40) -> str:
    s = s.replace("\n", "⏎").replace("<", "‹").replace(">", "›")
    return s if len(s) <= n else s[: n - 1] + "…"


def pool_tokens(x: np.ndarray, texts: list[str], max_columns: int = MAX_COLUMNS) -> tuple[np.ndarray, list[str], int]:
    """Mean of x [T, E] over bins of `pool` consecutive tokens so that at most max_columns remain;
    returns (pooled [ceil(T / pool), E], one label per column, pool)."""
    t = x.shape[0]
    pool = max(1, math.ceil(t / max_columns))
    if pool == 1:
        return x, [f"{i}: {_short(s)}" for i, s in enumerate(texts)], 1
    n = math.ceil(t / pool)
    pad = n * pool - t
    xp = np.concatenate([x, np.full((pad, x.shape[1]), np.nan, dtype=x.dtype)]) if pad else x
    with np.errstate(invalid="ignore"):
        pooled = np.nanmean(xp.reshape(n, pool, x.shape[1]), axis=1)
    labels = [f"{i * pool}-{min(t, (i + 1) * pool) - 1}: {_short(''.join(texts[i * pool:(i + 1) * pool]))}"
              for i in range(n)]
    return pooled, labels, pool


def _heat(x: np.ndarray, labels: list[str], *, colorscale="Viridis", zmid=None, name="", showscale=True,
          zmin=None, zmax=None) -> go.Heatmap:
    return go.Heatmap(z=np.round(x.T.astype(np.float32), 4), x=labels, y=list(range(x.shape[1])),
                      colorscale=colorscale, zmid=zmid, zmin=zmin, zmax=zmax, name=name, showscale=showscale,
                      hovertemplate="token %{x}<br>expert %{y}<br>value %{z}<extra>" + name + "</extra>")


def routing_heatmap_figure(sample, *, value: str = "weights", max_columns: int = MAX_COLUMNS,
                           title: str | None = None) -> go.Figure:
    """Tokens x experts heatmap of one layer's token sample (`wm.routing.sample(run, layer)`):
    the routing weight (value="weights") or 1 where selected ("selected"). Past max_columns
    tokens, consecutive tokens are averaged on the server; the title states the pooling."""
    x = sample.weights if value == "weights" else sample.selected.astype(np.float32)
    texts = sample.tokens["text"].astype(str).tolist()
    pooled, labels, pool = pool_tokens(x, texts, max_columns)
    what = "routing weight" if value == "weights" else "selected"
    note = (f"<br><sup>pooled: mean over {pool} consecutive tokens per column ({x.shape[0]} tokens > "
            f"{max_columns})</sup>" if pool > 1 else "")
    fig = go.Figure(_heat(pooled, labels))
    fig.update_layout(title=title or f"Layer {sample.layer}: {what}, {x.shape[0]} tokens x {x.shape[1]} experts{note}",
                      xaxis_title="token (reading order)", yaxis_title="expert", **_LAYOUT)
    fig.update_xaxes(showticklabels=len(labels) <= 64, type="category")
    return fig


def load_figure(load: pd.DataFrame, *, value: str = "load", title: str | None = None) -> go.Figure:
    """Layer x expert heatmap of `value` from `wm.routing_load(run)` (load = fraction of tokens)."""
    _need(load, ["layer", "expert", value], "load_figure")
    m = load.pivot(index="layer", columns="expert", values=value)
    fig = go.Figure(go.Heatmap(z=m.to_numpy(), x=list(m.columns), y=list(m.index), colorscale="Viridis",
                               hovertemplate="layer %{y}<br>expert %{x}<br>" + value + " %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title or f"Expert {value} per layer", xaxis_title="expert", yaxis_title="layer", **_LAYOUT)
    return fig


def lift_figure(cos: pd.DataFrame, layer: int | None = None, *, title: str | None = None) -> go.Figure:
    """Co-selection lift P(a, b) / (P(a) P(b)) of one layer (`wm.coselection(run, layer)`), on a
    log2 colour scale centred on 1 (independence); the diagonal is blank."""
    _need(cos, ["layer", "a", "b", "lift", "p_b_given_a"], "lift_figure")
    d = cos if layer is None else cos[cos.layer == layer]
    layer = int(d.layer.iloc[0]) if layer is None and len(d) else layer
    d = d[d.layer == layer]
    e = int(max(d.a.max(), d.b.max()) + 1) if len(d) else 0
    lift = np.full((e, e), np.nan)
    pba = np.full((e, e), np.nan)
    lift[d.a.to_numpy(), d.b.to_numpy()] = d.lift.to_numpy()
    pba[d.a.to_numpy(), d.b.to_numpy()] = d.p_b_given_a.to_numpy()
    with np.errstate(divide="ignore"):
        z = np.log2(lift)
    z = np.where(np.isfinite(z), z, np.nan)
    fig = go.Figure(go.Heatmap(z=z, customdata=np.dstack([lift, pba]), colorscale="RdBu_r", zmid=0,
                               colorbar=dict(title="log2 lift"),
                               hovertemplate="a %{y}, b %{x}<br>lift %{customdata[0]:.3f}<br>"
                                             "P(b|a) %{customdata[1]:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"Layer {layer}: co-selection lift P(a,b) / (P(a) P(b))",
                      xaxis_title="expert b", yaxis_title="expert a", **_LAYOUT)
    return fig


def domain_figure(ds: pd.DataFrame, layer: int, *, title: str | None = None) -> go.Figure:
    """Label x expert domain specialisation of one layer (`wm.domain_specialisation(run)`);
    the title gives the uniform baseline."""
    _need(ds, ["layer", "label", "expert", "ds", "baseline"], "domain_figure")
    d = ds[ds.layer == layer]
    m = d.pivot(index="label", columns="expert", values="ds")
    base = float(d.baseline.iloc[0]) if len(d) else float("nan")
    fig = go.Figure(go.Heatmap(z=m.to_numpy(), x=list(m.columns), y=list(m.index), colorscale="Viridis",
                               zmin=0, zmax=1, colorbar=dict(title="DS"),
                               hovertemplate="%{y}<br>expert %{x}<br>DS %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"Layer {layer}: domain specialisation (uniform baseline {base:.3f})",
                      xaxis_title="expert", yaxis_title="data label", **_LAYOUT)
    return fig


def vocab_figure(vs: pd.DataFrame, layer: int, *, top: int = 5, title: str | None = None) -> go.Figure:
    """Per expert of one layer: the token ids whose top expert it is (bars) and their mean
    vocabulary specialisation (line); the hover lists the most frequent of those tokens."""
    _need(vs, ["layer", "token_id", "n", "top_expert", "vs"], "vocab_figure")
    from workbench.metrics.routing import vocab_by_expert

    d = vocab_by_expert(vs[vs.layer == layer], top=top)
    hover = [", ".join(_short(t, 12) for t in toks) for toks in d.top_tokens]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=d.expert, y=d.token_ids, name="token ids owned", hovertext=hover)
    fig.add_scatter(x=d.expert, y=d.mean_vs, mode="markers+lines", name="mean VS", secondary_y=True)
    fig.update_layout(title=title or f"Layer {layer}: vocabulary specialisation per expert", xaxis_title="expert",
                      **_LAYOUT)
    fig.update_yaxes(title_text="token ids (top expert)", secondary_y=False)
    fig.update_yaxes(title_text="mean VS", range=[0, 1.05], secondary_y=True)
    return fig


def layer_metric_figure(tables: dict[str, pd.DataFrame], metric: str, *, title: str | None = None) -> go.Figure:
    """One line per run (`{"name": wm.routing_layers(run)}`) of `metric` over relative depth
    ((i + 0.5) / n over router layers), so models of different depth share the axis."""
    fig = go.Figure()
    for name, df in tables.items():
        _need(df, ["layer", metric], "layer_metric_figure")
        n = len(df)
        fig.add_scatter(x=[(i + 0.5) / n for i in range(n)], y=df[metric], mode="lines+markers", name=name,
                        text=[f"layer {x}" for x in df.layer])
    fig.update_layout(title=title or f"{metric} per layer (x: relative depth)", xaxis_title="relative depth",
                      yaxis_title=metric, **_LAYOUT)
    return fig


def compare_heatmap_figure(xa: np.ndarray, xb: np.ndarray, tokens: pd.DataFrame, *, mode: str = "side",
                           names=("a", "b"), max_columns: int = MAX_COLUMNS, alignment=None,
                           title: str | None = None) -> go.Figure:
    """Two runs at their matched tokens (`wm.token_difference(a, b, la, lb, alignment)`):
    mode "side" shows both heatmaps, "difference" shows b - a. With an `alignment` (experts of b
    matched to a's by assignment), the title states it and its quality."""
    if mode not in ("side", "difference"):
        raise ValueError(f"mode must be 'side' or 'difference', got {mode!r}")
    texts = tokens["text"].astype(str).tolist() if "text" in tokens else [""] * xa.shape[0]
    pa, labels, pool = pool_tokens(xa, texts, max_columns)
    pb, _, _ = pool_tokens(xb, texts, max_columns)
    notes = [f"pooled: mean over {pool} consecutive tokens per column"] if pool > 1 else []
    if alignment is not None:
        notes.append(f"experts of {names[1]} matched to {names[0]}'s by assignment on selection profiles "
                     f"(quality {alignment.quality:.2f}, random {alignment.baseline:.2f})")
    note = "".join(f"<br><sup>{n}</sup>" for n in notes)
    if mode == "side":
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=list(names), vertical_spacing=0.08)
        hi = float(np.nanmax([np.nanmax(pa) if pa.size else 0, np.nanmax(pb) if pb.size else 0, 1e-9]))
        fig.add_trace(_heat(pa, labels, name=names[0], zmin=0, zmax=hi), row=1, col=1)
        fig.add_trace(_heat(pb, labels, name=names[1], showscale=False, zmin=0, zmax=hi), row=2, col=1)
        head = f"{names[0]} and {names[1]} at {xa.shape[0]} matched tokens"
    else:
        fig = go.Figure(_heat(pb - pa, labels, colorscale="RdBu_r", zmid=0, name=f"{names[1]} - {names[0]}"))
        head = f"{names[1]} - {names[0]} at {xa.shape[0]} matched tokens"
    fig.update_layout(title=title or head + note, **_LAYOUT)
    if notes and title is None:  # room for the note lines above the first panel's title
        fig.update_layout(margin=dict(t=_LAYOUT["margin"]["t"] + 22 * len(notes) + (20 if mode == "side" else 0)))
    fig.update_xaxes(showticklabels=len(labels) <= 64, type="category")
    fig.update_yaxes(title_text="expert")
    return fig


def alignment_figure(al, *, names=("a", "b"), title: str | None = None) -> go.Figure:
    """The expert similarity matrix of an alignment (`wm.align_experts`), the matched pairs marked."""
    fig = go.Figure(go.Heatmap(z=al.similarity, colorscale="RdBu_r", zmid=0, colorbar=dict(title="corr"),
                               hovertemplate=names[0] + " %{y}<br>" + names[1] + " %{x}<br>corr %{z:.3f}<extra></extra>"))
    fig.add_scatter(x=al.table.expert_b, y=al.table.expert_a, mode="markers", name="matched",
                    marker=dict(symbol="square-open", size=14, color="black"))
    fig.update_layout(title=title or (f"Experts of {names[1]} layer {al.layer_b} matched to {names[0]} layer "
                                      f"{al.layer_a}<br><sup>quality {al.quality:.3f} (random {al.baseline:.3f}, "
                                      f"{al.tokens} tokens)</sup>"),
                      xaxis_title=f"{names[1]} expert", yaxis_title=f"{names[0]} expert", **_LAYOUT)
    return fig


__all__ = ["MAX_COLUMNS", "alignment_figure", "compare_heatmap_figure", "domain_figure", "layer_metric_figure",
           "lift_figure", "load_figure", "pool_tokens", "routing_heatmap_figure", "vocab_figure"]
