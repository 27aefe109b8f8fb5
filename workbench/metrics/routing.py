"""Routing analysis over a Run captured with `RoutingProbe`: tidy tables, comparison, alignment.

    run = wb.profile(model, docs, probes=[wb.RoutingProbe()])   # zoo Documents: labels = domains
    wm.routing_layers(run)           # per layer: load CV, entropy, margin, reuse, TLS, CLS_L
    wm.domain_specialisation(run)    # OLMoE's DS per (layer, label, expert)

Definitions (a layer's E experts; N valid tokens; S_t the experts token t selected):
- load(e) = count(e) / N (the fraction of tokens that select e); load CV = std / mean of the
  counts over experts (population std); mean_active = sum_e count(e) / N.
- entropy: mean over tokens of -sum_e p_e log p_e (nats) of the router's distribution (softmax
  of the logits; sigmoid scores normalised for DeepSeek-V3; ReLU scores normalised for BlockFFN);
  entropy_norm = entropy / log E; margin: mean of p_(1) - p_(2).
- co-selection: C(a, b) tokens selecting both; P(b | a) = C(a, b) / C(a); lift = P(a, b) /
  (P(a) P(b)) with P(a) = C(a) / N (all pairs, not only adjacent ranks; OLMoE arXiv 2409.02060
  counts adjacent ranks only).
- domain specialisation DS(D, l, e) = N(D, l, e) / n_D: the fraction of domain-D tokens that
  select e (= k N(D, l, e) / sum_e' N(D, l, e') for a fixed top-k, OLMoE's form); uniform
  baseline mean_active / E; 1.0 = e is picked for every token of D.
- vocabulary specialisation VS(v) = max_e N(v -> e) / n_v over token ids v with n_v >= min_count
  (input tokens, or the true next tokens with RoutingProbe(vocab="next")), on the same scale as DS (1.0 = the top expert takes every occurrence of v).
- reuse = mean over consecutive valid pairs with S_i non-empty of |S_i n S_i+1| / |S_i|;
  TLS = 1 - sum_e count(e) / (N E); CLS_L per sequence, valid tokens, tail dropped (BlockFFN
  arXiv 2507.08771; the paper's training code windows the flattened stream instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from workbench.capture.run import Run
from workbench.errors import RunError

PROBE = "routing"


class RoutingError(RunError):
    """A routing analysis asked of runs that cannot answer it."""


def _routers(run: Run) -> list[dict]:
    routers = run.meta.get("routers") or []
    if not routers or not any(k.startswith(f"{PROBE}/") for k in run.tensors):
        raise RoutingError("this run has no routing statistics: profile a model with routers using "
                           "probes=[wb.RoutingProbe()] (e.g. wb.profile(model, texts, probes=[wb.RoutingProbe()]))")
    return [r for r in routers if f"{PROBE}/{r['name']}/tokens" in run.tensors]


def _st(run: Run, name: str) -> dict[str, torch.Tensor]:
    prefix = f"{PROBE}/{name}/"
    return {k[len(prefix):]: v for k, v in run.tensors.items() if k.startswith(prefix)}


def _lengths(run: Run) -> list[int]:
    return list(run.meta.get("routing", {}).get("lengths") or
                next((p["lengths"] for p in run.meta.get("probes", []) if p.get("name") == PROBE), []))


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def routing_layers(run: Run) -> pd.DataFrame:
    """One row per router layer: layer, name, kind, n_experts, top_k, tokens, mean_active,
    load_cv, max_load, entropy, entropy_norm, margin, reuse, tls, cls_<L> for each L, shared_gate
    (mean sigmoid of the shared expert's gate; NaN without one)."""
    rows = []
    lengths = _lengths(run)
    for r in _routers(run):
        st = _st(run, r["name"])
        n = int(st["tokens"])
        e = int(r["n_experts"])
        c = st["counts"].double().numpy()
        row = {"layer": int(r["layer"]), "name": r["name"], "kind": r["kind"], "n_experts": e,
               "top_k": r.get("top_k"), "tokens": n, "mean_active": _div(c.sum(), n),
               "load_cv": float(c.std() / c.mean()) if c.mean() > 0 else float("nan"),
               "max_load": _div(c.max(), n), "entropy": _div(float(st["entropy"]), n),
               "entropy_norm": _div(_div(float(st["entropy"]), n), math.log(e)) if e > 1 else float("nan"),
               "margin": _div(float(st["margin"]), n),
               "reuse": _div(float(st["reuse_num"]), float(st["reuse_den"])),
               "tls": 1.0 - _div(c.sum(), n * e)}
        for j, L in enumerate(lengths):
            row[f"cls_{L}"] = 1.0 - _div(float(st["cls_num"][j]), float(st["cls_den"][j]))
        ng = int(st["shared_gate_tokens"]) if "shared_gate_tokens" in st else 0
        row["shared_gate"] = _div(float(st["shared_gate"]), ng) if ng else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def routing_load(run: Run) -> pd.DataFrame:
    """One row per (layer, expert): count, load (count / tokens), share (count / all selections),
    mass (summed routing weight), mean_weight (mass / count)."""
    rows = []
    for r in _routers(run):
        st = _st(run, r["name"])
        n = int(st["tokens"])
        c = st["counts"].numpy()
        m = st["mass"].numpy()
        tot = c.sum()
        for e in range(len(c)):
            rows.append({"layer": int(r["layer"]), "expert": e, "count": int(c[e]), "load": _div(c[e], n),
                         "share": _div(c[e], tot), "mass": float(m[e]), "mean_weight": _div(m[e], c[e])})
    return pd.DataFrame(rows)


def routing_cls(run: Run) -> pd.DataFrame:
    """CLS_L per (layer, L), plus layer = -1 pooled over layers: layer, L, cls."""
    lengths = _lengths(run)
    rows, num, den = [], np.zeros(len(lengths)), np.zeros(len(lengths))
    for r in _routers(run):
        st = _st(run, r["name"])
        a, b = st["cls_num"].double().numpy(), st["cls_den"].double().numpy()
        num, den = num + a, den + b
        rows += [{"layer": int(r["layer"]), "L": L, "cls": 1 - _div(a[j], b[j])} for j, L in enumerate(lengths)]
    rows += [{"layer": -1, "L": L, "cls": 1 - _div(num[j], den[j])} for j, L in enumerate(lengths)]
    return pd.DataFrame(rows)


def active_histogram(run: Run) -> pd.DataFrame:
    """Tokens by number of selected experts: layer, active, tokens, fraction."""
    rows = []
    for r in _routers(run):
        st = _st(run, r["name"])
        h = st["active_hist"].numpy()
        n = h.sum()
        rows += [{"layer": int(r["layer"]), "active": k, "tokens": int(h[k]), "fraction": _div(h[k], n)}
                 for k in range(len(h))]
    return pd.DataFrame(rows)


def coselection(run: Run, layer: int | None = None) -> pd.DataFrame:
    """One row per (layer, a, b), a != b: count C(a, b), p_b_given_a, lift."""
    rows = []
    for r in _layers(run, layer):
        st = _st(run, r["name"])
        n = int(st["tokens"])
        c = st["cosel"].double().numpy()
        d = np.diag(c)
        e = c.shape[0]
        for a in range(e):
            for b in range(e):
                if a != b:
                    rows.append({"layer": int(r["layer"]), "a": a, "b": b, "count": int(c[a, b]),
                                 "p_b_given_a": _div(c[a, b], d[a]),
                                 "lift": _div(c[a, b] * n, d[a] * d[b]) if n else float("nan")})
    return pd.DataFrame(rows)


def _layers(run: Run, layer: int | None) -> list[dict]:
    routers = _routers(run)
    if layer is None:
        return routers
    sel = [r for r in routers if int(r["layer"]) == int(layer)]
    if not sel:
        raise RoutingError(f"the run has no router at layer {layer}; router layers: "
                           f"{[int(r['layer']) for r in routers]}")
    return sel


def label_names(run: Run) -> list[str]:
    """The data label names of the run (run.meta["labels"]["names"])."""
    names = (run.meta.get("labels") or {}).get("names")
    if not names:
        raise RoutingError("this run carries no data labels: profile with labels=... (one label per "
                           "text, or zoo corpus Documents, which are labelled by domain)")
    return list(names)


def domain_specialisation(run: Run, labels: list[str] | None = None) -> pd.DataFrame:
    """OLMoE's domain specialisation per (layer, label, expert): tokens (n_D), count
    N(D, l, e), ds = count / n_D, baseline = mean_active / E of the layer. `labels` picks label
    names (each must exist in the run)."""
    names = label_names(run)
    if labels is not None:
        missing = [x for x in labels if x not in names]
        if missing:
            raise RoutingError(f"label(s) {missing} are not in this run; its labels are {names}")
    keep = set(labels) if labels is not None else set(names)
    rows = []
    for r in _routers(run):
        st = _st(run, r["name"])
        lc, lt = st["label_counts"].numpy(), st["label_tokens"].numpy()
        c = st["counts"].double().numpy()
        e = lc.shape[1] if lc.ndim == 2 else int(r["n_experts"])
        base = _div(c.sum(), int(st["tokens"]) * e)
        for i, name in enumerate(names):
            if name not in keep:
                continue
            n_d = int(lt[i]) if i < len(lt) else 0
            for x in range(e):
                cnt = int(lc[i, x]) if i < len(lt) else 0
                rows.append({"layer": int(r["layer"]), "label": name, "expert": x, "tokens": n_d,
                             "count": cnt, "ds": _div(cnt, n_d), "baseline": base})
    return pd.DataFrame(rows)


def top_specialisation(ds: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The n largest DS values (layer, label, expert, ds, baseline), highest first."""
    return ds.sort_values(["ds", "layer", "expert"], ascending=[False, True, True]).head(n).reset_index(drop=True)


def vocab_specialisation(run: Run, min_count: int = 10, tokenizer=None) -> pd.DataFrame:
    """VS per (layer, token id) with n_v >= min_count: layer, token_id, piece (decoded by
    `tokenizer` when given), n, top_expert, vs (max_e N(v -> e) / n_v), baseline."""
    rows = []
    for r in _routers(run):
        st = _st(run, r["name"])
        vc, vt = st["vocab_counts"].long().numpy(), st["vocab_tokens"].long().numpy()
        if vt.size == 0:
            continue
        c = st["counts"].double().numpy()
        base = _div(c.sum(), int(st["tokens"]) * len(c))
        ids = np.nonzero(vt >= min_count)[0]
        top = vc[ids].argmax(1) if len(ids) else np.zeros(0, dtype=int)
        for v, t in zip(ids, top):
            rows.append({"layer": int(r["layer"]), "token_id": int(v), "n": int(vt[v]), "top_expert": int(t),
                         "vs": vc[v, t] / vt[v], "baseline": base})
    df = pd.DataFrame(rows, columns=["layer", "token_id", "n", "top_expert", "vs", "baseline"])
    if tokenizer is not None and len(df):
        df.insert(2, "piece", [tokenizer.decode([int(v)]) for v in df["token_id"]])
    return df


def vocab_by_expert(vs: pd.DataFrame, top: int = 5) -> pd.DataFrame:
    """Per (layer, expert): token ids whose top expert it is, their mean VS, and the `top` most
    frequent of them (pieces when `vs` has a piece column)."""
    rows = []
    col = "piece" if "piece" in vs.columns else "token_id"
    for (layer, e), d in vs.groupby(["layer", "top_expert"]):
        d = d.sort_values("n", ascending=False)
        rows.append({"layer": layer, "expert": e, "token_ids": len(d), "mean_vs": float(d["vs"].mean()),
                     "top_tokens": [str(x) for x in d[col].head(top)]})
    return pd.DataFrame(rows, columns=["layer", "expert", "token_ids", "mean_vs", "top_tokens"])


# -- the token sample --------------------------------------------------------------------------

@dataclass
class Sample:
    """One layer's token sample: weights / selected [T, E] (T kept tokens in reading order) and
    a tidy per-token table (rank, seq, pos, token_id, text, label)."""

    layer: int
    weights: np.ndarray
    selected: np.ndarray
    tokens: pd.DataFrame


def sample(run: Run, layer: int) -> Sample:
    """The token sample of router layer `layer` (the first `budget` valid tokens of the run)."""
    r = _layers(run, layer)[0]
    st = _st(run, r["name"])
    if "sample_rank" not in st:
        raise RoutingError("this run has no token sample: profile with RoutingProbe(budget=N), N > 0")
    rank = st["sample_rank"].numpy()
    keep = np.nonzero(rank >= 0)[0]
    keep = keep[np.argsort(rank[keep], kind="stable")]
    text = run.meta.get("routing", {}).get("sample_text")
    names = (run.meta.get("labels") or {}).get("names") or []
    lab = st["sample_label"].numpy()[keep]
    tokens = pd.DataFrame({
        "rank": rank[keep], "seq": st["sample_seq"].numpy()[keep], "pos": st["sample_pos"].numpy()[keep],
        "token_id": st["sample_token"].numpy()[keep],
        "text": [text[i] for i in keep] if text else [""] * len(keep),
        "label": [names[i] if 0 <= i < len(names) else "" for i in lab]})
    return Sample(int(r["layer"]), st["sample_weights"].float().numpy()[keep],
                  st["sample_selected"].numpy()[keep], tokens)


def sample_table(run: Run, layer: int) -> pd.DataFrame:
    """The token sample of one layer as a tidy table: one row per (token, selected expert)."""
    s = sample(run, layer)
    t, e = np.nonzero(s.selected)
    out = s.tokens.iloc[t].reset_index(drop=True)
    out.insert(0, "layer", s.layer)
    out["expert"] = e
    out["weight"] = s.weights[t, e]
    return out


# -- two runs: side by side, alignment, difference -----------------------------------------------

def _depths(run: Run) -> list[tuple[int, float]]:
    rs = _routers(run)
    return [(int(r["layer"]), (i + 0.5) / len(rs)) for i, r in enumerate(rs)]


def align_layers(a: Run, b: Run) -> pd.DataFrame:
    """Each router layer of `a` matched to the router layer of `b` at the nearest relative depth
    ((i + 0.5) / n over router layers): layer_a, depth_a, layer_b, depth_b."""
    da, db = _depths(a), _depths(b)
    rows = []
    for la, xa in da:
        lb, xb = min(db, key=lambda t: (abs(t[1] - xa), t[0]))
        rows.append({"layer_a": la, "depth_a": xa, "layer_b": lb, "depth_b": xb})
    return pd.DataFrame(rows)


def compare_runs(a: Run, b: Run, names=("a", "b")) -> pd.DataFrame:
    """Side by side per aligned layer pair (relative depth): one row per (layer_a, layer_b, metric)
    with the value of each run (columns named by `names`) and their difference."""
    la, lb = routing_layers(a).set_index("layer"), routing_layers(b).set_index("layer")
    metrics = [c for c in la.columns if c in lb.columns and c not in ("name", "kind", "n_experts", "top_k", "tokens")
               and pd.api.types.is_numeric_dtype(la[c])]
    rows = []
    for _, m in align_layers(a, b).iterrows():
        for c in metrics:
            va, vb = float(la.loc[m.layer_a, c]), float(lb.loc[m.layer_b, c])
            rows.append({"layer_a": int(m.layer_a), "layer_b": int(m.layer_b), "depth_a": m.depth_a,
                         "metric": c, names[0]: va, names[1]: vb, "difference": vb - va})
    return pd.DataFrame(rows)


def matched_tokens(a: Run, b: Run, layer_a: int, layer_b: int, *, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices into sample(a, layer_a) and sample(b, layer_b) of the tokens both runs saw at
    the same place (same rank in the data and same token id). strict=True (the token-level
    difference mode) requires the two samples to be over the same token ids."""
    sa, sb = sample(a, layer_a), sample(b, layer_b)
    ra = dict(zip(sa.tokens["rank"], range(len(sa.tokens))))
    ia, ib, differ = [], [], 0
    for j, (rk, tid) in enumerate(zip(sb.tokens["rank"], sb.tokens["token_id"])):
        i = ra.get(rk)
        if i is None:
            continue
        if sa.tokens["token_id"].iloc[i] == tid:
            ia.append(i)
            ib.append(j)
        else:
            differ += 1
    if strict and differ:
        raise RoutingError(f"the two runs' token samples differ in {differ} of {differ + len(ia)} positions: the "
                           "token-level difference needs both runs over the same token ids: profile both models "
                           "on the same data (the same token id tensor, or texts with the same tokenizer), or "
                           "compare side by side instead")
    if not ia:
        raise RoutingError("the two runs have no common tokens in their token samples (same position, same "
                           "token id): profile both on the same data with RoutingProbe(budget > 0) to align "
                           "or difference them")
    return np.array(ia), np.array(ib)


@dataclass
class ExpertAlignment:
    """Experts of layer_b matched to experts of layer_a by assignment on their selection
    profiles over the common tokens (scipy.optimize.linear_sum_assignment, maximising the total
    correlation). table: expert_a, expert_b, similarity; quality: mean matched similarity;
    baseline: mean similarity of all pairs (a random matching's expectation); tokens: how many
    common tokens the profiles span; similarity: the full [E_a, E_b] matrix."""

    layer_a: int
    layer_b: int
    table: pd.DataFrame
    quality: float
    baseline: float
    tokens: int
    similarity: np.ndarray


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation between the columns of x [T, A] and y [T, B] (0 for constant columns)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    nx, ny = np.sqrt((x * x).sum(0)), np.sqrt((y * y).sum(0))
    den = np.outer(nx, ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (x.T @ y) / den
    return np.where(den > 0, c, 0.0)


def align_experts(a: Run, b: Run, layer_a: int, layer_b: int) -> ExpertAlignment:
    """Match the experts of `b` at layer_b to those of `a` at layer_a (see ExpertAlignment)."""
    from scipy.optimize import linear_sum_assignment

    ia, ib = matched_tokens(a, b, layer_a, layer_b)
    pa = sample(a, layer_a).selected[ia].astype(np.float64)
    pb = sample(b, layer_b).selected[ib].astype(np.float64)
    sim = _corr(pa, pb)
    rows_a, cols_b = linear_sum_assignment(sim, maximize=True)
    table = pd.DataFrame({"expert_a": rows_a, "expert_b": cols_b, "similarity": sim[rows_a, cols_b]})
    return ExpertAlignment(layer_a, layer_b, table, float(sim[rows_a, cols_b].mean()), float(sim.mean()),
                           len(ia), sim)


def token_difference(a: Run, b: Run, layer_a: int, layer_b: int, alignment: ExpertAlignment | None = None,
                     value: str = "weights") -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(a's matrix [T, E_a], b's matrix mapped onto a's experts [T, E_a], the common tokens) at
    the common tokens of the two samples; `value` "weights" or "selected". Runs with the same
    expert count are compared expert by expert unless an `alignment` is given; different counts
    need one (b's experts not matched to any of a's are dropped; a's unmatched experts read 0)."""
    ia, ib = matched_tokens(a, b, layer_a, layer_b, strict=True)
    sa, sb = sample(a, layer_a), sample(b, layer_b)
    xa = (sa.weights if value == "weights" else sa.selected.astype(np.float32))[ia]
    xb = (sb.weights if value == "weights" else sb.selected.astype(np.float32))[ib]
    if alignment is None:
        if xa.shape[1] != xb.shape[1]:
            raise RoutingError(f"layer {layer_a} of a has {xa.shape[1]} experts and layer {layer_b} of b "
                               f"{xb.shape[1]}: pass alignment=align_experts(a, b, {layer_a}, {layer_b})")
        mapped = xb
    else:
        mapped = np.zeros_like(xa)
        mapped[:, alignment.table["expert_a"].to_numpy()] = xb[:, alignment.table["expert_b"].to_numpy()]
    return xa, mapped, sa.tokens.iloc[ia].reset_index(drop=True)


__all__ = [
    "ExpertAlignment", "RoutingError", "Sample", "active_histogram", "align_experts", "align_layers",
    "compare_runs", "coselection", "domain_specialisation", "label_names", "matched_tokens", "routing_cls",
    "routing_layers", "routing_load", "sample", "sample_table", "token_difference", "top_specialisation",
    "vocab_by_expert", "vocab_specialisation",
]
