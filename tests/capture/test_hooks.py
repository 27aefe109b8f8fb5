"""Hooks never outlive a capture; nesting and dispatched (device_map / offloaded) models work."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from tests import tiny
from workbench.capture import active_hooks
from workbench.errors import CaptureError


def _ids(seed=0, b=2, t=7):
    return torch.randint(1, tiny.VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_hooks_removed_after_exception():
    model = tiny.build("llama")
    before = active_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with wb.capture(model):
            model(input_ids=_ids())
            raise RuntimeError("boom")
    assert active_hooks(model) == before


def test_hooks_removed_after_keyboard_interrupt():
    model = tiny.build("gpt2")
    before = active_hooks(model)
    with pytest.raises(KeyboardInterrupt):
        with wb.capture(model, rule="fat(0.1)"):
            model(input_ids=_ids())
            raise KeyboardInterrupt
    assert active_hooks(model) == before


def test_hooks_removed_when_forward_fails():
    model = tiny.build("llama")
    before = active_hooks(model)
    with pytest.raises(IndexError):
        with wb.capture(model):
            model(input_ids=torch.full((1, 3), 10_000))  # out-of-vocabulary ids
    assert active_hooks(model) == before


def test_nested_captures_see_the_same_calls():
    model = tiny.build("llama")
    ids = _ids(1)
    with wb.capture(model, rule="zero") as outer:
        model(input_ids=ids)
        with wb.capture(model, rule="fat(0.05)") as inner:
            model(input_ids=ids)
        model(input_ids=ids)
    assert active_hooks(model) == 0
    o = outer.summary().set_index("name")
    i = inner.summary().set_index("name")
    assert (o["tokens"] == 3 * ids.numel()).all()
    assert (i["tokens"] == ids.numel()).all()
    alone = wb.profile(model, ids, rule="fat(0.05)", progress=False).summary().set_index("name")
    assert (i["token_sparsity"] == alone["token_sparsity"]).all()


def test_no_attention_mask_counts_every_token():
    model = tiny.build("qwen2")
    ids = _ids(2, b=3, t=5)
    with wb.capture(model) as run:
        model(ids)  # positional input_ids, no mask
    assert (run.summary()["tokens"] == 15).all()


def test_nan_activations_name_the_layer():
    model = tiny.build("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CaptureError, match=r"layer 1 \(model.layers.1.mlp\)") as err:
        with wb.capture(model):
            model(input_ids=_ids())
    assert active_hooks(model) == 0
    assert err.value.run is not None


def test_capture_on_dispatched_model(tmp_path):
    from accelerate import disk_offload

    ids = _ids(3)
    ref_model = tiny.build("llama")
    ref = wb.profile(ref_model, ids, rule=wb.Rule.magnitude(0.01), progress=False).summary()
    model = tiny.build("llama")
    disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    before = active_hooks(model)
    got = wb.profile(model, ids, rule=wb.Rule.magnitude(0.01), progress=False).summary()
    assert active_hooks(model) == before
    assert got["token_sparsity"].tolist() == ref["token_sparsity"].tolist()
    assert got["max_abs"].tolist() == ref["max_abs"].tolist()


def test_capture_on_device_map_loaded_model(tmp_path):
    model = tiny.build("llama")
    model.save_pretrained(tmp_path / "m")
    loaded = wb.load_model(tmp_path / "m", device_map={"": "cpu"})
    ids = _ids(4)
    a = wb.profile(model, ids, progress=False).summary()
    b = wb.profile(loaded, ids, progress=False).summary()
    assert a["token_sparsity"].tolist() == b["token_sparsity"].tolist()


def test_generate_with_left_padding_excludes_pads():
    model = tiny.build("llama")
    ids = _ids(5, b=2, t=6)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with wb.capture(model) as run:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # prompt: 12 - 3 padded; then 2 new tokens fed per row for the 2 decode steps after the first
    tokens = run.summary()["tokens"].iloc[0]
    assert tokens == 9 + 2 * 2


def test_wb_capture_is_the_function_after_submodule_imports():
    import workbench.capture.probes  # noqa: F401

    assert callable(wb.capture)


def test_model_without_ffn_gives_clear_error():
    model = tiny.build("mamba")
    with pytest.raises(CaptureError, match=r"has SSM mixers and no FFN .*state_scan\(model, ids\)$"):
        with wb.capture(model):
            pass


def test_routed_experts_only_points_to_the_routing_probe():
    """A model whose FFNs are all routed experts: the message names the routing probe, not
    wb.register_adapter (the adapter is known)."""
    model = tiny.build("mixtral")
    with pytest.raises(CaptureError) as exc:
        with wb.capture(model):
            pass
    msg = str(exc.value)
    assert "FFNs are routed experts" in msg and "register_adapter" not in msg
    assert msg.endswith("profile its routing instead: wb.profile(model, docs, probes=[wb.RoutingProbe()])")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_capture_refuses_a_model_an_active_accelerate_handle_swapped(arch):
    """An accelerated model's activations are not where the adapters look (OPT: fc2 and its
    activation hand the fused FFN's output through): capture names the handle and the fix, and
    works again once the handle is off."""
    from tests.accel.test_accelerate import _tiny, _tiny_opt

    model = _tiny() if arch == "llama" else _tiny_opt()
    h = wb.accelerate(model, backend="torch")
    ids = torch.randint(2, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(CaptureError, match=r"swapped by an active wb\.accelerate handle.*\.off\(\)"):
        with wb.capture(model):
            model(input_ids=ids)
    assert active_hooks(model) == 0
    h.off()
    with wb.capture(model) as run:
        model(input_ids=ids)
    assert run.summary() is not None


def test_inputs_embeds_without_a_mask_count_every_position():
    """A forward on inputs_embeds (no input_ids, no mask): the Run's token count agrees with
    the statistics (every position counted), not 0."""
    model = tiny.build("llama")
    ids = torch.randint(1, tiny.VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with wb.capture(model) as run:
        model(inputs_embeds=model.get_input_embeddings()(ids))
    assert run.meta["data"]["n_tokens"] == 14
    assert (run.summary()["tokens"] == 14).all()


def test_topk_above_d_ff_is_refused():
    model = tiny.build("llama")
    d_ff = model.config.intermediate_size
    with pytest.raises(CaptureError, match=rf"topk\(99999\) asks for more neurons than layer 0 .*d_ff = {d_ff}"):
        with wb.capture(model, rule="topk(99999)"):
            model(input_ids=_ids())
    assert active_hooks(model) == 0
    with wb.capture(model, rule=f"topk({d_ff})") as run:  # every neuron: allowed, and says so
        model(input_ids=_ids())
    assert (run.summary()["token_sparsity"] == 0).all()


def test_capture_without_a_forward_call_warns():
    model = tiny.build("llama")
    with pytest.warns(UserWarning, match="saw no forward call"):
        with wb.capture(model) as run:
            pass
    assert run.meta["data"]["forward_calls"] == 0
