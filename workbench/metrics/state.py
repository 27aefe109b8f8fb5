"""Recurrent-state usage of Mamba / Mamba-2 models far past their training length (Stuffed Mamba).

:func:`state_scan` runs a transformers Mamba / Mamba-2 causal LM over long sequences chunk by
chunk with its own cache (conv and SSM state) carried over, under ``wb.capture`` with a
:class:`workbench.capture.state.StateProbe` (no other hooks), and returns the Run. Tables from
the Run (tidy pandas):

- :func:`head_stats`: per layer, head and position (bucket end): mean, var, rms, median of the
  state h, cos (with the previous bucket's state), usage (fraction of state channels with
  non-negligible norm), erank (effective rank of the head's P x N state), and the bucket means
  of dt, decay exp(dt A), x and B;
- :func:`layer_stats`: per layer and position: rms over all heads, cos of the whole layer's
  state, plus the next-token loss per bucket (``layer`` -1 rows hold nothing but the loss);
- :func:`histograms`: value histograms of h at the probe's ``hist_positions``;
- :func:`collapse`: the layers / heads whose statistics leave their range within the training
  length, with the rule and where it happened.

:func:`state_drift` (the zoo card's figures) is built on the same probe.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from workbench._compat import cache_kwargs, output_cache
from workbench.errors import WorkbenchError

DEFAULT_POINTS = (128, 256, 512, 1024, 2048, 4096)
DEFAULT_BUCKETS = (0, 128, 256, 512, 1024, 2048, 4096)
#: statistics the collapse detector watches (head_stats columns)
COLLAPSE_STATS = ("rms", "var", "median", "usage", "erank", "cos")


class StateError(WorkbenchError):
    """A state analysis was asked for something it cannot do (bad sizes, too short input)."""


def _as_ids(ids) -> torch.Tensor:
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise StateError(f"ids must be token ids [n_seq, tokens] (a LongTensor); got {type(ids).__name__}: "
                         "tokenize texts first, e.g. model.tokenizer(text, return_tensors='pt').input_ids") from exc
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise StateError(f"ids must be [n_seq, tokens], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise StateError(f"ids must be integer token ids (int64 / int32); got {ids.dtype}")
    return ids


@torch.no_grad()
def state_scan(model, ids, *, bucket: int = 128, chunk: int | None = None, hist_positions=(),
               usage_tol: float = 1e-2, median_sample: int = 1024, batch_size: int | None = None,
               data: dict | None = None, host_linalg: bool | None = None):
    """Run `model` (Mamba / Mamba-2 causal LM) over `ids` [n_seq, tokens] chunk by chunk
    (`chunk` tokens per forward, a multiple of `bucket`; default `bucket`) with its cache carried
    over, under a capture with a StateProbe; returns the Run (see the module doc).

    Sequences go through `batch_size` at a time (default all); each batch starts a new state.
    host_linalg: effective ranks on a host thread pool, overlapped with the forward (default: on
    CUDA, where torch decomposes matrices over 32 x 32 one at a time; see StateProbe).
    Mamba (v1): one forward per sequence (transformers' Mamba scan drops the cached state on
    multi-token calls), the probe's per-bucket statistics unchanged."""
    from transformers import DynamicCache

    import workbench as wb
    from workbench.capture.state import StateProbe

    ids = _as_ids(ids)
    from workbench.data import check_token_ids

    check_token_ids(model, ids, StateError)
    total = ids.shape[1]
    if getattr(model.config, "model_type", "") == "mamba":
        # transformers' Mamba (v1) scan ignores the cached state on multi-token calls (its own
        # source says so), so a chunked run would restart the state at every chunk: one forward
        # per sequence, bucket-end states from the exact recurrence inside the call
        if chunk is not None and chunk < total:
            raise StateError(
                f"chunk={chunk} < {total} tokens: transformers' Mamba (v1) does not carry the SSM "
                "state across multi-token calls, so a chunked run would be wrong; leave chunk=None "
                "(one forward per sequence; the probe still keeps per-bucket statistics only)")
        chunk = -(-total // bucket) * bucket
    chunk = int(chunk or bucket)
    if bucket < 1 or chunk < 1:
        raise StateError(f"bucket and chunk must be positive, got bucket={bucket}, chunk={chunk}")
    if chunk % bucket:
        raise StateError(
            f"the bucket size ({bucket} tokens) does not divide the chunk length ({chunk}): each "
            f"forward must cover whole buckets; use a chunk that is a multiple of {bucket} "
            f"(e.g. {bucket * max(1, chunk // bucket)}) or a bucket that divides {chunk}")
    if total < bucket:
        raise StateError(f"the input has {total} tokens, shorter than one bucket ({bucket}); use "
                         "longer sequences or a smaller bucket")
    probe = StateProbe(bucket=bucket, hist_positions=[p for p in hist_positions if p <= total],
                       usage_tol=usage_tol, median_sample=median_sample, host_linalg=host_linalg)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    bs = batch_size or ids.shape[0]
    meta = {"n_seq": int(ids.shape[0]), "total": int(total), "chunk": chunk, **(data or {})}
    try:
        with wb.capture(model, probes=[probe], data=meta) as run:
            for s in range(0, ids.shape[0], bs):
                x = ids[s: s + bs].to(device)
                probe.new_sequence()
                cache = DynamicCache(config=model.config)
                for start in range(0, total, chunk):
                    out = model(input_ids=x[:, start: start + chunk], use_cache=True,
                                **cache_kwargs(model, cache, old="cache_params"))
                    cache = output_cache(out, old="cache_params")
    finally:
        model.train(was)
    return run


# ----------------------------------------------------------------------------- tables


def _info(run) -> dict:
    info = run.meta.get("state")
    if not info:
        raise StateError("this run has no state statistics: make it with state_scan (a StateProbe)")
    return info


def head_stats(run) -> pd.DataFrame:
    """Per layer, head and bucket: position (the bucket's end), mean, var, rms, median, cos,
    usage, erank, dt, decay, x, B (float64; NaN where a bucket saw no state)."""
    info = _info(run)
    bk = info["bucket"]
    frames = []
    for m in info["mixers"]:
        g = {f: run.get("state", m["name"], f).double().numpy()
             for f in ("s1", "s2", "med", "cos", "usage", "erank", "dt", "decay", "x", "B",
                       "snaps", "elems", "cos_n", "tokens")}
        H, nb = g["s1"].shape
        with np.errstate(invalid="ignore", divide="ignore"):
            el, sn, tk = g["elems"][None], g["snaps"][None], g["tokens"][None]
            mean = g["s1"] / el
            ms = g["s2"] / el
            cols = {
                "mean": mean, "var": ms - mean**2, "rms": np.sqrt(ms), "median": g["med"] / sn,
                "cos": g["cos"] / g["cos_n"][None], "usage": g["usage"] / sn, "erank": g["erank"] / sn,
                "dt": g["dt"] / tk, "decay": g["decay"] / tk, "x": g["x"] / tk, "B": g["B"] / tk,
            }
        heads, buckets = np.meshgrid(np.arange(H), np.arange(nb), indexing="ij")
        df = pd.DataFrame({"layer": m["layer"], "head": heads.ravel(), "bucket": buckets.ravel(),
                           "position": (buckets.ravel() + 1) * bk,
                           **{k: v.ravel() for k, v in cols.items()}})
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def layer_stats(run) -> pd.DataFrame:
    """Per layer and bucket: position, rms (over all heads), cos (whole layer state), loss (the
    mean next-token NLL of the predictions made in the bucket; the same in every layer)."""
    info = _info(run)
    bk = info["bucket"]
    loss = run.get("state", "model", "loss").double().numpy()
    loss_n = run.get("state", "model", "loss_n").double().numpy()
    frames = []
    for m in info["mixers"]:
        s2 = run.get("state", m["name"], "s2").double().numpy().sum(0)
        el = run.get("state", m["name"], "elems").double().numpy() * run.get("state", m["name"], "s2").shape[0]
        cl = run.get("state", m["name"], "cos_layer").double().numpy()
        cn = run.get("state", m["name"], "cos_n").double().numpy()
        nb = s2.shape[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            frames.append(pd.DataFrame({
                "layer": m["layer"], "bucket": np.arange(nb), "position": (np.arange(nb) + 1) * bk,
                "rms": np.sqrt(s2 / el), "cos": cl / cn,
                "loss": (loss[:nb] / loss_n[:nb]) if len(loss) >= nb else np.nan}))
    return pd.concat(frames, ignore_index=True)


def histograms(run) -> pd.DataFrame:
    """Value histograms of the state h (all heads) per layer at the run's hist_positions:
    columns layer, position, lo, hi (bin edges; the outer bins are open), count, density."""
    info = _info(run)
    edges = run.get("state", "model", "edges").double().numpy()
    lo = np.concatenate([[-np.inf], edges])
    hi = np.concatenate([edges, [np.inf]])
    rows = []
    for m in info["mixers"]:
        for k, p in enumerate(info["hist_positions"]):
            key = f"state/{m['name']}/hist{k}"
            if key not in run.tensors:
                continue
            c = run.tensors[key].double().numpy()
            rows.append(pd.DataFrame({"layer": m["layer"], "position": p, "lo": lo, "hi": hi,
                                      "count": c, "density": c / max(c.sum(), 1)}))
    if not rows:
        return pd.DataFrame(columns=["layer", "position", "lo", "hi", "count", "density"])
    return pd.concat(rows, ignore_index=True)


def collapse(run, train_len: int, *, tol: float = 0.5, stats=COLLAPSE_STATS) -> pd.DataFrame:
    """Flag the (layer, head, statistic) whose value past `train_len` leaves the range it had
    within it. Rule: with lo / hi the min / max over the buckets ending at or before `train_len`
    and span = max(hi - lo, tol x max(|lo|, |hi|)), a bucket is out of range when its value is
    above hi + span or below lo - span (tol = 0.5 by default); the flag gives the first such
    position. Returns one row per flag: layer, head, stat, lo, hi, position, value, rule
    (and ``.attrs['rule']``); empty when nothing leaves its range."""
    df = head_stats(run)
    bk = _info(run)["bucket"]
    if train_len < bk:
        raise StateError(f"train_len ({train_len}) is shorter than one bucket ({bk})")
    rule = (f"out of [lo - span, hi + span], lo/hi = min/max over positions <= {train_len}, "
            f"span = max(hi - lo, {tol} x max(|lo|, |hi|))")
    rows = []
    for (layer, head), g in df.groupby(["layer", "head"], sort=True):
        inside, past = g[g.position <= train_len], g[g.position > train_len]
        for s in stats:
            ref = inside[s].dropna()
            if ref.empty or past.empty:
                continue
            lo, hi = float(ref.min()), float(ref.max())
            span = max(hi - lo, tol * max(abs(lo), abs(hi)))
            v = past[s].to_numpy()
            out = (v > hi + span) | (v < lo - span)
            if out.any():
                i = int(np.argmax(out))
                rows.append({"layer": int(layer), "head": int(head), "stat": s, "lo": lo, "hi": hi,
                             "position": int(past.position.iloc[i]), "value": float(v[i]), "rule": rule})
    res = pd.DataFrame(rows, columns=["layer", "head", "stat", "lo", "hi", "position", "value", "rule"])
    res.attrs["rule"] = rule
    return res


def drift_summary(run, train_len: int, at=None) -> pd.DataFrame:
    """Per layer: rms, cos and loss at `train_len` and at each position in `at` (default 16x and
    64x the training length where the run reaches them), with their ratios to the value at
    `train_len`."""
    bk = _info(run)["bucket"]
    if not isinstance(train_len, int) or train_len < bk or train_len % bk:
        raise StateError(f"train_len ({train_len!r}) must be a bucket end of this run (a multiple of its "
                         f"bucket, {bk} tokens): the statistics are kept per bucket")
    bad = [p for p in (at or ()) if not isinstance(p, int) or p < bk or p % bk]
    if bad:
        raise StateError(f"positions {bad} are not bucket ends of this run (multiples of {bk} tokens)")
    df = layer_stats(run)
    total = int(df.position.max())
    at = [p for p in (at or (16 * train_len, 64 * train_len)) if p <= total]
    rows = []
    for layer, g in df.groupby("layer"):
        g = g.set_index("position")
        r = {"layer": int(layer), f"rms@{train_len}": g.rms.get(train_len, math.nan)}
        for p in at:
            r[f"rms@{p}"] = g.rms.get(p, math.nan)
            r[f"rms x@{p}"] = r[f"rms@{p}"] / r[f"rms@{train_len}"]
        rows.append(r)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- zoo card figures


@torch.no_grad()
def state_drift(model, ids: torch.Tensor, *, chunk: int = 128, points=DEFAULT_POINTS,
                buckets=DEFAULT_BUCKETS) -> dict:
    """State statistics and loss by position of `model` on `ids` (n_seq, total), run chunk by
    chunk (`chunk` tokens per forward) with the state carried over (a state_scan with bucket =
    chunk). Returns a JSON-able dict: ``state_rms`` {layer: [rms at each point]},
    ``state_rms_heads`` {layer: [[per head] per point]}, ``state_cos`` {layer: mean cosine of
    consecutive chunk states}, ``decay`` / ``dt`` {layer: mean over tokens}, ``loss`` {"a-b":
    mean NLL over prediction positions a..b-1}, plus the setup."""
    ids = _as_ids(ids)
    n_seq, total = ids.shape
    run = state_scan(model, ids, bucket=chunk, chunk=chunk)
    info = _info(run)
    points = [p for p in points if p <= total and p % chunk == 0]
    out = {"n_seq": n_seq, "total": total, "chunk": chunk, "points": points, "state_rms": {},
           "state_rms_heads": {}, "state_cos": {}, "decay": {}, "dt": {}}
    for m in info["mixers"]:
        name, k = m["name"], str(m["layer"])
        s2 = run.get("state", name, "s2").double()
        el = run.get("state", name, "elems").double()
        cols = [p // chunk - 1 for p in points]
        out["state_rms"][k] = [float((s2[:, c].sum() / (el[c] * s2.shape[0])).sqrt()) for c in cols]
        out["state_rms_heads"][k] = [[float(v) for v in (s2[:, c] / el[c]).sqrt()] for c in cols]
        cn = run.get("state", name, "cos_n").double()
        cl = run.get("state", name, "cos_layer").double()
        # mean over consecutive chunk pairs of the batch-mean cosine (as the card states it)
        have = cn > 0
        out["state_cos"][k] = float((cl[have] / cn[have]).mean()) if have.any() else math.nan
        tk = run.get("state", name, "tokens").double().sum()
        H = s2.shape[0]
        out["decay"][k] = float(run.get("state", name, "decay").double().sum() / (tk * H))
        out["dt"][k] = float(run.get("state", name, "dt").double().sum() / (tk * H))
    loss = run.get("state", "model", "loss").double()
    loss_n = run.get("state", "model", "loss_n").double()
    edges = sorted({min(b, total - 1) for b in buckets})
    res = {}
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        if a % chunk or (b % chunk and b != total - 1):
            raise StateError(f"loss bucket {a}-{b} does not fall on chunk ends ({chunk} tokens)")
        ja, jb = a // chunk, -(-b // chunk)
        res[f"{a}-{b}"] = float(loss[ja:jb].sum() / loss_n[ja:jb].sum())
    out["loss"] = res
    return out


def drift_ratio(res: dict, ref: int = 256) -> dict:
    """Per layer: state RMS at the last point / state RMS at position `ref`."""
    j = res["points"].index(ref)
    return {k: v[-1] / v[j] for k, v in res["state_rms"].items()}
