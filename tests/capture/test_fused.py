"""The fused one-pass reduction (the GPU path) equals the torch path, run under the Triton
interpreter on CPU; the same tests run compiled on the GPU machine (marked gpu)."""

from __future__ import annotations

import os

import pytest
import torch

from workbench.adapters import GATED, PLAIN, FFNSite
from workbench.capture import fused
from workbench.capture.probes import AbsSketch, Batch, NeuronStats, ProbeContext
from workbench.capture.rules import Rule

pytestmark = pytest.mark.skipif(not fused.available(), reason="triton is not installed")


def _site(kind, d_ff, d_model=16):
    return FFNSite(layer=0, name="x", kind=kind, activation="relu", module=None, down=None, act=None, gate=None,
                   up=None, d_ff=d_ff, d_model=d_model)


def _device():
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


CASES = [  # (rule, kind, n, d_ff, dtype, padded)
    ("zero", GATED, 37, 80, torch.float32, True),
    ("zero", PLAIN, 5, 48, torch.bfloat16, False),
    ("fat(0.3)", GATED, 29, 64, torch.float16, True),
    ("fat(0.3)", PLAIN, 1, 112, torch.float32, True),
    ("magnitude", GATED, 33, 96, torch.float32, True),
]


@pytest.mark.parametrize("rule_s,kind,n,d_ff,dtype,padded", CASES)
def test_fused_equals_torch_path(rule_s, kind, n, d_ff, dtype, padded):
    dev = _device()
    gen = torch.Generator().manual_seed(n * 1000 + d_ff)
    g = torch.relu(torch.randn(n, d_ff, generator=gen)) * 2
    a = (g * torch.randn(n, d_ff, generator=gen)).to(dtype).to(dev)
    g = g.to(dtype).to(dev) if kind == GATED else None
    valid = (torch.rand(n, generator=gen) > 0.3).to(dev) if padded else None
    norms = {"x": (torch.rand(d_ff, generator=gen, dtype=torch.float64) + 0.5).to(dev)}
    rule = Rule.magnitude(0.4) if rule_s == "magnitude" else Rule.parse(rule_s)
    site = _site(kind, d_ff)
    ctx = ProbeContext(rule=rule, down_norms=dict(norms))
    ref_s, ref_k = NeuronStats(), AbsSketch()
    got_s, got_k = NeuronStats(), AbsSketch()
    for _ in range(2):  # two calls: accumulation, not just one write
        b = Batch(a=a, g=g, valid=valid)
        ref_s.update(site, b, ctx)
        ref_k.update(site, b, ctx)
        fused.update(site, b, ctx, got_s, got_k, block_t=16, block_d=32)
    r, f = ref_s.state["x"], got_s.state["x"]
    for k in ("active", "nonzero", "tokens", "nonfinite"):
        assert torch.equal(r[k].cpu(), f[k].cpu()), k
    torch.testing.assert_close(f["abs_sum"].cpu(), r["abs_sum"].cpu(), rtol=1e-12, atol=1e-12)
    assert torch.equal(f["abs_max"].cpu(), r["abs_max"].cpu())
    hr, hf = ref_k.state["x"]["hist"].cpu(), got_k.state["x"]["hist"].cpu()
    assert hr.sum() == hf.sum()
    # float32 log on the fused path may move a value sitting on a bucket edge by one bucket
    assert (hr - hf).abs().sum() <= 2 * max(1, int(hr.sum()) // 1000)


def test_fused_counts_nonfinite():
    dev = _device()
    a = torch.ones(7, 32, device=dev)
    a[3, 5] = float("nan")
    a[6, 0] = float("inf")
    st = NeuronStats()
    fused.update(_site(PLAIN, 32), Batch(a=a, g=None, valid=None), ProbeContext(Rule(), {}), st, None,
                 block_t=16, block_d=32)
    assert int(st.state["x"]["nonfinite"]) == 2
