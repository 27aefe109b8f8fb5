"""Token-level sparsity under the pinned rules, and PPL-p% sparsity (Sparsing Law arXiv 2411.02335).

`sparsity_table(model, data, rules)`: one row per (rule, layer) with token_sparsity and
activation_ratio, measured through `wb.capture` (the same hooks and `Rule.active` as `profile`).

`ppl_sparsity(model, data, p=1)`: the outer binary search on the CETT target shared by all layers
(in [0, 1]) until the perplexity ratio exp(L_sparse - L_dense), both measured on the same tokens,
is within 1 + p/100 +- 0.1 p/100. L_sparse is measured with the magnitude rule and the per-layer
thresholds of the inner search (cett.py) applied during the forward pass (interventions.py). The
activation ratio is then measured on the evaluation tokens with those thresholds applied, and
compared with the `zero` rule's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from workbench.capture import capture
from workbench.capture.rules import Rule
from workbench.capture.run import Run
from workbench.errors import WorkbenchError
from workbench.metrics._data import Batches, model_device, token_batches
from workbench.metrics.cett import CETTCalibration
from workbench.metrics.interventions import intervene
from workbench.metrics.ppl import nll
from workbench.metrics.store import store


def _measure(model: nn.Module, batches: Batches, rule: Rule, *, apply: bool = False) -> Run:
    """A Run (neuron_stats) of `model` over `batches` under `rule`; with apply=True the rule is
    also applied during the forward (so later layers see the sparsified earlier ones)."""
    device = model_device(model)
    with torch.no_grad():
        if apply:
            with intervene(model, rule), capture(model, probes=["neuron_stats"], rule=rule) as run:
                for ids, m in batches:
                    model(input_ids=ids.to(device), attention_mask=m.to(device))
        else:
            with capture(model, probes=["neuron_stats"], rule=rule) as run:
                for ids, m in batches:
                    model(input_ids=ids.to(device), attention_mask=m.to(device))
    return run


def overall_activation_ratio(summary: pd.DataFrame) -> float:
    """Active pairs / all pairs over every layer of a Run summary (weights layers by d_ff)."""
    pairs = (summary["tokens"] * summary["d_ff"]).sum()
    return float((summary["activation_ratio"] * summary["tokens"] * summary["d_ff"]).sum() / pairs)


def sparsity_table(model: nn.Module, data, rules=("zero", "fat(0.01)"), *, tokenizer=None,
                   batch_size: int = 8, max_length: int | None = 256) -> pd.DataFrame:
    """Tidy table, one row per (rule, layer): rule, layer, name, activation, tokens,
    token_sparsity, activation_ratio. Rules only observe here (nothing is zeroed)."""
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    rules = [Rule.parse(r) for r in rules]
    if not rules:
        raise WorkbenchError("rules=[]: give at least one rule, e.g. rules=['zero', 'fat(0.01)']")
    batches = token_batches(data, tokenizer=tokenizer if tokenizer is not None else getattr(model, "tokenizer", None),
                            batch_size=batch_size, max_length=max_length)
    frames = []
    for rule in rules:
        s = _measure(model, batches, rule).summary()
        s.insert(0, "rule", str(rule))
        frames.append(s[["rule", "layer", "name", "activation", "d_ff", "tokens", "token_sparsity",
                         "activation_ratio"]])
    return pd.concat(frames, ignore_index=True)


@dataclass
class PPLSparsity:
    """Result of `ppl_sparsity`.

    per_layer: layer, name, threshold, cett (on the calibration tokens), activation_ratio and
    token_sparsity with the thresholds applied, zero_activation_ratio (the `zero` rule, dense).
    curve: one row per outer step: step, target, ppl, ppl_ratio, activation_ratio (calibration
    tokens), bracket_gap (activation ratio between the bracket's ends after the step), within
    (bracket_gap <= tolerance).
    tolerance: the stopping tolerance in activation-ratio units; bracket_gap: the gap reached,
    a bound on |activation ratio - the value bisection to convergence gives|; ppl_tolerance: the
    accepted |ppl_ratio - (1 + p/100)| where bisection reaches it (see ppl_sparsity).
    """

    p: float
    target: float
    thresholds: dict[int, float]
    dense_ppl: float
    sparse_ppl: float
    ppl_ratio: float
    activation_ratio: float
    zero_activation_ratio: float
    converged: bool
    eval_tokens: int
    calib_tokens: int
    per_layer: pd.DataFrame = field(repr=False)
    curve: pd.DataFrame = field(repr=False)
    tolerance: float = 1e-3
    bracket_gap: float = float("nan")
    ppl_tolerance: float = 1e-3

    @property
    def sparsity(self) -> float:
        """PPL-p% sparsity: 1 - activation ratio with the thresholds applied."""
        return 1.0 - self.activation_ratio

    @property
    def reduction_vs_zero(self) -> float:
        """Relative cut of the activation ratio against the `zero` rule (paper, ReLU: about 0.61)."""
        return 1.0 - self.activation_ratio / self.zero_activation_ratio if self.zero_activation_ratio else float("nan")

    @property
    def rule(self) -> Rule:
        return Rule.magnitude(self.thresholds)

    def summary(self) -> dict:
        return {"p": self.p, "target": self.target, "dense_ppl": self.dense_ppl, "sparse_ppl": self.sparse_ppl,
                "ppl_ratio": self.ppl_ratio, "activation_ratio": self.activation_ratio,
                "sparsity": self.sparsity, "zero_activation_ratio": self.zero_activation_ratio,
                "reduction_vs_zero": self.reduction_vs_zero, "converged": self.converged,
                "tolerance": self.tolerance, "bracket_gap": self.bracket_gap, "ppl_tolerance": self.ppl_tolerance,
                "eval_tokens": self.eval_tokens, "calib_tokens": self.calib_tokens}

    def store(self, run: Run, name: str | None = None) -> None:
        """Store per_layer, curve and the summary in `run` under `ppl<p>_sparsity/...`."""
        name = name or f"ppl{self.p:g}_sparsity"
        store(run, f"{name}/per_layer", self.per_layer, info=self.summary())
        store(run, f"{name}/curve", self.curve)


def ppl_sparsity(model: nn.Module, data, p: float = 1.0, *, calib_data=None, tokenizer=None,
                 batch_size: int = 8, max_length: int | None = 256, max_calib_tokens: int | None = 4096,
                 n_candidates: int = 65536, quantile: float = 0.99, max_steps: int = 40,
                 tolerance: float = 1e-3, ppl_tolerance: float | None = None,
                 calibration: CETTCalibration | None = None) -> PPLSparsity:
    """PPL-p% sparsity of `model` on `data` (the evaluation tokens).

    calib_data: tokens for the CETT thresholds (default: the evaluation data itself).
    Outer search: bisection on the shared CETT target in [0, 1], keeping a bracket [lo, hi] with
    ppl ratio(lo) <= 1 + p/100 < ppl ratio(hi). The activation ratio falls as the target grows
    (every layer's threshold grows), so the value bisection to convergence gives lies between
    the activation ratios at lo and hi. The search stops once those two (on the calibration
    tokens) are within `tolerance` (default 1e-3, activation-ratio units) and the evaluated end
    closer to the goal has |ppl ratio - (1 + p/100)| <= ppl_tolerance (default 0.1 p/100; the
    earlier rule stopped on this alone, 6.9e-3 of activation ratio away from convergence on
    zoo:silu-llama in notebook 02), and returns that end. The result states `tolerance`,
    `ppl_tolerance` and the `bracket_gap` reached; converged means bracket_gap <= tolerance.
    max_steps bounds the search, which also ends when the thresholds stop moving; then the
    evaluated end closest to the goal is returned (converged says whether the bracket closed).
    p must be a finite number > 0 (percent), max_steps a whole number >= 1, tolerance and
    ppl_tolerance numbers >= 0; WorkbenchError names the argument otherwise.
    """
    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not real(p) or p <= 0:
        raise WorkbenchError(f"p={p!r}: the allowed perplexity increase in percent must be a finite number > 0 "
                             "(p=1 accepts PPL up to 1.01 x the dense PPL)")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise WorkbenchError(f"max_steps={max_steps!r}: give a whole number of bisection steps >= 1 (default 40)")
    def nonneg(v):  # inf is allowed: "no condition"
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0

    if not nonneg(tolerance):
        raise WorkbenchError(f"tolerance={tolerance!r}: give an activation-ratio gap >= 0 (default 1e-3)")
    if ppl_tolerance is not None and not nonneg(ppl_tolerance):
        raise WorkbenchError(f"ppl_tolerance={ppl_tolerance!r}: give a number >= 0 (inf: no ppl condition), or "
                             "None for 0.1 p/100")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    batches = token_batches(data, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    cal = calibration or CETTCalibration.from_model(
        model, calib_data if calib_data is not None else batches, tokenizer=tok, batch_size=batch_size,
        max_length=max_length, max_tokens=max_calib_tokens, n_candidates=n_candidates, quantile=quantile)
    goal = 1.0 + p / 100.0
    tol = float(tolerance)
    ppl_tol = 0.1 * p / 100.0 if ppl_tolerance is None else float(ppl_tolerance)
    dense = nll(model, batches)

    def calib_ar(thr):
        return sum(lc.activation_ratio(thr[lc.layer]) * lc.a.shape[1] for lc in cal.layers) / sum(
            lc.a.shape[1] for lc in cal.layers)

    steps, evaluated = [], []
    lo, hi = 0.0, 1.0
    ar_lo, ar_hi = calib_ar(cal.thresholds(lo)), calib_ar(cal.thresholds(hi))

    def closest():  # the evaluated ends of the bracket hold the closest ratios on either side of the goal
        ends = [e for e in evaluated if e[0] in (lo, hi)] or evaluated
        return min(ends, key=lambda e: abs(e[2] - goal))

    for step in range(max_steps):
        target = (lo + hi) / 2
        thr = cal.thresholds(target)
        with intervene(model, Rule.magnitude(thr)):
            sparse = nll(model, batches)
        ratio = math.exp(sparse.mean - dense.mean)
        calib = calib_ar(thr)
        evaluated.append((target, thr, ratio, sparse.ppl))
        if ratio > goal:
            hi, ar_hi = target, calib
        else:
            lo, ar_lo = target, calib
        gap = abs(ar_lo - ar_hi)
        steps.append({"_thr": thr, "step": step, "target": target, "ppl": sparse.ppl, "ppl_ratio": ratio,
                      "activation_ratio": calib, "bracket_gap": gap, "within": gap <= tol})
        if gap <= tol and abs(closest()[2] - goal) <= ppl_tol:
            break
        if len(steps) >= 4 and all(st["_thr"] == thr for st in steps[-4:-1]):
            break  # the thresholds stopped moving (capped at the candidates' range): no closer
    gap = abs(ar_lo - ar_hi)
    best = closest()
    target, thr, ratio, sparse_ppl = best
    rule = Rule.magnitude(thr)
    zero = _measure(model, batches, Rule()).summary()
    run = _measure(model, batches, rule, apply=True).summary()
    per_layer = pd.DataFrame({
        "layer": run["layer"], "name": run["name"], "activation": run["activation"],
        "threshold": [thr[int(L)] for L in run["layer"]],
        "cett": [lc.search(target)[1] for lc in cal.layers],
        "activation_ratio": run["activation_ratio"], "token_sparsity": run["token_sparsity"],
        "zero_activation_ratio": zero["activation_ratio"].values,
    })
    return PPLSparsity(
        p=p, target=target, thresholds=thr, dense_ppl=dense.ppl, sparse_ppl=sparse_ppl, ppl_ratio=ratio,
        activation_ratio=overall_activation_ratio(run), zero_activation_ratio=overall_activation_ratio(zero),
        converged=gap <= tol, eval_tokens=dense.tokens, calib_tokens=int(cal.layers[0].a.shape[0]),
        per_layer=per_layer, curve=pd.DataFrame(steps).drop(columns="_thr"), tolerance=tol, bracket_gap=gap,
        ppl_tolerance=ppl_tol)
