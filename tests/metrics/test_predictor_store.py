"""Predictors (metrics, file format), PPL-p% search and Run storage."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.metrics.helpers import padded_batch, tiny_llama
from workbench.capture import profile
from workbench.capture.run import Run
from workbench.metrics import (
    CETTCalibration,
    load_predictors,
    nll,
    ppl_sparsity,
    prediction_metrics,
    save_predictors,
    store,
    table,
    tables,
    train_predictors,
)
from workbench.metrics._data import collect, ffn_sites
from workbench.metrics.interventions import intervene


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), d=st.integers(1, 9))
def test_prediction_metrics_brute_force(seed, n, d):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(n, d, generator=g) > 0.5
    true = torch.rand(n, d, generator=g) > 0.4
    tp = fp = fn = 0
    for i in range(n):
        for j in range(d):
            tp += bool(pred[i, j] and true[i, j])
            fp += bool(pred[i, j] and not true[i, j])
            fn += bool(true[i, j] and not pred[i, j])
    m = prediction_metrics(pred, true)
    if tp + fn:
        assert m["recall"] == pytest.approx(tp / (tp + fn), abs=1e-15)
    else:
        assert math.isnan(m["recall"])
    if tp + fp:
        assert m["precision"] == pytest.approx(tp / (tp + fp), abs=1e-15)
    assert m["predicted_sparsity"] == pytest.approx(1 - (tp + fp) / (n * d), abs=1e-15)
    assert m["true_sparsity"] == pytest.approx(1 - (tp + fn) / (n * d), abs=1e-15)


def _seqs(n=24, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, s), generator=g)
    m = torch.ones_like(ids)
    m[::3, :4] = 0  # some left padding
    m[1::3, 12:] = 0  # some right padding
    return ids, m


def test_predictor_train_eval_save_load(tmp_path, relu_llama):
    ids, m = _seqs()
    pred = train_predictors(relu_llama, [(ids[:18], m[:18])], eval_data=[(ids[18:], m[18:])], epochs=3,
                            target_recall=0.9)
    df = pred.metrics
    assert list(df.layer) == [0, 1] and (df.width == 32).all()  # the ProSparse recipe: min(1024, d_model)
    assert pred.input == "residual" and not pred.bias and pred.loss == "weighted_bce"
    assert (df.eval_tokens == int(m[18:].sum())).all()
    # the evaluation table equals brute force over the held-out tokens
    rows = collect(relu_llama, [(ids[18:], m[18:])], want_r=True)  # the residual stream entering the FFN block
    for site in ffn_sites(relu_llama):
        x, a = rows[site.name]["r"], rows[site.name]["a"]
        p = pred.predict(site.name, x)
        r = df[df.layer == site.layer].iloc[0]
        assert r.recall == pytest.approx(prediction_metrics(p, a != 0)["recall"], abs=1e-15)
        assert r.predicted_sparsity == pytest.approx(1 - float(p.double().mean()), abs=1e-15)
    out = save_predictors(pred, tmp_path / "pred")
    cfg = json.loads((out / "predictor.json").read_text())
    assert cfg["format"] == "workbench-predictor" and cfg["decision"] == "logits > 0"
    assert [L["name"] for L in cfg["layers"]] == [s.name for s in ffn_sites(relu_llama)]
    back = load_predictors(out)
    from safetensors.torch import load_file
    from workbench.kernels.predictor.reference import predictor_logits

    w = load_file(str(out / "predictor.safetensors"))
    for site in ffn_sites(relu_llama):
        x = rows[site.name]["r"]
        k = {kk: w[f"{site.name}.{kk}"] for kk in ("w1", "b1", "w2", "b2")}
        assert k["w1"].shape == (32, 32) and k["w2"].shape == (64, 32)
        assert not k["b1"].any()  # no biases: b2 holds only the folded threshold
        kernel_mask = predictor_logits(x, k["w1"], k["w2"], k["b1"], k["b2"]) > 0
        mine = pred.predict(site.name, x)
        assert (kernel_mask != mine).float().mean() < 1e-3  # ties at the threshold only
        assert torch.equal(back.predict(site.name, x), predictor_logits(x, k["w1"], k["w2"], k["b1"], k["b2"]) >= 0)
    # stored in a run, saved, loaded back
    run = profile(relu_llama, ids, attention_mask=m, progress=False)
    pred.store(run)
    run.save(tmp_path / "run")
    again = load_predictors(tmp_path / "run")
    x = rows[ffn_sites(relu_llama)[1].name]["r"]
    name = ffn_sites(relu_llama)[1].name
    assert torch.equal(again.predict(name, x), back.predict(name, x))
    pd.testing.assert_frame_equal(table(Run.load(tmp_path / "run"), "predictor"), pred.metrics, check_dtype=False)


def test_store_roundtrip(tmp_path, relu_llama):
    run = profile(relu_llama, torch.randint(0, 64, (2, 8)), progress=False)
    df = pd.DataFrame({"layer": [0, 1], "name": ["a", "b"], "x": [0.5, float("nan")], "ok": [True, False]})
    store(run, "demo", df, tensors={"curve": torch.arange(4.0)}, info={"p": 1.0})
    run.save(tmp_path / "r")
    back = Run.load(tmp_path / "r")
    assert tables(back) == ["demo"]
    pd.testing.assert_frame_equal(table(back, "demo"), df)
    assert torch.equal(back.tensors["metrics/demo/curve"], torch.arange(4.0))


@pytest.mark.parametrize("act", ["relu", "silu", "gelu_pytorch_tanh", "relu2"])
def test_ppl_sparsity_search_is_consistent(act):
    model = tiny_llama(act, seed=4)
    ids, m = _seqs(n=8, s=24, seed=5)
    # generous tolerance so the tiny random model converges in a few steps
    res = ppl_sparsity(model, [(ids, m)], p=1, n_candidates=2048, tolerance=0.01)
    dense = nll(model, [(ids, m)])
    with intervene(model, res.rule):
        sparse = nll(model, [(ids, m)])
    assert res.ppl_ratio == pytest.approx(math.exp(sparse.mean - dense.mean), rel=1e-12)
    assert res.dense_ppl == pytest.approx(dense.ppl, rel=1e-12)
    # thresholds are those of the inner search at the chosen target
    cal = CETTCalibration.from_model(model, [(ids, m)], n_candidates=2048)
    assert cal.thresholds(res.target) == res.thresholds
    assert set(res.curve.columns) >= {"step", "target", "ppl_ratio", "activation_ratio"}
    assert 0 <= res.activation_ratio <= 1 and res.zero_activation_ratio > 0
    assert res.per_layer.shape[0] == 2
    run = profile(model, ids, attention_mask=m, progress=False)
    res.store(run)
    assert set(tables(run)) == {"ppl1_sparsity/per_layer", "ppl1_sparsity/curve"}


def test_ppl_sparsity_activation_ratio_brute_force():
    model = tiny_llama("relu", seed=6)
    ids, m = padded_batch(seed=7)
    res = ppl_sparsity(model, [(ids, m)], p=5, n_candidates=512, tolerance=0.02)
    # measure under the intervention by hand: layer 0's a is the dense one
    site0 = ffn_sites(model)[0]
    a = collect(model, [(ids, m)])[site0.name]["a"].double()
    act = (a.abs() * site0.down_column_norms()) > res.thresholds[0]
    r0 = res.per_layer[res.per_layer.layer == 0].iloc[0]
    assert r0.activation_ratio == pytest.approx(float(act.double().mean()), abs=1e-12)
    assert r0.zero_activation_ratio == pytest.approx(float((a != 0).double().mean()), abs=1e-12)
    assert np.isfinite(res.reduction_vs_zero)
