"""Compiled on the GPU machine: the committed zoo:relu-llama predictors (trained on the residual
stream entering the FFN block) in predictor mode, Triton vs its torch reference, decode step by
step with the per-call CUDA graphs on. Run there with
`WB_KERNEL_TESTS_GPU=1 python -m pytest -m gpu tests/accel/test_predictor_gpu.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import workbench as wb

PRED = Path(__file__).resolve().parents[2] / "data" / "zoo" / "relu-llama" / "predictor" / "predictor.json"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)"),
              pytest.mark.skipif(not PRED.is_file(), reason="zoo:relu-llama predictors not committed")]


def test_zoo_predictors_triton_match_their_torch_reference():
    from transformers import DynamicCache

    model = wb.load_model("zoo:relu-llama", device="cuda")
    ids = model.tokenizer("def add(a, b):\n    return a + b\n\nThe function returns the sum of its arguments.",
                          return_tensors="pt")["input_ids"][:, :24].cuda()

    def decode():
        cache, outs = DynamicCache(config=model.config), []
        with torch.no_grad():
            for i in range(ids.shape[1]):
                outs.append(model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits.float())
        return torch.cat(outs, 1)

    with wb.accelerate(model, mode="predictor", predictors="zoo:relu-llama", backend="torch"):
        ref = decode()
    with wb.accelerate(model, mode="predictor", predictors="zoo:relu-llama", backend="triton") as h:
        got = decode()
        m = h.measure(ids, reps=2, warmup=1)
    assert float((got - ref).norm() / ref.norm()) <= 1e-2
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.95
    assert m.summary["backend"] == "triton" and m.summary["predictor_recall"] >= 0.8
