"""The metrics on CUDA give the CPU's results. On the GPU machine: WB_KERNEL_TESTS_GPU=1 pytest -m gpu tests/metrics
(without it tests/conftest.py sets TRITON_INTERPRET=1 and the capture's fused Triton path fails on CUDA tensors)."""

import copy

import pytest
import torch

from tests.metrics.helpers import padded_batch, tiny_llama
from workbench.metrics import (
    CETTCalibration,
    chunk_table,
    intervene,
    nll,
    ppl_sparsity,
    sparsity_table,
    train_predictors,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_cuda_matches_cpu(act):
    cpu = tiny_llama(act, seed=3)
    gpu = copy.deepcopy(cpu).cuda()
    data = [padded_batch(seed=s) for s in range(3)]
    # perplexity, dense and intervened
    assert nll(gpu, data).total == pytest.approx(nll(cpu, data).total, rel=1e-4)
    for rule in ["topk(8)", "fat(0.02)", "magnitude(0.01)"]:
        with intervene(cpu, rule):
            a = nll(cpu, data).total
        with intervene(gpu, rule):
            b = nll(gpu, data).total
        assert b == pytest.approx(a, rel=1e-3), rule
    # sparsity tables
    sa = sparsity_table(cpu, data, rules=["zero", "topk(8)"])
    sb = sparsity_table(gpu, data, rules=["zero", "topk(8)"])
    assert (sa.token_sparsity - sb.token_sparsity).abs().max() < 1e-3
    # CETT thresholds (float64 on both)
    ta = CETTCalibration.from_model(cpu, data, n_candidates=4096).table(0.1)
    tb = CETTCalibration.from_model(gpu, data, n_candidates=4096).table(0.1)
    assert (ta.threshold - tb.threshold).abs().max() < 1e-3 * ta.threshold.abs().max() + 1e-9
    # the PPL-p% search runs end to end on the GPU
    res = ppl_sparsity(gpu, data, p=2, n_candidates=4096, tolerance=0.01)
    assert 0 <= res.activation_ratio <= 1 and res.per_layer.shape[0] == 2
    # chunk table
    ca, cb = chunk_table(cpu, data), chunk_table(gpu, data)
    assert (ca.cls - cb.cls).abs().max() < 1e-3
    # predictors train and evaluate on the GPU
    pred = train_predictors(gpu, data * 4, eval_data=data, epochs=2)
    assert pred.metrics.recall.between(0, 1).all()
    assert next(iter(pred.layers.values())).fc1.weight.device.type == "cpu"  # saved from the host
