"""Functional partitions ("bricks") of FFN neurons: found, named and proven by ablation.

Definitions (REFERENCE.md, "Functional partitions"):

- per-instance score s[x, i] = mean |a_i| over the valid tokens of instance x (one text), from the
  `InstanceScores` probe; for non-ReLU models also mean |a_i| * active_i under a CETT rule;
- FuncScore(i, f) = average precision of s[:, i] against y = (label == f) (Configurable
  Foundation Models), computed for every neuron at once on the scores' device
  (`average_precision`, equal to sklearn.metrics.average_precision_score, ties included);
- predictivity(i, f) = max(AP(y, s_i), AP(1 - y, s_i)) (modularity analysis);
- the top 1 % neurons per function by FuncScore, and the hypergeometric tail probability of
  their count in a brick (scipy.stats.hypergeom; a brick serves f when p <= alpha = 0.001);
- co-activation C[i, j] = tokens on which i and j are both active (`CoActivation` probe);
- partitions into K equal bricks per layer: "coactivation" = spectral embedding of the
  co-activation graph (affinity C_ij / sqrt(C_ii C_jj), sklearn.manifold.spectral_embedding),
  k-means centres (sklearn), then an exactly balanced assignment (the transportation problem
  as scipy.optimize.linear_sum_assignment, a few balanced Lloyd rounds); "weights" = MoEfication's baseline,
  the same balanced k-means on the L2-normalised rows of W_gate (W_up for non-gated FFNs);
- K: given, or "auto" = the candidate (2, 4, ..., 64, dividing d_ff, bricks of >= 8 neurons)
  with the largest modularity of the co-activation graph;
- validation by ablation: a brick's neurons are zeroed on every token (`intervene(keep=...)`)
  during real forward passes; the increase of the mean next-token loss per function against
  random neuron sets of the same size in the same layer (several seeds), and the paper's
  experiment: the top 5 % FuncScore neurons of every layer per function.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from workbench.capture.bricks import CoActivation, InstanceScores
from workbench.capture.rules import Rule
from workbench.errors import WorkbenchError
from workbench.metrics._data import ffn_sites, token_batches
from workbench.metrics.interventions import intervene

FORMAT = "workbench-partition"
VERSION = 1
RELU_LIKE = ("relu", "fatrelu", "relu2", "relu_squared", "squared_relu", "relu6")


class BricksError(WorkbenchError):
    """Bad input to the bricks analysis (labels, layers, K, partition files)."""


# ----------------------------------------------------------------------------- FuncScore
def average_precision(scores: torch.Tensor, y: torch.Tensor, *, chunk: int = 2048) -> torch.Tensor:
    """AP of every column of scores [n, m] against binary labels y [n]: [m] float64.

    Equal to sklearn.metrics.average_precision_score(y, scores[:, j]) for every j: sum over
    distinct score thresholds (descending) of (R_k - R_{k-1}) * P_k, ties as one threshold.
    Vectorised over columns (chunks of `chunk`) on the scores' device.
    """
    if scores.dim() != 2 or y.dim() != 1 or y.shape[0] != scores.shape[0]:
        raise BricksError(f"average_precision needs scores [n, m] and labels [n]; got "
                          f"{tuple(scores.shape)} and {tuple(y.shape)}")
    y = y.to(scores.device).bool()
    pos = int(y.sum())
    if pos == 0 or pos == y.shape[0]:
        raise BricksError("average precision needs both positive and negative instances; "
                          "every function label must occur and not be the only one")
    n = scores.shape[0]
    rank = torch.arange(1, n + 1, device=scores.device, dtype=torch.float64)[:, None]
    out = []
    for j in range(0, scores.shape[1], chunk):
        s = scores[:, j:j + chunk].double()
        order = s.argsort(dim=0, descending=True, stable=True)
        ss = s.gather(0, order)
        tp = y[order].double().cumsum(0)
        end = torch.ones_like(ss, dtype=torch.bool)
        end[:-1] = ss[:-1] != ss[1:]
        tp_end = torch.where(end, tp, torch.zeros((), dtype=tp.dtype, device=tp.device))
        prev = torch.cat([torch.zeros_like(tp[:1]), tp_end.cummax(0).values[:-1]])
        out.append(torch.where(end, (tp - prev) * tp / rank, torch.zeros_like(tp)).sum(0) / pos)
    return torch.cat(out)


def func_scores(scores: torch.Tensor, labels: torch.Tensor, n_functions: int) -> torch.Tensor:
    """FuncScore [F, m]: AP of each neuron's instance scores [n, m] against label == f."""
    labels = labels.to(scores.device)
    return torch.stack([average_precision(scores, labels == f) for f in range(n_functions)])


def predictivity(scores: torch.Tensor, labels: torch.Tensor, n_functions: int) -> torch.Tensor:
    """Predictivity [F, m]: max(AP(y, s), AP(1 - y, s)) with y = (label == f)."""
    labels = labels.to(scores.device)
    return torch.stack([torch.maximum(average_precision(scores, labels == f),
                                      average_precision(scores, labels != f)) for f in range(n_functions)])


def top_neurons(score: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    """Indices [F, t] of the top `frac` neurons (at least one) per row of score [F, m]."""
    t = max(1, int(math.ceil(frac * score.shape[1])))
    return score.topk(t, dim=1).indices


def concentration(top: torch.Tensor, assignment: torch.Tensor, k: int, functions: list[str]) -> pd.DataFrame:
    """Per (brick, function): how many of the function's top neurons the brick holds and the
    hypergeometric tail p = P(X >= count) for a brick of that size drawn from d_ff neurons."""
    from scipy.stats import hypergeom

    m = assignment.shape[0]
    sizes = torch.bincount(assignment, minlength=k).tolist()
    rows = []
    for f, name in enumerate(functions):
        counts = torch.bincount(assignment[top[f]], minlength=k).tolist()
        for b in range(k):
            p = float(hypergeom.sf(counts[b] - 1, m, sizes[b], top.shape[1]))
            rows.append({"brick": b, "function": name, "top_count": counts[b], "top_total": int(top.shape[1]),
                         "size": sizes[b], "p_value": p})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- partitions
def balanced_assignment(cost: np.ndarray) -> np.ndarray:
    """Assign m items to K groups of exactly m / K items at the least total cost ([m, K] -> [m]).

    The transportation problem as an assignment problem: each group's column repeated m / K
    times, solved exactly by scipy.optimize.linear_sum_assignment (an [m, m] cost matrix:
    about 5 s at m = 4096 on one core, 1 GB and a minute or more at m = 11008).
    """
    from scipy.optimize import linear_sum_assignment

    m, k = cost.shape
    if m % k:
        raise BricksError(f"a balanced partition of {m} neurons into K={k} bricks needs K to divide {m}")
    rows, cols = linear_sum_assignment(np.repeat(np.asarray(cost, dtype=np.float64), m // k, axis=1))
    out = np.empty(m, dtype=np.int64)
    out[rows] = cols // (m // k)
    return out


def balanced_kmeans(x: np.ndarray, k: int, *, seed: int = 0, rounds: int | None = None) -> np.ndarray:
    """Equal-size k-means: sklearn KMeans centres, then balanced assignments and centre updates
    (`rounds` Lloyd rounds, default 6, 2 above 4096 items; stops early when stable)."""
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float64)
    rounds = rounds if rounds is not None else (6 if x.shape[0] <= 4096 else 2)
    centres = KMeans(n_clusters=k, n_init=2, random_state=seed).fit(x).cluster_centers_
    labels = None
    for _ in range(rounds):
        cost = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        new = balanced_assignment(cost)
        if labels is not None and (new == labels).all():
            break
        labels = new
        centres = np.stack([x[labels == c].mean(0) for c in range(k)])
    return labels


def coactivation_affinity(counts: torch.Tensor) -> torch.Tensor:
    """Affinity [m, m] float64: C_ij / sqrt(C_ii C_jj) (the cosine of the two neurons' active
    indicator vectors), zero diagonal; never-active neurons get a tiny uniform affinity so the
    graph stays connected."""
    c = counts.double()
    d = c.diagonal().clone().clamp(min=1.0)
    a = c / torch.sqrt(d[:, None] * d[None, :])
    a.fill_diagonal_(0.0)
    return a + 1e-9


def modularity(affinity: torch.Tensor, assignment: torch.Tensor) -> float:
    """Newman modularity Q of a partition of a weighted graph (affinity without self loops)."""
    a = affinity.double()
    w = a.sum()
    onehot = torch.nn.functional.one_hot(assignment.long()).double()
    inside = (onehot.t() @ a @ onehot).diagonal()
    deg = onehot.t() @ a.sum(1)
    return float((inside / w - (deg / w) ** 2).sum())


def _spectral(affinity: torch.Tensor, n: int, seed: int) -> np.ndarray:
    from sklearn.manifold import spectral_embedding

    return spectral_embedding(affinity.numpy(), n_components=n, random_state=seed, drop_first=False)


def _check_k(k: int, m: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise BricksError(f"K must be a positive integer or 'auto'; got {k!r}")
    if k > m:
        raise BricksError(f"K={k} is larger than the layer's {m} neurons; choose K <= {m}")
    if m % k:
        divs = [d for d in (2, 4, 8, 16, 32, 64, 128) if m % d == 0 and d <= m]
        raise BricksError(f"K={k} does not divide the layer's {m} neurons, so the bricks cannot be equal; "
                          f"choose a divisor of {m} (e.g. {divs}) or K='auto'")


def k_candidates(m: int, min_size: int = 8) -> list[int]:
    return [k for k in (2, 4, 8, 16, 32, 64) if m % k == 0 and m // k >= min_size]


def partition_coactivation(counts: torch.Tensor, k: int | str = 8, *, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Balanced partition of one layer from its co-activation counts [m, m] -> ([m] brick ids, info).

    k="auto" picks the candidate with the largest modularity (info["scan"] lists them)."""
    m = counts.shape[0]
    aff = coactivation_affinity(counts.cpu())
    if k == "auto":
        cands = k_candidates(m)
        if not cands:
            raise BricksError(f"K='auto' needs a layer of at least 16 neurons divisible by 2; this one has {m}")
        emb = _spectral(aff, max(cands), seed)
        scan = {}
        best = None
        for c in cands:
            lab = torch.from_numpy(balanced_kmeans(emb[:, :c], c, seed=seed)).long()
            q = modularity(aff, lab)
            scan[c] = q
            if best is None or q > best[0]:
                best = (q, c, lab)
        return best[2], {"k": best[1], "modularity": best[0], "criterion": "max modularity", "scan": scan}
    _check_k(k, m)
    if k == 1:
        lab = torch.zeros(m, dtype=torch.long)
    else:
        lab = torch.from_numpy(balanced_kmeans(_spectral(aff, k, seed), k, seed=seed)).long()
    return lab, {"k": k, "modularity": modularity(aff, lab), "criterion": "given"}


def _in_weight(site) -> torch.Tensor:
    """W_in rows [d_ff, d_model]: the gate projection's (gated FFNs) or the up projection's."""
    mod = site.gate if site.gate is not None else site.up
    if mod is None:
        raise BricksError(f"layer {site.layer} ({site.name}): no gate/up projection to cluster")
    w = mod.weight.detach().float().cpu()
    if w.shape[0] == 2 * site.d_ff and site.fused_gate_up:
        w = w[:site.d_ff]
    if tuple(w.shape) == (site.d_model, site.d_ff):
        w = w.t()
    return w


def partition_weights(site, k: int, *, seed: int = 0) -> torch.Tensor:
    """MoEfication's baseline: balanced k-means of the L2-normalised W_in rows -> [d_ff] ids."""
    _check_k(k, site.d_ff)
    w = _in_weight(site)
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    if k == 1:
        return torch.zeros(site.d_ff, dtype=torch.long)
    return torch.from_numpy(balanced_kmeans(w.numpy(), k, seed=seed)).long()


# ----------------------------------------------------------------------------- Partition files
def model_identity(model: nn.Module) -> dict:
    """What a partition belongs to: source, class, shapes, and a fingerprint of the weights
    (sha256 over each FFN's down-projection shape and first 4096 values)."""
    sites = ffn_sites(model)
    h = hashlib.sha256()
    for s in sites:
        w = s.down_weight().detach()
        h.update(str((s.layer, tuple(w.shape))).encode())
        h.update(w.reshape(-1)[:4096].float().cpu().numpy().tobytes())
    cfg = getattr(model, "config", None)
    return {"source": getattr(model, "wb_source", None), "class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "d_ff": {str(s.layer): s.d_ff for s in sites}, "fingerprint": h.hexdigest()}


@dataclass
class Partition:
    """Bricks of some layers: assignments[layer] = [d_ff] int64 brick id per neuron."""

    assignments: dict[int, torch.Tensor]
    method: str
    model: dict
    names: dict[int, list[str]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def k(self, layer: int) -> int:
        return int(self.assignments[layer].max()) + 1

    def __repr__(self) -> str:  # not every assignment tensor (thousands of lines in a notebook)
        layers = sorted(self.assignments)
        ks = sorted({self.k(i) for i in layers})
        src = self.model.get("source") or self.model.get("class") or "?"
        return (f"Partition(method={self.method!r}, model={src!r}, layers={layers}, "
                f"k={ks[0] if len(ks) == 1 else ks}, named={bool(self.names)})")

    def bricks(self, layer: int) -> list[torch.Tensor]:
        """The neuron indices of each brick of `layer`."""
        a = self.assignments[layer]
        return [torch.nonzero(a == b).flatten() for b in range(self.k(layer))]

    def check(self, model: nn.Module) -> None:
        """Raise BricksError when this partition was not made for `model`."""
        me = model_identity(model)
        if me["d_ff"] != self.model.get("d_ff") or me["fingerprint"] != self.model.get("fingerprint"):
            raise BricksError(
                f"this partition was made for {self.model.get('source') or self.model.get('class')} "
                f"(fingerprint {str(self.model.get('fingerprint'))[:12]}), not for this model "
                f"({me['source'] or me['class']}, fingerprint {me['fingerprint'][:12]}); recompute the "
                "partition on this model (wm.brick_analysis)")

    def save(self, path: str | Path) -> Path:
        """Write `path`/partition.safetensors (assignments) and `path`/partition.json."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({f"layer{la}": a.long().contiguous() for la, a in self.assignments.items()},
                  str(path / "partition.safetensors"), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": VERSION, "method": self.method, "model": self.model,
                "layers": sorted(self.assignments), "names": {str(k): v for k, v in self.names.items()},
                "info": self.info}
        (path / "partition.json").write_text(json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Partition:
        """Read a partition; with `model`, check that it was made for that model."""
        from safetensors.torch import load_file

        path = Path(path)
        jp, tp = path / "partition.json", path / "partition.safetensors"
        if not jp.is_file() or not tp.is_file():
            raise BricksError(f"{path} is not a saved partition (needs partition.json and "
                              "partition.safetensors, as Partition.save writes)")
        meta = json.loads(jp.read_text())
        if meta.get("format") != FORMAT:
            raise BricksError(f"{jp} is not a partition file (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise BricksError(f"{jp} has version {meta.get('version')}; this workbench reads <= {VERSION}")
        t = load_file(str(tp))
        part = cls({int(k[5:]): v for k, v in t.items()}, meta["method"], meta["model"],
                   {int(k): v for k, v in meta.get("names", {}).items()}, meta.get("info", {}))
        if model is not None:
            part.check(model)
        return part


# ----------------------------------------------------------------------------- ablation
@contextmanager
def ablate(model: nn.Module, neurons: dict[int, torch.Tensor]):
    """Zero the given neurons (layer -> indices [n] or bool mask [d_ff]) on every token while the
    block runs, through `intervene` (hooks only; the model is restored exactly on exit)."""
    sites = {s.layer: s for s in ffn_sites(model)}
    keep = {}
    for layer, idx in neurons.items():
        if layer not in sites:
            raise BricksError(f"layer {layer} does not exist: the model's FFN layers are {sorted(sites)}")
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            k = ~idx
        else:
            k = torch.ones(sites[layer].d_ff, dtype=torch.bool)
            k[idx.long()] = False
        keep[layer] = k
    with intervene(model, "zero", keep=keep) as iv:
        yield iv


@dataclass
class EvalSet:
    """Labelled evaluation batches: [(ids [B, S], mask [B, S], function id [B])] + names."""

    batches: list
    functions: list[str]

    @classmethod
    def build(cls, data, labels=None, *, tokenizer=None, batch_size: int = 16, max_length: int | None = 128):
        from workbench.capture.profile import _label_names

        names, _ = _label_names(data, labels)
        if names is None:
            raise BricksError("the evaluation data has no labels: pass corpus Documents (labelled by domain) "
                              "or eval_labels=[one label per text]")
        kept: list[int] = []
        batches = token_batches(data, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, kept=kept)
        functions = sorted(set(names))
        fid = torch.tensor([functions.index(names[i]) for i in kept])
        out, row = [], 0
        for ids, m in batches:
            out.append((ids, m, fid[row:row + ids.shape[0]]))
            row += ids.shape[0]
        return cls(out, functions)


def _losses(model, ev: EvalSet) -> dict[str, float]:
    """Mean next-token NLL per function, all functions in the same forward passes."""
    from workbench.data import model_device

    device = model_device(model)
    tot = torch.zeros(len(ev.functions), dtype=torch.float64)
    cnt = torch.zeros(len(ev.functions), dtype=torch.float64)
    with torch.no_grad():
        for ids, m, fid in ev.batches:
            out = model(input_ids=ids.to(device), attention_mask=m.to(device))
            logits = out.logits if hasattr(out, "logits") else out[0]
            lp = torch.nn.functional.log_softmax(logits[:, :-1].float(), dim=-1)
            pair = ((m[:, :-1] != 0) & (m[:, 1:] != 0)).to(lp.device)
            nl = -lp.gather(-1, ids[:, 1:].to(lp.device)[..., None])[..., 0]
            tot.index_add_(0, fid, (nl.double() * pair).sum(1).cpu())
            cnt.index_add_(0, fid, pair.sum(1).double().cpu())
    if (cnt == 0).any():
        raise BricksError("a function of the evaluation data has no next-token prediction; give texts of >= 2 tokens")
    if not torch.isfinite(tot).all():
        raise BricksError("the loss is NaN/Inf: check the model's dtype and weights")
    return {f: float(tot[i] / cnt[i]) for i, f in enumerate(ev.functions)}


def ablation_matrix(model: nn.Module, partition: Partition, eval_sets: EvalSet, *, seeds: int = 3,
                    layers: list[int] | None = None, base: dict[str, float] | None = None) -> pd.DataFrame:
    """Loss per function with each brick ablated, and with random same-size sets (seeds per
    layer and size). Tidy: layer, brick (-1 for random), kind, seed, size, function, loss,
    base_loss, delta (loss - base), rel (delta / base)."""
    base = base or _losses(model, eval_sets)
    rows = []

    def add(layer, brick, kind, seed, size, losses):
        for f, v in losses.items():
            rows.append({"layer": layer, "brick": brick, "kind": kind, "seed": seed, "size": size, "function": f,
                         "loss": v, "base_loss": base[f], "delta": v - base[f], "rel": (v - base[f]) / base[f]})

    for layer in layers or sorted(partition.assignments):
        d_ff = partition.assignments[layer].shape[0]
        sizes = set()
        for b, idx in enumerate(partition.bricks(layer)):
            sizes.add(int(idx.numel()))
            with ablate(model, {layer: idx}):
                add(layer, b, "brick", -1, int(idx.numel()), _losses(model, eval_sets))
        for size in sorted(sizes):
            for seed in range(seeds):
                g = torch.Generator().manual_seed(1000 * layer + seed)
                idx = torch.randperm(d_ff, generator=g)[:size]
                with ablate(model, {layer: idx}):
                    add(layer, -1, "random", seed, size, _losses(model, eval_sets))
    return pd.DataFrame(rows)


def top_ablation(model: nn.Module, scores: dict[int, torch.Tensor], functions: list[str],
                 eval_sets: EvalSet, *, frac: float = 0.05, seeds: int = 3,
                 base: dict[str, float] | None = None) -> pd.DataFrame:
    """The paper's experiment: ablate the top `frac` FuncScore neurons of every layer for one
    function at a time (target), and random `frac` sets per layer (target "random", seeds).
    Tidy: target, seed, function, loss, base_loss, delta, rel."""
    base = base or _losses(model, eval_sets)
    rows = []

    def add(target, seed, losses):
        for f, v in losses.items():
            rows.append({"target": target, "seed": seed, "function": f, "loss": v, "base_loss": base[f],
                         "delta": v - base[f], "rel": (v - base[f]) / base[f]})

    for fi, name in enumerate(functions):
        sel = {la: top_neurons(s, frac)[fi] for la, s in scores.items()}
        with ablate(model, sel):
            add(name, -1, _losses(model, eval_sets))
    for seed in range(seeds):
        sel = {}
        for la, s in scores.items():
            m = s.shape[1]
            g = torch.Generator().manual_seed(7919 * (la + 1) + seed)
            sel[la] = torch.randperm(m, generator=g)[:max(1, int(math.ceil(frac * m)))]
        with ablate(model, sel):
            add("random", seed, _losses(model, eval_sets))
    return pd.DataFrame(rows)


def ablation_summary(abl: pd.DataFrame, names: pd.DataFrame | None = None, *, by: str = "delta") -> pd.DataFrame:
    """Per function: the brick whose ablation raises that function's loss most (by="delta"), or
    the most selective one (by="selectivity": delta on the function minus the mean delta on
    the others); its delta on the function, the mean delta on the other functions, and random
    same-size sets of that layer (mean and std over seeds) on the function."""
    rows = []
    bricks = abl[abl["kind"] == "brick"].copy()
    rand = abl[abl["kind"] == "random"]
    if by == "selectivity":
        tot = bricks.groupby(["layer", "brick"])["delta"].transform("sum")
        n = bricks["function"].nunique()
        bricks["_key"] = bricks["delta"] - (tot - bricks["delta"]) / max(n - 1, 1)
    elif by == "delta":
        bricks["_key"] = bricks["delta"]
    else:
        raise BricksError(f"by must be 'delta' or 'selectivity'; got {by!r}")
    for f in sorted(abl["function"].unique()):
        d = bricks[bricks["function"] == f]
        best = d.loc[d["_key"].idxmax()]
        layer, brick, size = int(best["layer"]), int(best["brick"]), int(best["size"])
        same = bricks[(bricks["layer"] == layer) & (bricks["brick"] == brick)]
        others = same[same["function"] != f]["delta"]
        r = rand[(rand["layer"] == layer) & (rand["size"] == size) & (rand["function"] == f)]["delta"]
        row = {"function": f, "layer": layer, "brick": brick, "size": size, "delta_own": float(best["delta"]),
               "rel_own": float(best["rel"]), "delta_others_mean": float(others.mean()),
               "delta_random_mean": float(r.mean()), "delta_random_std": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
               "base_loss": float(best["base_loss"])}
        if names is not None:
            nm = names[(names["layer"] == layer) & (names["brick"] == brick)]["name"]
            row["name"] = str(nm.iloc[0]) if len(nm) else ""
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the analysis
def zoo_documents(n_train: int = 16, n_eval: int = 4) -> tuple[list, list]:
    """The zoo corpus's first `n_train` training and `n_eval` validation documents of every
    domain (prose, code, math, records): labelled data for `brick_analysis` on the zoo."""
    from workbench.models.corpus import DOMAINS, load_split

    def pick(split, n):
        docs = load_split(split)
        return [d for dom in DOMAINS for d in [x for x in docs if x.domain == dom][:n]]

    return pick("train", n_train), pick("validation", n_eval)


@dataclass
class BrickAnalysis:
    """Everything `brick_analysis` found; the tables are also stored in `run` (wm.table)."""

    run: object
    functions: list[str]
    partition: Partition
    baseline: Partition
    funcscore: dict[int, torch.Tensor]          # layer -> [F, d_ff]
    predictivity: dict[int, torch.Tensor]       # layer -> [F, d_ff]
    funcscore_rule: dict[int, torch.Tensor]     # layer -> [F, d_ff] (non-"zero" rules), else {}
    bricks: pd.DataFrame                         # layer, brick, size, name, function scores
    concentration: pd.DataFrame                  # layer, method, brick, function, top_count, p_value
    quality: pd.DataFrame                        # layer, method, k, modularity, within_coactivation
    ablation: pd.DataFrame
    baseline_ablation: pd.DataFrame | None
    top_ablation: pd.DataFrame
    summary: pd.DataFrame
    selective: pd.DataFrame
    rule: str
    timings: dict = field(default_factory=dict)  # CPU seconds of the process per stage


def _clock() -> float:
    """Process CPU time (all threads): what the analysis costs, whatever else runs beside it."""
    return time.process_time()


def _is_relu(sites) -> bool:
    return all(str(s.activation).lower() in RELU_LIKE for s in sites)


def _within(counts: torch.Tensor, assignment: torch.Tensor) -> float:
    """Fraction of off-diagonal co-activation mass inside bricks."""
    c = counts.double().clone()
    c.fill_diagonal_(0)
    same = assignment[:, None] == assignment[None, :]
    tot = float(c.sum())
    return float(c[same].sum()) / tot if tot else float("nan")


def brick_analysis(model: nn.Module, data, *, eval_data=None, labels=None, eval_labels=None, k: int | str = 8,
                   rule=None, cett_target: float = 0.2, layers: list[int] | None = None, budget: int = 4096,
                   seeds: int = 3, top_frac: float = 0.01, ablate_frac: float = 0.05, alpha: float = 1e-3,
                   baseline_ablation: bool = True, batch_size: int = 8, max_length: int | None = 256,
                   eval_batch_size: int = 32, eval_max_length: int | None = 128,
                   max_tokens: int | None = None, seed: int = 0, progress: bool = False) -> BrickAnalysis:
    """The whole bricks analysis of `model`: profile `data` (labelled texts: corpus Documents or
    `labels`) with the co-activation and instance-score probes, FuncScores, partitions (the
    co-activation one and MoEfication's weight baseline), brick names, and the ablation matrix
    on `eval_data` (labelled the same way; default: `data`).

    rule: what "active" means for co-activation (default "zero" for ReLU models, else the CETT
    magnitude rule at `cett_target`, calibrated on `data`). k: bricks per layer or "auto".
    """
    from workbench.capture.profile import profile
    from workbench.metrics.store import store

    sites = ffn_sites(model)
    by_layer = {s.layer: s for s in sites}
    if layers is not None:
        if not len(layers):
            raise BricksError(f"layers=[]: give some of the model's FFN layers {sorted(by_layer)}, or None for all")
        bad = [la for la in layers if la not in by_layer]
        if bad:
            raise BricksError(f"layer(s) {bad} do not exist: the model's FFN layers are {sorted(by_layer)}")
    if rule is None:
        from workbench.metrics.cett import check_target

        try:
            check_target(cett_target, "cett_target")
        except WorkbenchError as exc:
            raise BricksError(str(exc)) from None
    layers = sorted(layers if layers is not None else by_layer)
    for la in layers:
        if k != "auto":
            _check_k(k, by_layer[la].d_ff)
    if labels is None and not (isinstance(data, (list, tuple)) and data and all(hasattr(d, "domain") for d in data)):
        raise BricksError("the data has no labels: FuncScores need one function label per text; pass corpus "
                          "Documents (labelled by domain) or labels=[one label per text]")
    if labels is not None and not isinstance(labels, str) and len(set(map(str, labels))) < 2:
        raise BricksError(f"the data has a single label ({str(labels[0])!r}): FuncScores compare a function "
                          "with the others, so give texts of at least two labels")
    tok = getattr(model, "tokenizer", None)
    t0 = _clock()
    if rule is None:
        if _is_relu(sites):
            rule = Rule()
        else:
            from workbench.metrics.cett import CETTCalibration

            cal = CETTCalibration.from_model(model, data, batch_size=batch_size, max_length=max_length,
                                             n_candidates=4096)
            rule = cal.rule(cett_target)
    rule = Rule.parse(rule)
    timings = {"rule": _clock() - t0}
    t0 = _clock()
    probes = ["neuron_stats", CoActivation(layers), InstanceScores(budget, seed=seed, layers=layers)]
    run = profile(model, data, labels=labels, rule=rule, probes=probes, batch_size=batch_size,
                  max_length=max_length, max_tokens=max_tokens, progress=progress)
    timings["profile"] = _clock() - t0
    t0 = _clock()
    lab = run.meta.get("labels")
    if not lab:
        raise BricksError("the profile carried no labels; pass labelled data")
    functions = list(lab["names"])
    if len(functions) < 2:
        raise BricksError(f"the data has a single label ({functions[0]!r}): FuncScores compare a function "
                          "with the others, so give texts of at least two labels")
    fs, pr, fsr, assign, base_assign = {}, {}, {}, {}, {}
    conc, quality, brick_rows = [], [], []
    part_info = {}
    for la in layers:
        s = by_layer[la]
        key = s.name
        t = run.tensors
        keep = (t[f"instance_scores/{key}/tokens"] > 0) & (t[f"instance_scores/{key}/label"] >= 0)
        sc = t[f"instance_scores/{key}/score"][keep]
        yl = t[f"instance_scores/{key}/label"][keep]
        present = torch.bincount(yl, minlength=len(functions))
        if (present == 0).any() or (present == keep.sum()).any():
            raise BricksError(f"every function needs instances: counts per label {dict(zip(functions, present.tolist()))}")
        fs[la] = func_scores(sc, yl, len(functions)).float()
        pr[la] = predictivity(sc, yl, len(functions)).float()
        if f"instance_scores/{key}/score_rule" in t:
            fsr[la] = func_scores(t[f"instance_scores/{key}/score_rule"][keep], yl, len(functions)).float()
        counts = t[f"coactivation/{key}/counts"]
        assign[la], info = partition_coactivation(counts, k, seed=seed)
        part_info[la] = info
        kk = info["k"]
        base_assign[la] = partition_weights(s, kk, seed=seed)
        aff = coactivation_affinity(counts)
        top = top_neurons(fs[la], top_frac)
        for method, a in (("coactivation", assign[la]), ("weights", base_assign[la])):
            quality.append({"layer": la, "method": method, "k": kk, "modularity": modularity(aff, a),
                            "within_coactivation": _within(counts, a)})
            c = concentration(top, a, kk, functions)
            c.insert(0, "method", method)
            c.insert(0, "layer", la)
            conc.append(c)
        c = conc[-2]
        for b in range(kk):
            cb = c[c["brick"] == b].sort_values("p_value")
            serves = cb[cb["p_value"] <= alpha]["function"].tolist()
            idx = torch.nonzero(assign[la] == b).flatten()
            row = {"layer": la, "brick": b, "size": int(idx.numel()),
                   "name": f"L{la}.B{b}:" + ("+".join(serves) if serves else "unspecialised")}
            for fi, f in enumerate(functions):
                row[f"funcscore_{f}"] = float(fs[la][fi, idx].mean())
            row["best_p"] = float(cb["p_value"].min())
            brick_rows.append(row)
    bricks = pd.DataFrame(brick_rows)
    ident = model_identity(model)
    names = {la: bricks[bricks["layer"] == la]["name"].tolist() for la in layers}
    partition = Partition(assign, "coactivation", ident, names,
                          {"rule": str(rule), "k": {str(la): part_info[la]["k"] for la in layers},
                           "criterion": {str(la): part_info[la]["criterion"] for la in layers}})
    baseline = Partition(base_assign, "weights", ident, {}, {"k": {str(la): part_info[la]["k"] for la in layers}})
    timings["scores_partitions"] = _clock() - t0
    t0 = _clock()
    eval_data = data if eval_data is None else eval_data
    eval_sets = EvalSet.build(eval_data, eval_labels if eval_data is not data else labels, tokenizer=tok,
                              batch_size=eval_batch_size, max_length=eval_max_length)
    base = _losses(model, eval_sets)
    abl = ablation_matrix(model, partition, eval_sets, seeds=seeds, base=base)
    babl = ablation_matrix(model, baseline, eval_sets, seeds=0, base=base) if baseline_ablation else None
    topab = top_ablation(model, fs, functions, eval_sets, frac=ablate_frac, seeds=seeds, base=base)
    summary = ablation_summary(abl, bricks)
    selective = ablation_summary(abl, bricks, by="selectivity")
    timings["ablation"] = _clock() - t0
    conc_df = pd.concat(conc, ignore_index=True)
    qual_df = pd.DataFrame(quality)
    tensors = {}
    for la in layers:
        tensors[f"funcscore/{la}"] = fs[la]
        tensors[f"predictivity/{la}"] = pr[la]
        tensors[f"assignment/{la}"] = assign[la]
        tensors[f"baseline/{la}"] = base_assign[la]
        if la in fsr:
            tensors[f"funcscore_rule/{la}"] = fsr[la]
    info = {"functions": functions, "rule": str(rule), "layers": layers, "alpha": alpha, "top_frac": top_frac,
            "ablate_frac": ablate_frac, "seeds": seeds, "k": {str(la): part_info[la]["k"] for la in layers},
            "k_scan": {str(la): {str(c): q for c, q in part_info[la].get("scan", {}).items()} for la in layers},
            "model": ident, "timings": timings}
    store(run, "bricks/bricks", bricks, tensors=tensors, info=info)
    store(run, "bricks/concentration", conc_df)
    store(run, "bricks/quality", qual_df)
    store(run, "bricks/ablation", abl)
    if babl is not None:
        store(run, "bricks/baseline_ablation", babl)
    store(run, "bricks/top_ablation", topab)
    store(run, "bricks/summary", summary)
    store(run, "bricks/summary_selective", selective)
    return BrickAnalysis(run, functions, partition, baseline, fs, pr, fsr, bricks, conc_df, qual_df, abl, babl,
                         topab, summary, selective, str(rule), timings)
