"""Compiled on the GPU machine: a capture on CUDA (fused Triton path) equals the CPU torch path.

Run there with `WB_KERNEL_TESTS_GPU=1 python -m pytest -m gpu tests/capture`.
"""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from tests import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
@pytest.mark.parametrize("rule", ["zero", "fat(0.02)", "magnitude"])
def test_cuda_capture_matches_cpu(family, rule):
    rule = wb.Rule.magnitude(0.01) if rule == "magnitude" else rule
    model = tiny.build(family)
    ids = torch.randint(1, tiny.VOCAB, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    probes = ["neuron_stats", "abs_sketch"]
    cpu = wb.profile(model, ids, attention_mask=mask, rule=rule, probes=probes, progress=False)
    gpu = wb.profile(model.cuda(), ids, attention_mask=mask, rule=rule, probes=probes, progress=False)
    for site in cpu.sites:
        a, b = cpu.neuron_stats(site["name"]), gpu.neuron_stats(site["name"])
        assert int(a["tokens"]) == int(b["tokens"])
        # GPU matmuls round differently: counts may differ for values sitting on the threshold
        diff = (a["active"] - b["active"]).abs().sum().item()
        assert diff <= max(2, int(a["active"].sum()) // 500), (site["name"], diff)
        torch.testing.assert_close(b["abs_sum"], a["abs_sum"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b["abs_max"], a["abs_max"], rtol=1e-3, atol=1e-5)
        ha = cpu.get("abs_sketch", site["name"], "hist")
        hb = gpu.get("abs_sketch", site["name"], "hist")
        assert int(ha.sum()) == int(hb.sum())


def test_fused_path_is_used_on_cuda(monkeypatch):
    from workbench.capture import fused

    calls = []
    real = fused.update
    monkeypatch.setattr(fused, "update", lambda *a, **k: (calls.append(1), real(*a, **k)))
    model = tiny.build("llama").cuda()
    wb.profile(model, torch.randint(1, tiny.VOCAB, (2, 8)), progress=False)
    assert calls


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "blockffn"])
def test_routing_probe_cuda_graphs_equal_eager(family):
    """RoutingProbe's CUDA-graph replays (a call shape seen twice) count exactly what the eager
    path counts, through shape changes, labels and a merge."""
    from tests.capture.test_routing_probe import _assert_states_equal, _calls
    from workbench.capture import Capture
    from workbench.capture.routing import RoutingProbe

    model = tiny.build_router(family).cuda()
    calls = (_calls("left") + _calls("right")) * 2  # each shape three or more times
    states = []
    for graphs in (False, True):
        probe = RoutingProbe(budget=40, cuda_graphs=graphs)
        with Capture(model, probes=[probe]) as cap:
            for ids, mask, labels in calls:
                cap.set_labels(labels)
                model(input_ids=ids.cuda(), attention_mask=mask.cuda())
        states.append({k: v.cpu() for k, v in probe.state_dict().items()})
        if graphs:
            assert probe.__dict__.get("_graphs"), "no CUDA graph was made"
            assert not probe.__dict__.get("_graphs_failed")
    _assert_states_equal(states[1], states[0])


def test_state_probe_host_linalg_equals_device_on_cuda():
    """On CUDA the effective ranks come from the host thread pool (pinned copies, events); they
    equal torch's CUDA eigvalsh path, and every other statistic is untouched."""
    from workbench.metrics.state import state_scan

    model = tiny.build("mamba2").cuda()
    ids = torch.randint(2, tiny.VOCAB, (2, 96), generator=torch.Generator().manual_seed(4))
    runs = [state_scan(model, ids, bucket=16, chunk=32, host_linalg=h) for h in (False, True)]
    a, b = runs[0].tensors, runs[1].tensors
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-9, atol=1e-9, msg=k)
