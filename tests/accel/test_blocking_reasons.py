"""`wb.accelerate` on an unsupported model lists every blocking reason at once."""

from __future__ import annotations

import pytest
import transformers as tf

import workbench as wb


def test_every_reason_at_once():
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=5,
                         num_attention_heads=2, num_key_value_heads=2, hidden_act="silu")
    model = tf.LlamaForCausalLM(cfg)  # float32, SiLU, sizes not multiples of 16, no predictors
    with pytest.raises(wb.WorkbenchError) as exc:
        wb.accelerate(model, mode="predictor", backend="torch")
    msg = str(exc.value)
    assert msg.startswith("cannot accelerate LlamaForCausalLM (4 reasons):\n")
    assert "the model is torch.float32; the sparse kernels run in bf16/fp16" in msg
    assert ("  - model.layers.0.mlp, model.layers.1.mlp, model.layers.2.mlp and 2 more: d_model=24, d_ff=40: "
            "the kernels need multiples of 16") in msg
    assert "activation 'silu' has no exact zeros" in msg
    assert "mode='predictor' needs predictors=PATH" in msg
    assert not any(type(m).__name__.startswith("Sparse") for m in model.modules())


def test_one_reason_reads_as_one():
    model = wb.load_model("builtin:tiny-relu-llama")  # float32
    with pytest.raises(wb.WorkbenchError, match=r"^cannot accelerate LlamaForCausalLM \(1 reason\):\n  - the model "
                                                r"is torch.float32"):
        wb.accelerate(model)
