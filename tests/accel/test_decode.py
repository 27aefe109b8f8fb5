"""decode_benchmark: runs on CPU (eager reference path, labelled so), the accelerated greedy tokens
equal the dense ones in exact mode, the handle is left as it was; compiled on the GPU with graphs."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import workbench as wb
from workbench.errors import WorkbenchError


def _tiny(seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, hidden_act="relu",
                         max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


def _prompt(n=5):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(2))


def _dense_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def test_cpu_reference_decode_matches_dense_greedy():
    model = _tiny()
    ids = _prompt()
    want = _dense_greedy(model, ids, 8)
    h = wb.accelerate(model, mode="exact", backend="torch")
    r = wb.decode_benchmark(model, ids, new_tokens=8, handle=h, reps=2, warmup=1)
    s = r["summary"]
    assert s["reference"] is True and s["cuda_graphs"] is False and s["backend"] == "torch"
    assert r["tokens"]["dense"] == want
    assert r["tokens"]["accel"] == want and s["tokens_match"]
    assert s["tokens_per_s_dense"] > 0 and s["tokens_per_s_accel"] > 0
    assert len(r["runs"]) == 4 and [x["side"] for x in r["runs"]] == ["dense", "accel"] * 2
    assert h.active  # left as it was
    h.off()


def test_dense_only_and_bad_input():
    model = _tiny()
    r = wb.decode_benchmark(model, _prompt(), new_tokens=3, reps=1, warmup=0)
    assert r["summary"]["reference"] and "speedup" not in r["summary"]
    with pytest.raises(WorkbenchError, match="one sequence"):
        wb.decode_benchmark(model, torch.zeros((2, 3), dtype=torch.long))
    with pytest.raises(WorkbenchError, match="new_tokens"):
        wb.decode_benchmark(model, _prompt(), new_tokens=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")
@pytest.mark.parametrize("mode", ["exact", "chunk"])
def test_gpu_graph_decode_equals_eager_static_decode(mode):
    """The graph replays compute exactly what the same eager StaticCache decode computes (same
    kernels), on both sides. (Comparing with model.generate is not meaningful on a random tiny
    model: its logits are near-ties that flip with the attention kernel's rounding.)"""
    model = _tiny(seed=1).cuda()
    ids = _prompt().cuda()
    h = wb.accelerate(model, mode=mode, backend="triton")
    r = wb.decode_benchmark(model, ids, new_tokens=12, handle=h, reps=2, warmup=2)
    e = wb.decode_benchmark(model, ids, new_tokens=12, handle=h, reps=1, warmup=1, cuda_graphs=False)
    s = r["summary"]
    assert s["cuda_graphs"] and not s["reference"] and s["backend"] == "triton"
    assert not e["summary"]["cuda_graphs"]
    assert r["tokens"]["dense"] == e["tokens"]["dense"]
    assert r["tokens"]["accel"] == e["tokens"]["accel"]
    h.off()


# -- compile_non_ffn -------------------------------------------------------------------------

_NON_FFN = {f"model.layers.{i}.{c}" for i in range(2) for c in ("self_attn", "input_layernorm",
                                                                  "post_attention_layernorm")} | {
    "model.norm", "model.rotary_emb"}


def _compiled_impls(model):
    return {n: m.__dict__["_compiled_call_impl"] for n, m in model.named_modules() if "_compiled_call_impl" in m.__dict__}


def _dynamo_cfg():
    c = torch._dynamo.config
    return {k: getattr(c, k) for k in ("recompile_limit", "accumulated_recompile_limit",
                                       "fail_on_recompile_limit_hit") if hasattr(c, k)}


def _counting_compiler(calls):
    """Stands in for torch.compile (no compiling on CPU): runs the function, noting the module."""
    def compiler(fn):
        def run(module, *args, **kwargs):
            calls.append(type(module).__name__)
            return fn(module, *args, **kwargs)
        return run
    return compiler


def test_non_ffn_modules_are_everything_but_the_ffns():
    from workbench.accel.decode import non_ffn_modules

    assert set(non_ffn_modules(_tiny())) == _NON_FFN


def test_compiled_non_ffn_restores_on_exit_and_on_error_without_compiling():
    from workbench.accel.decode import compiled_non_ffn

    model = _tiny()
    ids = _prompt()
    want = model(ids).logits
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    norm = model.model.norm
    mine = lambda *a, **k: norm._call_impl(*a, **k)  # noqa: E731  (a user's own compiled call, say)
    norm._compiled_call_impl = mine
    cfg = _dynamo_cfg()
    calls: list[str] = []
    with compiled_non_ffn(model, compiler=_counting_compiler(calls)) as mods:
        assert set(mods) == _NON_FFN and set(_compiled_impls(model)) == _NON_FFN
        assert torch._dynamo.config.recompile_limit >= len(mods)
        with compiled_non_ffn(model, compiler=_counting_compiler(calls)) as inner:  # nested: no-op
            assert inner is mods
        got = model(ids).logits
    assert torch.equal(got, want)
    assert sorted(set(calls)) == ["LlamaAttention", "LlamaRMSNorm", "LlamaRotaryEmbedding"]
    assert calls.count("LlamaAttention") == 2 and "LlamaMLP" not in calls
    assert _compiled_impls(model) == {"model.norm": mine} and _dynamo_cfg() == cfg
    with pytest.raises(RuntimeError, match="boom"), compiled_non_ffn(model, compiler=_counting_compiler([])):
        assert len(_compiled_impls(model)) == len(_NON_FFN)
        raise RuntimeError("boom")
    assert _compiled_impls(model) == {"model.norm": mine} and _dynamo_cfg() == cfg
    del norm._compiled_call_impl
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(WorkbenchError, match="CUDA graphs of its own"), compiled_non_ffn(model, mode="reduce-overhead"):
        pass


def test_decode_benchmark_compile_path_on_cpu_without_compiling(monkeypatch):
    import workbench.accel.decode as dec

    model = _tiny()
    ids = _prompt()
    h = wb.accelerate(model, mode="exact", backend="torch")
    h.off()
    plain = wb.decode_benchmark(model, ids, new_tokens=6, handle=h, reps=1, warmup=1)
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: _counting_compiler(calls)(fn))
    r = wb.decode_benchmark(model, ids, new_tokens=6, handle=h, reps=1, warmup=1, compile_non_ffn=True)
    s = r["summary"]
    assert s["compile_non_ffn"] and s["compiled_modules"] == len(_NON_FFN) and "compiled" in s["note"]
    assert r["tokens"] == plain["tokens"] and calls and not _compiled_impls(model) and not h.active

    def boom(*a, **k):
        assert set(_compiled_impls(model)) == _NON_FFN
        raise RuntimeError("boom")

    monkeypatch.setattr(dec, "_greedy_eager", boom)
    with pytest.raises(RuntimeError, match="boom"):
        wb.decode_benchmark(model, ids, new_tokens=6, handle=h, reps=1, warmup=1, compile_non_ffn=True)
    assert not _compiled_impls(model) and not h.active


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")
def test_gpu_repeated_decode_benchmark_keeps_no_device_memory():
    """Calling the harness again and again (as a notebook user does) leaves the device memory where
    the first call left it: no per-call cache, graph pool or per-stream cuBLAS workspace stays."""
    model = _tiny(seed=1).cuda()
    ids = _prompt().cuda()
    h = wb.accelerate(model, mode="exact", backend="triton")
    h.off()
    wb.decode_benchmark(model, ids, new_tokens=6, handle=h, reps=2, warmup=1)
    torch.cuda.synchronize()
    first = torch.cuda.memory_allocated()
    for _ in range(4):
        wb.decode_benchmark(model, ids, new_tokens=6, handle=h, reps=2, warmup=1)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")
def test_gpu_compiled_decode_matches_uncompiled():
    """float32 (so that a different rounding of the fused kernels cannot flip a near-tie): the
    compiled harness decodes the tokens the uncompiled one does, and leaves the modules as they were."""
    model = _tiny(seed=1, dtype=torch.float32).cuda()
    ids = _prompt().cuda()
    sd = list(model.state_dict())
    plain = wb.decode_benchmark(model, ids, new_tokens=12, reps=1, warmup=2)
    r = wb.decode_benchmark(model, ids, new_tokens=12, reps=2, warmup=2, compile_non_ffn=True)
    s = r["summary"]
    assert s["cuda_graphs"] and s["compile_non_ffn"] and s["compiled_modules"] == len(_NON_FFN)
    assert r["tokens"]["dense"] == plain["tokens"]["dense"]
    assert not _compiled_impls(model) and list(model.state_dict()) == sd
    assert r["runs"][1]["setup_s"] < r["runs"][0]["setup_s"]  # compiled once, in the first warm-up


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")
def test_gpu_compiled_graph_decode_equals_compiled_eager_decode():
    """bf16 with the sparse kernels: the compiled step captured in the graph computes what the same
    compiled step computes eagerly, on both sides; the handle and the modules are left as they were."""
    model = _tiny(seed=1).cuda()
    ids = _prompt().cuda()
    h = wb.accelerate(model, mode="exact", backend="triton")
    r = wb.decode_benchmark(model, ids, new_tokens=12, handle=h, reps=2, warmup=2, compile_non_ffn=True)
    e = wb.decode_benchmark(model, ids, new_tokens=12, handle=h, reps=1, warmup=1, cuda_graphs=False,
                            compile_non_ffn=True)
    assert r["summary"]["cuda_graphs"] and r["summary"]["compile_non_ffn"] and not r["summary"]["reference"]
    assert r["tokens"]["dense"] == e["tokens"]["dense"]
    assert r["tokens"]["accel"] == e["tokens"]["accel"]
    assert h.active and not _compiled_impls(model)
    h.off()


# -- plain (non-gated) ReLU FFNs: OPT, GPT-2 ---------------------------------------------------

def _tiny_plain(arch, seed=0, dtype=torch.bfloat16):
    from tests.accel.test_accelerate import _tiny_gpt2, _tiny_opt

    return _tiny_opt(seed, dtype) if arch == "opt" else _tiny_gpt2(seed, dtype=dtype)


def test_non_ffn_modules_of_plain_ffns_keep_only_the_down_projection_out():
    from workbench.accel.decode import non_ffn_modules

    opt = {f"model.decoder.layers.{i}.{c}" for i in range(2)
           for c in ("self_attn", "self_attn_layer_norm", "fc1", "activation_fn", "final_layer_norm")}
    assert set(non_ffn_modules(_tiny_plain("opt"))) == opt | {"model.decoder.final_layer_norm"}
    gpt2 = {f"transformer.h.{i}.{c}" for i in range(2)
            for c in ("ln_1", "attn", "ln_2", "mlp.c_fc", "mlp.act", "mlp.dropout")}
    assert set(non_ffn_modules(_tiny_plain("gpt2"))) == gpt2 | {"transformer.drop", "transformer.ln_f"}


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_cpu_reference_decode_of_plain_ffn_models(arch, monkeypatch):
    model = _tiny_plain(arch)
    ids = _prompt()
    want = _dense_greedy(model, ids, 6)
    h = wb.accelerate(model, mode="exact", backend="torch")
    r = wb.decode_benchmark(model, ids, new_tokens=6, handle=h, reps=1, warmup=1)
    assert r["summary"]["reference"] and r["summary"]["tokens_match"]
    assert r["tokens"]["dense"] == want and r["tokens"]["accel"] == want
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: _counting_compiler(calls)(fn))
    c = wb.decode_benchmark(model, ids, new_tokens=6, handle=h, reps=1, warmup=1, compile_non_ffn=True)
    assert c["tokens"] == r["tokens"] and calls and not {"SparseDown", "SparsePlainFFN"} & set(calls)
    assert not _compiled_impls(model) and h.active
    h.off()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")
@pytest.mark.parametrize("arch", ["opt", "gpt2"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_graph_decode_of_plain_ffn_models_equals_eager(arch, compiled):
    """OPT / GPT-2 (ReLU) with their down projections on the kernel: the graph replays decode what the
    same (compiled or not) step decodes eagerly, on both sides; modules and handle left as they were."""
    model = _tiny_plain(arch, seed=1).cuda()
    ids = _prompt().cuda()
    h = wb.accelerate(model, mode="exact", backend="triton")
    r = wb.decode_benchmark(model, ids, new_tokens=12, handle=h, reps=2, warmup=2, compile_non_ffn=compiled)
    e = wb.decode_benchmark(model, ids, new_tokens=12, handle=h, reps=1, warmup=1, cuda_graphs=False,
                            compile_non_ffn=compiled)
    s = r["summary"]
    assert s["cuda_graphs"] and not s["reference"] and s["backend"] == "triton"
    assert r["tokens"]["dense"] == e["tokens"]["dense"]
    assert r["tokens"]["accel"] == e["tokens"]["accel"]
    assert h.active and not _compiled_impls(model)
    h.off()


def test_plain_ffn_predictor_mode_in_the_harness_keeps_the_swapped_ffn_uncompiled(monkeypatch):
    from tests.accel.test_accelerate import _random_predictor

    model = _tiny_plain("opt")
    preds = {f"model.decoder.layers.{i}": _random_predictor(32, 128, 16, seed=i, margin=True) for i in range(2)}
    h = wb.accelerate(model, mode="predictor", predictors=preds, backend="torch")
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: _counting_compiler(calls)(fn))
    r = wb.decode_benchmark(model, _prompt(), new_tokens=5, handle=h, reps=1, warmup=1, compile_non_ffn=True)
    assert r["summary"]["mode"] == "predictor" and r["summary"]["compiled_modules"] == 2 * 4 + 1
    assert type(model.model.decoder.layers[0].fc1).__name__ == "SparsePlainFFN"
    from workbench.accel.decode import non_ffn_modules

    on = non_ffn_modules(model, h.layout, list(h.sparse))
    h.off()
    assert on == non_ffn_modules(model, h.layout, list(h.sparse))  # the originals, not the pass-throughs
    h.on()
    assert calls and not {"SparsePlainFFN", "SparsePredictedUp", "SparseDown", "Linear"} & set(calls)  # fc1, fc2 out
    assert not _compiled_impls(model) and h.active
    h.off()
