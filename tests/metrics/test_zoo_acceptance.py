"""Acceptance figures on the zoo (issue 5), with margins. Skipped only where data/zoo/NAME is absent.

The same data and settings as `python -m workbench.metrics.zoo_report` (workbench.metrics.zoo_report).
"""

import functools

import pytest
import torch

from workbench.models.zoo import ZOO_DIR


def need(*names):
    missing = [n for n in names if not (ZOO_DIR / n / "config.json").is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"zoo model(s) {missing} not built under {ZOO_DIR} "
                                                    "(build them with `workbench zoo train NAME`)")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: several times faster than two on a shared 2-core CPU; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _ppl(name):
    from workbench.metrics.zoo_report import ppl_result

    return ppl_result(name)


@pytest.mark.slow
@need("relu-llama", "silu-llama")
def test_ppl1_sparsity_relu_vs_silu():
    relu, silu = _ppl("relu-llama"), _ppl("silu-llama")
    for r in (relu, silu):
        assert r.converged, r.curve
        assert r.bracket_gap <= r.tolerance == 1e-3  # activation ratio within 1e-3 of bisection to convergence
        assert abs(r.ppl_ratio - 1.01) <= 0.001
    assert relu.sparsity - silu.sparsity >= 0.20, (relu.summary(), silu.summary())
    # reported, not asserted (the paper's ~61 % comes from 1B+ models trained much longer)
    print(f"relu-llama PPL-1% activation ratio {relu.activation_ratio:.4f} vs zero rule "
          f"{relu.zero_activation_ratio:.4f}: reduction {relu.reduction_vs_zero:.3f}")


@pytest.mark.slow
@need("blockffn", "blockffn-null")
def test_cls8_blockffn_vs_null():
    from workbench.metrics.zoo_report import cls_result

    a = cls_result("blockffn", "experts")
    b = cls_result("blockffn-null", "experts")
    cls8 = lambda df: float(df[(df.layer == -1) & (df.L == 8)].cls.iloc[0])  # noqa: E731
    assert cls8(a) - cls8(b) >= 0.25, (cls8(a), cls8(b))


@pytest.mark.slow
@need("relu-llama")
def test_predictor_recall_and_sparsity_on_held_out_tokens():
    """The committed zoo predictors (trained at train_predictors' defaults by the command in the
    model card) on the held-out validation documents: the issue 27 acceptance."""
    from workbench.metrics.predictor import predictor_report
    from workbench.metrics.zoo_report import SETTINGS, load, zoo_batches

    model = load("relu-llama")
    rep = predictor_report(model, ZOO_DIR / "relu-llama" / "predictor",
                           zoo_batches(model, n_docs=SETTINGS["predictor_eval_docs"]))
    m, s = rep.layers, rep.summary
    assert m.recall.mean() >= 0.9, rep
    assert ((m.predicted_sparsity - m.true_sparsity).abs() <= 0.10).all(), rep
    assert s["ppl_exact"] == pytest.approx(s["ppl_dense"], rel=1e-3), rep
    assert s["ppl_predictor_increase"] < 0.05, rep
