"""On the GPU machine: a model split over GPUs and the CPU by device_map keeps each layer's probe
state on that layer's device during the capture and equals the model on one device; a world-1
NCCL profile equals the plain profile.

Run there with `WB_KERNEL_TESTS_GPU=1 python -m pytest -m gpu tests/capture/test_gpu_scale.py`.
"""

from __future__ import annotations

import re
import socket

import pytest
import torch

import workbench as wb
from tests import tiny
from tests.capture.test_device_map import RouterCounts
from workbench.capture import Capture
from workbench.capture.distributed import compare_runs, init_distributed, profile_corpus, shutdown

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device machine)")]


def _split_map(model, devices):
    dm = {"model.embed_tokens": devices[0], "model.norm": devices[-1], "lm_head": devices[-1]}
    if hasattr(model.model, "rotary_emb"):
        dm["model.rotary_emb"] = devices[0]
    n = len(model.model.layers)
    for i in range(n):
        dm[f"model.layers.{i}"] = devices[min(i * len(devices) // n, len(devices) - 1)]
    return dm


def test_device_map_state_lives_on_each_layers_device():
    from accelerate import dispatch_model

    devices = [f"cuda:{i}" for i in range(min(torch.cuda.device_count(), 2))]
    if len(devices) == 1:
        devices.append("cpu")
    ids = torch.randint(1, tiny.VOCAB, (4, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    model = tiny.build("qwen2_moe")
    model = dispatch_model(model, device_map=_split_map(model, devices))
    def runs_on(layer):  # a layer offloaded to the CPU keeps meta weights and runs on its hook's device
        hook = getattr(layer, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        return str(torch.device(dev)) if dev is not None else str(next(layer.parameters()).device)

    layer_dev = {i: runs_on(layer) for i, layer in enumerate(model.model.layers)}
    assert len({str(next(layer.parameters()).device) for layer in model.model.layers}) == 2
    probes = [wb.NeuronStats(), RouterCounts()]
    with Capture(model, probes=probes) as cap:
        model(input_ids=ids.to(devices[0]), attention_mask=mask.to(devices[0]))
        for p in probes:
            assert p.state
            for site, st in p.state.items():
                layer = int(re.search(r"layers\.(\d+)\.", site).group(1))
                assert {str(t.device) for t in st.values()} == {layer_dev[layer]}, (p.name, site)
    assert all(t.device.type == "cpu" for t in cap.run.tensors.values())  # gathered at the end
    one = tiny.build("qwen2_moe").to(devices[0])
    with Capture(one, probes=[wb.NeuronStats(), RouterCounts()]) as cap1:
        one(input_ids=ids.to(devices[0]), attention_mask=mask.to(devices[0]))
    a, b = cap1.run.tensors, cap.run.tensors
    assert set(a) == set(b)
    for k in a:  # another device may round a matmul differently: a few counts may flip
        if k.endswith("/tokens"):
            assert torch.equal(a[k], b[k]), k
        elif a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
        else:
            assert int((a[k] - b[k]).abs().sum()) <= max(2, int(a[k].abs().sum()) // 500), k


def test_world1_nccl_profile_equals_plain(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    world = init_distributed("nccl")
    try:
        model = tiny.build("llama").cuda()
        ids = torch.randint(1, tiny.VOCAB, (9, 17), generator=torch.Generator().manual_seed(1))
        ref = wb.profile(model, ids, batch_size=2, probes=["neuron_stats", "abs_sketch"], progress=False)
        got = profile_corpus(model, ids, batch_size=2, probes=["neuron_stats", "abs_sketch"], world=world,
                             progress=False)
        assert got.meta["scale"]["backend"] == "nccl"
        assert compare_runs(ref, got, rtol=1e-12) == []
    finally:
        shutdown(world)
