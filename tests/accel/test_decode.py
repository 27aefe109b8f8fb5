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
