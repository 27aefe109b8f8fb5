"""The ProSparse predictor recipe: the weighted loss, refusing another model's predictors, a layer
with no active neuron, the accelerate handle reading the same input as training, the report."""

import math

import pytest
import torch

from tests.metrics.helpers import tiny_llama
from workbench.errors import WorkbenchError
from workbench.metrics import load_predictors, save_predictors, train_predictors
from workbench.metrics._data import ffn_sites, pre_ffn_norm
from workbench.metrics.predictor import (
    PredictorError,
    default_width,
    predictor_report,
    weighted_bce,
)


def _seqs(n=12, s=12, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, s), generator=g)
    m = torch.ones_like(ids)
    m[::3, :3] = 0  # left padding
    m[1::3, 9:] = 0  # right padding
    return ids, m


def _model(seed=0, layers=2):
    return tiny_llama(layers=layers, seed=seed).to(torch.bfloat16)


def _train(model, **kw):
    ids, m = _seqs()
    kw = {"epochs": 2, **kw}
    return train_predictors(model, [(ids[:9], m[:9])], eval_data=[(ids[9:], m[9:])], **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_bce_equals_its_formula(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(5, 7, generator=g) < 0.2).double()
    w = float(y.mean()) + 0.005
    want = 0.0
    for i in range(5):
        for j in range(7):
            s = 1 / (1 + math.exp(-float(z[i, j])))
            yy = float(y[i, j])
            want += -((1 - w) * yy * math.log(s) + w * (1 - yy) * math.log(1 - s))
    want /= 35
    assert float(weighted_bce(z, y, w)) == pytest.approx(want, rel=1e-12)
    # w = 0.5 is half the plain BCE
    assert float(weighted_bce(z, y, 0.5)) == pytest.approx(
        0.5 * float(torch.nn.functional.binary_cross_entropy_with_logits(z, y)), rel=1e-12)


def test_default_recipe_and_width():
    assert default_width(4096) == 1024 and default_width(128) == 128  # published 1024, capped at d_model
    assert default_width(128, "plain") == 32
    with pytest.raises(PredictorError, match="recipe 'deja'"):
        train_predictors(_model(), ["x"], recipe="deja")
    with pytest.raises(PredictorError, match="input 'post_norm'"):
        train_predictors(_model(), ["x"], input="post_norm")


def test_another_models_predictors_are_refused(tmp_path):
    model = _model(seed=0)
    path = save_predictors(_train(model), tmp_path / "pred")
    other = _model(seed=1)  # same architecture, other weights
    with pytest.raises(PredictorError, match="weights differ"):
        load_predictors(path, model=other)
    deeper = _model(seed=0, layers=3)
    with pytest.raises(PredictorError, match="with 2 FFN layers; .* has 3"):
        load_predictors(path, model=deeper)
    from workbench.accel import accelerate

    # accelerate lists it among its blocking reasons
    with pytest.raises(WorkbenchError, match="weights differ.*train predictors on this model"):
        accelerate(other, mode="predictor", predictors=path, backend="torch")
    with pytest.raises(WorkbenchError, match="FFN layers"):
        accelerate(deeper, mode="predictor", predictors=path, backend="torch")
    load_predictors(path, model=model)  # its own model is fine
    load_predictors(path, model=model.float())  # and in another dtype


def test_a_layer_with_no_active_neuron_says_so():
    model = _model()
    with torch.no_grad():
        ffn_sites(model)[1].gate.weight.zero_()  # relu(0) = 0: layer 1 never fires
    with pytest.raises(PredictorError, match=r"layer 1 \(model.layers.1.mlp\): no neuron is active on any of the"):
        _train(model)


def test_predictor_mode_reads_the_input_it_was_trained_on():
    """The handle's predictor masks equal the trained predictor applied to the residual stream
    entering the FFN block (brute force through hooks), and differ from it applied to the FFN input."""
    from workbench.kernels.predictor.reference import predictor_logits

    from workbench.accel import accelerate

    model = _model()
    pred = _train(model)
    assert pred.input == "residual"
    ids, m = _seqs(n=3, s=10, seed=5)
    sites = ffn_sites(model)
    h = accelerate(model, mode="predictor", predictors=pred, backend="torch")
    seen = {}
    hooks = [pre_ffn_norm(model, s).register_forward_pre_hook(
        lambda mod, a, n=s.name: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]))) for s in sites]
    hooks += [h.sparse[s.name].register_forward_pre_hook(
        lambda mod, a, n=s.name: seen.__setitem__(n + ".x", a[0].reshape(-1, a[0].shape[-1]))) for s in sites]
    try:
        for sp in h.sparse.values():
            sp.stats, sp.track = {}, True
        with torch.no_grad():
            model(input_ids=ids, attention_mask=m)
    finally:
        for hk in hooks:
            hk.remove()
        h.off()
    differs = 0
    for s in sites:
        sp = h.sparse[s.name]
        p = {k: v.float() for k, v in sp.predictor.items()}
        want = int((predictor_logits(seen[s.name].float(), p["w1"], p["w2"], p["b1"], p["b2"]) > 0).sum())
        assert int(sp.stats["used"]) == want
        on_x = int((predictor_logits(seen[s.name + ".x"].float(), p["w1"], p["w2"], p["b1"], p["b2"]) > 0).sum())
        differs += on_x != want
    assert differs  # the test tells the two inputs apart
    assert all(model.get_submodule(s.name) is s.module for s in sites)  # off() restored the model


def test_predictor_report_on_held_out_tokens():
    model = _model()
    pred = _train(model, epochs=3)
    ids, m = _seqs(n=4, s=12, seed=9)
    r = predictor_report(model, pred, [(ids, m)])
    s = r.summary
    assert list(r.layers.layer) == [0, 1] and (r.layers.tokens == int(m.sum())).all()
    assert 0 <= s["mean_recall"] <= 1 and 0 <= s["predicted_sparsity"] <= 1
    assert s["ppl_exact"] == pytest.approx(s["ppl_dense"], rel=2e-2)  # the same function, bf16 roundings apart
    assert math.isfinite(s["ppl_predictor"]) and s["input"] == "residual"
    assert "perplexity dense" in repr(r)


def test_plain_recipe_is_kept():
    pred = _train(_model(), recipe="plain", epochs=1)
    assert pred.input == "ffn_input" and pred.bias and pred.loss == "bce" and (pred.metrics.width == 8).all()
    with pytest.raises(WorkbenchError):
        _train(_model(), recipe="plain", epochs=1, loss="focal")


def test_block_input_predictors_in_the_compiled_decode_harness(monkeypatch):
    """decode_benchmark(compile_non_ffn=True) keeps the hooked norms eager (dynamo does not guard
    on hooks: a norm compiled on the dense side would never hand the block input over), and the
    accelerated tokens equal those of the uncompiled harness."""
    import functools

    import workbench as wb

    model = _model()
    h = wb.accelerate(model, mode="predictor", predictors=_train(model), backend="torch")
    assert h.eager_modules == ["model.layers.0.post_attention_layernorm", "model.layers.1.post_attention_layernorm"]
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    plain = wb.decode_benchmark(model, prompt, new_tokens=4, handle=h, reps=1, warmup=0)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    comp = wb.decode_benchmark(model, prompt, new_tokens=4, handle=h, reps=1, warmup=0, compile_non_ffn=True)
    assert comp["tokens"]["accel"] == plain["tokens"]["accel"]
    h.off()


@pytest.mark.parametrize("layers, match", [
    ([99], r"layer\(s\) \[99\] do not exist: the model's FFN layers are \[0, 1\]"),
    ([], r"layers=\[\]: no layer to train"),
    ("0", r"layers='0': give a list"),
])
def test_layers_that_do_not_exist_are_refused(layers, match):
    with pytest.raises(PredictorError, match=match):
        _train(_model(), layers=layers)


@pytest.mark.parametrize("kw, match", [
    ({"epochs": 0}, r"epochs=0: .*>= 1"),
    ({"batch_tokens": 0}, r"batch_tokens=0: .*>= 1"),
    ({"lr": float("nan")}, r"lr=nan: .*finite number > 0"),
    ({"lr": -1.0}, r"lr=-1.0"),
    ({"weight_decay": -0.1}, r"weight_decay=-0.1"),
    ({"threshold": 2}, r"threshold=2: .*between 0 and 1"),
    ({"target_recall": 1.5}, r"target_recall=1.5: .*\(0, 1\]"),
    ({"width": 0}, r"width=0: .*>= 1"),
    ({"max_tokens": 0}, r"max_tokens=0: .*>= 1"),
])
def test_bad_training_arguments_are_named(kw, match):
    with pytest.raises(PredictorError, match=match):
        _train(_model(), **kw)


def test_bad_holdout_is_named():
    ids, m = _seqs()
    for h in (0, 1, -0.5, float("nan")):
        with pytest.raises(PredictorError, match=r"holdout=.*strictly between 0 and 1"):
            train_predictors(_model(), [(ids, m)], holdout=h, epochs=1)


def test_a_rule_with_no_inactive_neuron_is_refused():
    """SiLU has no exact zeros: under the default rule 'zero' every label is 'active'."""
    model = tiny_llama(act="silu").to(torch.bfloat16)
    with pytest.raises(PredictorError, match=r"every neuron is active .* under rule 'zero'.*fat\("):
        _train(model)
    _train(model, rule="fat(0.01)")  # a rule that leaves neurons inactive trains
