"""PPL-p% sparsity: the default stopping tolerance bounds the distance to bisection to convergence."""

import pytest

from tests.metrics.helpers import padded_batch, tiny_llama
from workbench.metrics import CETTCalibration, ppl_sparsity


def _calib_ar(cal, target):
    thr = cal.thresholds(target)
    return sum(lc.activation_ratio(thr[lc.layer]) * lc.a.shape[1] for lc in cal.layers) / sum(
        lc.a.shape[1] for lc in cal.layers)


@pytest.mark.parametrize("act", ["silu"])
def test_default_tolerance_is_within_1e3_of_converged(act):
    model = tiny_llama(act, seed=4)
    data = [padded_batch(seed=3, b=4, s=20)]
    cal = CETTCalibration.from_model(model, data, n_candidates=2048)
    res = ppl_sparsity(model, data, p=1, calibration=cal)
    conv = ppl_sparsity(model, data, p=1, calibration=cal, tolerance=0.0, max_steps=60)
    assert res.tolerance == 1e-3 and res.summary()["tolerance"] == 1e-3
    assert res.converged and res.bracket_gap <= 1e-3
    assert abs(_calib_ar(cal, res.target) - _calib_ar(cal, conv.target)) <= 1e-3
    assert len(res.curve) <= len(conv.curve) and (res.curve.bracket_gap.iloc[-1] == res.bracket_gap)
    assert res.ppl_tolerance == pytest.approx(1e-3)  # 0.1 p/100, also required where bisection reaches it
    # without the ppl condition the search stops as soon as the bracket closes
    loose = ppl_sparsity(model, data, p=1, calibration=cal, ppl_tolerance=float("inf"))
    assert loose.bracket_gap <= 1e-3 and len(loose.curve) <= len(res.curve)


@pytest.mark.parametrize("kw, match", [
    ({"max_steps": 0}, r"max_steps=0: .*>= 1"),
    ({"p": -1}, r"p=-1: .*> 0"),
    ({"p": 0}, r"p=0: .*> 0"),
    ({"p": float("nan")}, r"p=nan"),
    ({"tolerance": -1.0}, r"tolerance=-1.0"),
    ({"ppl_tolerance": float("nan")}, r"ppl_tolerance=nan"),
])
def test_bad_arguments_are_named(kw, match):
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match=match):
        ppl_sparsity(tiny_llama("silu"), [padded_batch(seed=3, b=3, s=8)], **kw)
