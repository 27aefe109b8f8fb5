"""On the GPU machine: the bricks probes on CUDA (bf16 mask, fp32 product, int32 counts) equal
the CPU probes, and the vectorised AP on CUDA equals sklearn's.

Run there with `python -m pytest -m gpu tests/metrics/test_bricks_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from tests import tiny
from workbench.capture.bricks import CoActivation, InstanceScores
from workbench.metrics import bricks as B

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")]


@pytest.mark.parametrize("rule", ["zero", "fat(0.02)"])
def test_cuda_bricks_probes_match_cpu(rule):
    model = tiny.build("llama")
    ids = torch.randint(1, tiny.VOCAB, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    out = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        with wb.capture(model, probes=[CoActivation(), InstanceScores(budget=8)], rule=rule) as run:
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        out[dev] = run.tensors
    for k, v in out["cpu"].items():
        w = out["cuda"][k]
        if k.endswith("/counts"):
            assert w.dtype == torch.int32 and torch.equal(w.long(), v)
        elif k.endswith(("/score", "/score_rule")):
            # the devices draw different priorities, so the slots differ: compare the rows as sets
            w, v = w.cpu(), v
            torch.testing.assert_close(w[w.sum(1).argsort()], v[v.sum(1).argsort()], atol=1e-5, rtol=1e-4)


def test_cuda_average_precision_equals_sklearn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    s = (torch.rand(301, 37, generator=g) * 5).round() / 5
    y = torch.rand(301, generator=g) < 0.3
    got = B.average_precision(s.cuda(), y.cuda()).cpu()
    want = torch.tensor([average_precision_score(y.numpy(), s[:, j].numpy()) for j in range(37)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
