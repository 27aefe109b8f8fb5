"""CETT and its inner search against brute-force float64 loops."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import CaptureError
from workbench.metrics import LayerCETT, cett, cett_search


def brute_cett(a, w, t, bias=None, valid=None):
    """Mean over valid tokens of ||sum_{i: ||n_i|| <= t} n_i|| / ||W a + b||, by explicit loops."""
    a = a.double().numpy().reshape(-1, a.shape[-1])
    w = w.double().numpy()
    b = bias.double().numpy() if bias is not None else np.zeros(w.shape[0])
    v = np.ones(a.shape[0], bool) if valid is None else valid.reshape(-1).numpy().astype(bool)
    ratios = []
    for tok in range(a.shape[0]):
        if not v[tok]:
            continue
        resid = np.zeros(w.shape[0])
        full = b.copy()
        for i in range(a.shape[1]):
            n_i = a[tok, i] * w[:, i]
            full += n_i
            if np.linalg.norm(n_i) <= t:
                resid += n_i
        if np.linalg.norm(full) > 0:
            ratios.append(np.linalg.norm(resid) / np.linalg.norm(full))
    return float(np.mean(ratios))


def _data(seed, n, d_ff, d_model, relu=True, bias=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    if relu:
        a = a.clamp_min(0)
        a[:, 0] += 0.1  # a nonzero FFN output on every token (all-zero outputs raise, tested below)
    w = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64)
    b = torch.randn(d_model, generator=g, dtype=torch.float64) if bias else None
    return a, w, b


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), d_ff=st.integers(1, 13), d_model=st.integers(1, 7),
       q=st.floats(0, 1), relu=st.booleans(), bias=st.booleans(), pad=st.booleans())
def test_cett_equals_brute_force(seed, n, d_ff, d_model, q, relu, bias, pad):
    a, w, b = _data(seed, n, d_ff, d_model, relu, bias)
    # t halfway between two neuron-output norms (or beyond the largest): no rounding ties
    norms = np.unique(np.r_[0.0, (a.abs() * w.norm(dim=0)).reshape(-1).numpy()])
    k = min(int(q * len(norms)), len(norms) - 1)
    t = float(norms[k] + norms[k + 1]) / 2 if k + 1 < len(norms) else float(norms[k]) * 1.01 + 1e-9
    valid = None
    if pad and n > 1:
        valid = torch.ones(n, dtype=torch.bool)
        valid[0] = False  # a padding row with garbage must not count
        a[0] = 1e6
    assert cett(a, w, t, bias=b, valid=valid) == pytest.approx(brute_cett(a, w, t, b, valid), rel=1e-12, abs=1e-12)


def test_cett_padding_left_and_right_equal_unpadded():
    a, w, b = _data(1, 12, 10, 6, bias=True)
    ref = cett(a, w, 0.5, bias=b)
    # left and right padding around the same tokens, as [batch, tokens, d_ff] + mask
    left = torch.cat([torch.full((3, 10), 7.0, dtype=torch.float64), a])[None]
    right = torch.cat([a, torch.full((2, 10), -3.0, dtype=torch.float64)])[None]
    lm = torch.tensor([[0] * 3 + [1] * 12])
    rm = torch.tensor([[1] * 12 + [0] * 2])
    assert cett(left, w, 0.5, bias=b, valid=lm) == pytest.approx(ref, rel=1e-14)
    assert cett(right, w, 0.5, bias=b, valid=rm) == pytest.approx(ref, rel=1e-14)


def test_cett_limits():
    a, w, _ = _data(2, 8, 16, 5)
    assert cett(a, w, 0.0) == 0.0  # only zero outputs are summed
    assert cett(a, w, float("inf")) == pytest.approx(1.0, rel=1e-12)  # everything, no bias


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), d_ff=st.integers(2, 12), target=st.floats(0, 1),
       n_cand=st.sampled_from([2, 7, 64]))
def test_inner_search_equals_exhaustive_scan(seed, n, d_ff, target, n_cand):
    # nonnegative a and W: every n_i lies in the positive orthant, so CETT(t) is monotone in t and
    # "the largest candidate with CETT <= target" is what an exhaustive scan finds.
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, d_ff, generator=g, dtype=torch.float64) * (torch.rand(n, d_ff, generator=g) > 0.3)
    a[:, 0] += 0.1  # every token has a nonzero FFN output (else CETT is undefined: a CaptureError)
    w = torch.rand(4, d_ff, generator=g, dtype=torch.float64)
    lc = LayerCETT(a, w, n_candidates=n_cand, quantile=0.99)
    norms = (a * w.norm(dim=0)).reshape(-1).numpy()
    lo, hi = norms.min(), np.sort(norms)[max(1, int(round(0.99 * norms.size))) - 1]
    cands = np.linspace(lo, max(hi, lo), n_cand)
    assert np.allclose(lc.candidates.numpy(), cands)
    # candidates are data values, where float rounding decides ties: scan with the CETT that
    # test_cett_equals_brute_force checks against the float64 loops away from ties
    ok = [float(c) for c in lc.candidates if lc.cett(float(c)) <= target]
    want = max(ok) if ok else 0.0
    t, c = cett_search(a, w, target, n_candidates=n_cand)
    assert t == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert c == pytest.approx(lc.cett(t), rel=1e-12, abs=1e-12)
    assert c <= target + 1e-12


def test_cett_empty_and_nan_errors():
    a, w, _ = _data(3, 4, 6, 3)
    with pytest.raises(CaptureError, match="zero on every token"):
        LayerCETT(torch.zeros(3, 6, dtype=torch.float64), w)
    with pytest.raises(CaptureError, match="valid token"):
        cett(a, w, 0.1, valid=torch.zeros(4, dtype=torch.bool))
    a[1, 2] = float("nan")
    with pytest.raises(CaptureError, match="layer 5 .*NaN"):
        LayerCETT(a, w, name="model.layers.5.mlp", layer=5)


@pytest.mark.parametrize("target", [2.0, -0.1, float("nan"), float("inf"), "0.2", None])
def test_cett_target_outside_0_1_is_named(target):
    from workbench.errors import WorkbenchError
    from workbench.metrics import CETTCalibration, cett_curve, cett_thresholds

    a, w, _ = _data(0, 4, 6, 3)
    with pytest.raises(WorkbenchError, match=r"target=.*a number in \[0, 1\]"):
        cett_search(a, w, target)
    cal = CETTCalibration([LayerCETT(a, w, name="m.0", layer=0)])
    for f in (cal.table, cal.rule):
        with pytest.raises(WorkbenchError, match=r"target=.*\[0, 1\]"):
            f(target)
    with pytest.raises(WorkbenchError, match=r"targets=.*\[0, 1\]"):
        cett_curve(None, None, [0.1, target], calibration=cal)
    with pytest.raises(WorkbenchError, match=r"target=.*\[0, 1\]"):
        cett_thresholds(object(), None, target=target)  # refused before any model work


def test_cett_curve_needs_a_target():
    from workbench.errors import WorkbenchError
    from workbench.metrics import CETTCalibration, cett_curve

    a, w, _ = _data(0, 4, 6, 3)
    cal = CETTCalibration([LayerCETT(a, w, name="m.0", layer=0)])
    with pytest.raises(WorkbenchError, match=r"targets=\[\]"):
        cett_curve(None, None, [], calibration=cal)
    assert len(cett_curve(None, None, 0.2, calibration=cal)) == 1  # a single target is one target
