"""wb.accelerate: the switch restores the model exactly; exact/chunk modes match the dense model;
predictor mode reports its error; bad input gives clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

import workbench as wb
from workbench.accel import accelerate
from workbench.errors import WorkbenchError

ZOO = Path(__file__).resolve().parents[2] / "data" / "zoo" / "relu-llama" / "model.safetensors"
ZOO_BLOCK = Path(__file__).resolve().parents[2] / "data" / "zoo" / "blockffn" / "model.safetensors"


def _tiny(act="relu", dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, hidden_act=act, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


def _ids(n=11, seed=1, vocab=128):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_on_off_restores_modules_exactly():
    model = _tiny()
    mlps = [layer.mlp for layer in model.model.layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    dense = model(ids).logits
    h = accelerate(model, mode="exact", backend="torch")
    assert all(type(layer.mlp).__name__ == "SparseFFN" for layer in model.model.layers)
    assert "mlp.original" not in "".join(model.state_dict())  # no duplicated weights
    h.off()
    assert [layer.mlp for layer in model.model.layers] == mlps  # the very same objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.is_contiguous(), k
    assert torch.equal(model(ids).logits, dense)


def test_context_manager_restores_on_exception():
    model = _tiny()
    mlp0 = model.model.layers[0].mlp
    with pytest.raises(RuntimeError, match="inside"):
        with accelerate(model, backend="torch"):
            raise RuntimeError("inside")
    assert model.model.layers[0].mlp is mlp0


def test_down_weight_is_not_duplicated():
    model = _tiny()
    w = model.model.layers[0].mlp.down_proj.weight
    h = accelerate(model, backend="torch")
    sp = model.model.layers[0].mlp
    assert sp.w_down_t.is_contiguous() and sp.w_down_t.data_ptr() == w.data_ptr()
    h.off()


@pytest.mark.parametrize("mode", ["exact", "chunk"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_and_chunk_match_dense(mode, backend):
    model = _tiny(seed=3)
    h = accelerate(model, mode=mode, backend=backend)
    m = h.measure(_ids(13, seed=4), reps=1, warmup=0)
    h.off()
    assert m.summary["logits_rel_rms"] <= 1e-2
    assert m.summary["top1_agreement"] >= 0.99
    assert (m.layers["realised_sparsity"] >= 0).all() and (m.layers["true_sparsity"] > 0.2).all()
    assert m.summary["backend"] == backend


def test_predictor_mode_reports_error(tmp_path):
    from workbench.metrics import save_predictors, train_predictors

    model = _tiny(seed=5)
    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(6))
    pred = train_predictors(model, data, width=16, epochs=3)
    path = save_predictors(pred, tmp_path / "pred")
    h = accelerate(model, mode="predictor", predictors=path, backend="torch")
    m = h.measure(_ids(9, seed=7), reps=1, warmup=0)
    h.off()
    for key in ("logits_rel_rms", "top1_agreement", "predictor_recall"):
        assert 0.0 <= m.summary[key] <= (10.0 if key == "logits_rel_rms" else 1.0), key
    assert "predictor_recall" in m.layers


def test_bad_inputs_give_clear_errors():
    with pytest.raises(WorkbenchError, match="bf16/fp16"):
        accelerate(_tiny(dtype=torch.float32))
    with pytest.raises(WorkbenchError, match="no exact zeros"):
        accelerate(_tiny(act="silu"))
    with pytest.raises(WorkbenchError, match="mode"):
        accelerate(_tiny(), mode="fastest")
    with pytest.raises(WorkbenchError, match="needs predictors"):
        accelerate(_tiny(), mode="predictor")
    cfg = tf.Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, hidden_act="relu", pad_token_id=0)
    with pytest.raises(WorkbenchError, match="fused gate_up"):
        accelerate(tf.Phi3ForCausalLM(cfg).to(torch.bfloat16))


def test_measure_names_bad_inputs_and_leaves_no_hooks():
    model = _tiny()
    with accelerate(model) as h:
        for bad, what in ((["hello"], "tokenize first"), (_ids(5).float(), "tokenize first"),
                          (_ids(5) + 10**6, r"token ids must lie in \[0, ")):
            with pytest.raises(WorkbenchError, match=what):
                h.measure(bad, reps=1, warmup=0)
        with pytest.raises(WorkbenchError, match="reps must be a whole number >= 1"):
            h.measure(_ids(5), reps=0)
    assert not any(m._forward_hooks for m in model.modules())  # nothing left behind


@pytest.mark.parametrize("make", [_tiny, lambda: _tiny_opt()], ids=["gated", "plain"])
def test_accelerating_an_accelerated_model_names_the_active_handle(make):
    model = make()
    h = accelerate(model, backend="torch")
    with pytest.raises(WorkbenchError, match=r"already swapped .*\.off\(\)"):
        accelerate(model, backend="torch")
    h.off()
    accelerate(model, backend="torch").off()  # fine once the first handle is off


def test_triton_backend_refuses_cpu_tensors_when_not_interpreting(monkeypatch):
    from workbench.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(WorkbenchError, match="CUDA"):
        accelerate(_tiny(), backend="triton")


def _tiny_blockffn(seed=0, **kw):
    from workbench.models.blockffn import BlockFFNConfig, BlockFFNForCausalLM

    torch.manual_seed(seed)
    cfg = BlockFFNConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, n_experts=6, expert_size=16,
                         max_position_embeddings=64, **kw)
    return BlockFFNForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_blocks_model_exact_and_chunk_match_dense_and_restore(backend):
    model = _tiny_blockffn(seed=8)
    before = {n: m for n, m in model.named_modules()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for mode in ("exact", "chunk"):
        h = accelerate(model, mode=mode, backend=backend)
        assert type(model.model.layers[0].mlp).__name__ == "SparseMoE"
        m = h.measure(_ids(13, seed=9), reps=1, warmup=0)
        h.off()
        assert m.summary["logits_rel_rms"] <= 1e-2, (mode, m.summary)
        assert m.summary["top1_agreement"] >= 0.99, (mode, m.summary)
        assert (m.layers["realised_sparsity"] <= m.layers["true_sparsity"] + 1e-9).all()
        assert {n: m_ for n, m_ in model.named_modules()} == before
        for n, p in model.named_parameters():
            assert p.is_contiguous() and torch.equal(p, weights[n]), n


def test_moe_blocks_model_refusals_name_the_cause():
    with pytest.raises(WorkbenchError, match="router already"):
        accelerate(_tiny_blockffn(), mode="predictor")
    with pytest.raises(WorkbenchError, match="NormSiLU"):
        accelerate(_tiny_blockffn(expert_act="normsilu"))
    with pytest.raises(WorkbenchError, match="router scale"):
        accelerate(_tiny_blockffn(router_scale=True))


@pytest.mark.parametrize("name,sparsity", [
    # relu-llama: the rows the kernels read; blockffn: the trained router turns most experts off
    pytest.param("relu-llama", "realised_sparsity",
                 marks=pytest.mark.skipif(not ZOO.is_file(), reason="zoo:relu-llama not built")),
    pytest.param("blockffn", "true_sparsity",
                 marks=pytest.mark.skipif(not ZOO_BLOCK.is_file(), reason="zoo:blockffn not built")),
])
def test_zoo_exact_and_chunk_match_dense(name, sparsity):
    model = wb.load_model(f"zoo:{name}")
    text = "def add(a, b):\n    return a + b\n\nThe function returns the sum of its arguments."
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"][:, :32]
    for mode in ("exact", "chunk"):
        with accelerate(model, mode=mode, backend="torch") as h:
            m = h.measure(ids, reps=1, warmup=0)
        assert m.summary["logits_rel_rms"] <= 1e-2, (mode, m.summary)
        assert m.summary["top1_agreement"] >= 0.99, (mode, m.summary)
        assert m.layers[sparsity].mean() > 0.5


# -- plain (non-gated) ReLU FFNs: OPT whole (SparsePlainFFN), GPT-2 its down projection -----------

def _tiny_opt(seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    cfg = tf.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1)
    return tf.OPTForCausalLM(cfg).to(dtype).eval()


def _tiny_gpt2(seed=0, act="relu", dtype=torch.bfloat16):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, activation_function=act,
                        bos_token_id=0, eos_token_id=1)
    return tf.GPT2LMHeadModel(cfg).to(dtype).eval()


def _ffn_modules(model):
    """(up, act, down) of each layer, as the model holds them now."""
    if isinstance(model, tf.OPTForCausalLM):
        return [(layer.fc1, layer.activation_fn, layer.fc2) for layer in model.model.decoder.layers]
    return [(b.mlp.c_fc, b.mlp.act, b.mlp.c_proj) for b in model.transformer.h]


def _downs(model):
    return [m[2] for m in _ffn_modules(model)]


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_plain_ffn_on_off_swaps_and_restores(arch):
    """OPT (nn.Linear fc1, its own activation module): the whole FFN becomes one SparsePlainFFN at
    fc1, activation_fn and fc2 pass its output through. GPT-2 (Conv1D c_fc): only c_proj is
    swapped. Either way the down weight is re-laid out in place and off() puts the very same
    modules back with the same weights."""
    model = _tiny_opt() if arch == "opt" else _tiny_gpt2()
    before = _ffn_modules(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    dense = model(ids).logits
    h = accelerate(model, mode="exact", backend="torch")
    now = _ffn_modules(model)
    kinds = [tuple(type(m).__name__ for m in ms) for ms in now]
    if arch == "opt":
        assert kinds == [("SparsePlainFFN", "FusedAway", "FusedAway")] * 2
        assert list(h.sparse) == [f"model.decoder.layers.{i}.fc1" for i in range(2)]
        assert "computed by model.decoder.layers.0.fc1" in repr(now[0][2])
    else:
        assert kinds == [("Conv1D", type(before[0][1]).__name__, "SparseDown")] * 2
        assert list(h.sparse) == [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]
    assert all(h.sparse[n].w_down_t.is_contiguous() and h.sparse[n].w_down_t.data_ptr() == ms[2].weight.data_ptr()
               for n, ms in zip(h.sparse, before, strict=True))  # re-laid out in place (Conv1D: as it is)
    with torch.no_grad():
        assert float((model(ids).logits.float() - dense.float()).norm() / dense.float().norm()) < 1e-2
    h.off()
    assert _ffn_modules(model) == before  # the very same objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.is_contiguous(), k
    assert torch.equal(model(ids).logits, dense)


def test_plain_ffn_with_a_shared_activation_module_swaps_the_projections_only():
    """An activation module held in two places cannot be replaced by a pass-through for one FFN
    alone: such a model keeps its activation, fc2 becomes SparseDown (and fc1 SparsePredictedUp in
    predictor mode)."""
    model = _tiny_opt(seed=2)
    layers = model.model.decoder.layers
    layers[1].activation_fn = layers[0].activation_fn
    h = accelerate(model, mode="exact", backend="torch")
    assert [type(layer.fc2).__name__ for layer in layers] == ["SparseDown"] * 2
    assert [type(layer.fc1).__name__ for layer in layers] == ["Linear"] * 2
    h.off()
    preds = {f"model.decoder.layers.{i}": _random_predictor(32, 128, 16, seed=i) for i in range(2)}
    h = accelerate(model, mode="predictor", predictors=preds, backend="torch")
    assert [type(layer.fc1).__name__ for layer in layers] == ["SparsePredictedUp"] * 2
    h.off()
    assert layers[1].activation_fn is layers[0].activation_fn


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
@pytest.mark.parametrize("mode", ["exact", "chunk"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plain_ffn_exact_and_chunk_match_dense(arch, mode, backend):
    model = _tiny_opt(seed=3) if arch == "opt" else _tiny_gpt2(seed=3)
    h = accelerate(model, mode=mode, backend=backend)
    m = h.measure(_ids(13, seed=4), reps=1, warmup=0)
    h.off()
    assert m.summary["logits_rel_rms"] <= 1e-2
    assert m.summary["top1_agreement"] >= 0.99
    assert m.summary["backend"] == backend
    assert m.layers["name"].str.endswith(".fc1" if arch == "opt" else ".c_proj").all()
    assert (m.layers["true_sparsity"] > 0.2).all()
    if mode == "exact":  # one token a step: the kernel reads exactly the active rows
        assert (m.layers["realised_sparsity"] - m.layers["true_sparsity"]).abs().max() < 1e-9
    else:  # 8 tokens a step: the union of their active rows
        assert (m.layers["realised_sparsity"] <= m.layers["true_sparsity"]).all()


@pytest.mark.parametrize("tokens", [1, 3, 8, 21, 70])
def test_sparse_down_module_computes_the_dense_projection(tokens):
    from workbench.accel.ffn import SparseDown

    model = _tiny_gpt2(seed=5)
    h = accelerate(model, mode="chunk", backend="torch")
    sp = model.transformer.h[0].mlp.c_proj
    assert isinstance(sp, SparseDown)
    a = torch.relu(torch.randn(1, tokens, 128, generator=torch.Generator().manual_seed(tokens))).to(torch.bfloat16)
    a[..., ::3] = 0
    with torch.no_grad():
        want = a.double() @ sp.down_module.weight.double() + sp.down_module.bias.double()  # Conv1D: W [in, out]
        got = sp(a)
    h.off()
    assert got.shape == (1, tokens, 32) and got.dtype == torch.bfloat16
    assert float((got.double() - want).norm() / want.norm()) < 4e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode,tokens", [("exact", 1), ("exact", 5), ("exact", 21), ("chunk", 1), ("chunk", 13),
                                         ("chunk", 70)])
def test_sparse_plain_ffn_computes_the_dense_ffn(backend, mode, tokens):
    """SparsePlainFFN (OPT) against fc2(relu(fc1(x))) in float64: the kernel path up to
    decode_tokens (exact) or 64 tokens (chunk), the original modules above."""
    from workbench.accel.ffn import SparsePlainFFN

    model = _tiny_opt(seed=6)
    layer = model.model.decoder.layers[0]
    up, down = layer.fc1, layer.fc2
    h = accelerate(model, mode=mode, backend=backend)
    sp = layer.fc1
    assert isinstance(sp, SparsePlainFFN)
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    with torch.no_grad():
        xd = x.double()
        a = torch.relu(xd @ up.weight.double().t() + up.bias.double())
        want = a @ down.weight.double().t() + down.bias.double()
        got = layer.fc2(layer.activation_fn(sp(x)))  # the model's own sequence: act and fc2 pass through
    h.off()
    assert got.shape == (1, tokens, 32) and got.dtype == torch.bfloat16
    assert float((got.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens", [1, 3, 70])
def test_sparse_plain_ffn_predictor_mode_reads_the_predicted_rows(backend, tokens):
    """Predictor mode on OPT: act(fc1(x)) on the predicted rows only, then fc2, against float64."""
    from workbench.accel.ffn import SparsePlainFFN

    model = _tiny_opt(seed=8)
    layer = model.model.decoder.layers[0]
    up, down = layer.fc1, layer.fc2
    preds = {f"model.decoder.layers.{i}": _random_predictor(32, 128, 16, seed=i, margin=True) for i in range(2)}
    h = accelerate(model, mode="predictor", predictors=preds, backend=backend)
    sp = layer.fc1
    assert isinstance(sp, SparsePlainFFN) and "width=16" in repr(sp)
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    p = {k: v.double() for k, v in sp.predictor.items()}
    with torch.no_grad():
        xd = x[0].double()
        on = (torch.relu(xd @ p["w1"].t() + p["b1"]) @ p["w2"].t() + p["b2"]) > 0
        a = torch.relu(xd @ up.weight.double().t() + up.bias.double()) * on
        want = a @ down.weight.double().t() + down.bias.double()
        dense = torch.relu(xd @ up.weight.double().t() + up.bias.double()) @ down.weight.double().t()
        dense = dense + down.bias.double()
        got = sp(x)[0]
    h.off()
    assert 0.1 < on.double().mean() < 0.9
    assert float((got.double() - want).norm() / want.norm()) < 1e-2
    assert float((dense - want).norm() / want.norm()) > 0.05  # the mask matters here


def test_plain_ffn_refusals_name_the_cause():
    with pytest.raises(WorkbenchError, match="needs predictors"):
        accelerate(_tiny_opt(), mode="predictor")
    with pytest.raises(WorkbenchError, match="no entry for"):
        accelerate(_tiny_opt(), mode="predictor", predictors={})
    g = _tiny_gpt2()
    bad = {f"transformer.h.{i}.mlp": _random_predictor(32, 128, 8) for i in range(2)}
    with pytest.raises(WorkbenchError, match="nn.Linear up projection.*Conv1D"):
        accelerate(g, mode="predictor", predictors=bad)
    wrong = {f"model.decoder.layers.{i}": _random_predictor(32, 64, 8) for i in range(2)}
    with pytest.raises(WorkbenchError, match="train the predictors on this model"):
        accelerate(_tiny_opt(), mode="predictor", predictors=wrong)
    with pytest.raises(WorkbenchError, match="no exact zeros"):
        accelerate(_tiny_gpt2(act="gelu_new"))
    with pytest.raises(WorkbenchError, match="bf16/fp16"):
        accelerate(_tiny_opt(dtype=torch.float32))


def test_call_graphs_stay_off_on_the_cpu_and_inside_the_harness():
    from workbench.accel.ffn import CallGraphs, call_graphs_disabled

    model = _tiny()
    h = accelerate(model, backend="torch")
    sp = model.model.layers[0].mlp
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    assert isinstance(sp.call_graphs, CallGraphs) and sp.call_graphs.enabled
    assert not sp.call_graphs.usable(x, None)  # CPU tensors: direct launches
    with torch.no_grad():
        sp(x[None])
    assert not sp.call_graphs.graphs
    with call_graphs_disabled(), call_graphs_disabled():
        from workbench.accel import ffn

        assert ffn._GRAPHS_OFF[0] == 2
    assert ffn._GRAPHS_OFF[0] == 0
    h.off()
    h2 = accelerate(model, backend="torch", call_graphs=False)
    assert not model.model.layers[0].mlp.call_graphs.enabled
    h2.off()


def _random_predictor(d_model, d_ff, width, seed=0, margin=False):
    """Random Deja Vu predictor weights; margin: logits = b2 (+-1, random signs) + a small x-dependent
    part, so which rows are predicted cannot flip with the rounding of the predictor's layers."""
    g = torch.Generator().manual_seed(seed)
    w2 = torch.randn(d_ff, width, generator=g) / width ** 0.5
    b2 = torch.zeros(d_ff)
    if margin:
        w2 *= 0.01
        b2 = torch.where(torch.rand(d_ff, generator=g) < 0.4, 1.0, -1.0)
    return {"w1": torch.randn(width, d_model, generator=g) / d_model ** 0.5, "b1": torch.zeros(width), "w2": w2,
            "b2": b2}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens", [1, 3, 70])
def test_sparse_predicted_up_computes_the_up_rows_the_predictor_turns_on(backend, tokens):
    from workbench.accel.ffn import SparsePredictedUp

    model = _tiny_opt(seed=8)
    layers = model.model.decoder.layers
    layers[1].activation_fn = layers[0].activation_fn  # shared: the projections are swapped one by one
    preds = {f"model.decoder.layers.{i}": _random_predictor(32, 128, 16, seed=i, margin=True) for i in range(2)}
    h = accelerate(model, mode="predictor", predictors=preds, backend=backend)
    sp = model.model.decoder.layers[0].fc1
    assert isinstance(sp, SparsePredictedUp) and type(model.model.decoder.layers[0].fc2).__name__ == "SparseDown"
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    p = {k: v.double() for k, v in sp.predictor.items()}
    with torch.no_grad():
        xd = x[0].double()
        on = (torch.relu(xd @ p["w1"].t() + p["b1"]) @ p["w2"].t() + p["b2"]) > 0
        want = (xd @ sp.up_module.weight.double().t() + sp.up_module.bias.double()) * on
        got = sp(x)[0]
    h.off()
    assert 0.1 < on.double().mean() < 0.9
    assert (got[~on] == 0).all()  # rows not predicted: exactly zero, so act(0) = 0 reaches fc2
    assert float((got.double() - want).norm() / want.norm()) < 1e-2


def test_plain_ffn_predictor_mode_reports_error_and_restores(tmp_path):
    from workbench.metrics import save_predictors, train_predictors

    model = _tiny_opt(seed=5)
    ups = [layer.fc1 for layer in model.model.decoder.layers]
    downs = _downs(model)
    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(6))
    path = save_predictors(train_predictors(model, data, width=16, epochs=3), tmp_path / "pred")
    h = accelerate(model, mode="predictor", predictors=path, backend="torch")
    assert list(h.sparse) == [f"model.decoder.layers.{i}.fc1" for i in range(2)]
    m = h.measure(_ids(9, seed=7), reps=1, warmup=0)
    h.off()
    assert [layer.fc1 for layer in model.model.decoder.layers] == ups and _downs(model) == downs
    assert 0.0 < m.summary["predictor_recall"] <= 1.0 and 0.0 <= m.summary["top1_agreement"] <= 1.0
    assert m.layers["predictor_recall"].notna().all() and (m.layers["dense_ms"] > 0).all()
