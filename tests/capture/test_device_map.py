"""A model dispatched with accelerate (layers on CPU and offloaded to disk) gives the same
statistics as the plain model: FFN probes, site probes (routers), interventions and metrics,
and a checkpointed corpus profile whose state is gathered from the layers' devices."""

from __future__ import annotations

import torch

import workbench as wb
import workbench.metrics as wm
from tests import tiny
from workbench.capture import SiteProbe, active_hooks
from workbench.capture.distributed import compare_runs, profile_corpus


class RouterCounts(SiteProbe):
    """Per router: how often each expert is in a valid token's top-k (ints), and the sum of the
    router's max probability (float64). State on the router's device, like the routing probe."""

    name = "router_counts"
    site_kind = "router"

    def observe(self, site, call):
        logits = call.output[0] if isinstance(call.output, tuple) else call.output
        logits = logits.reshape(-1, logits.shape[-1])
        valid, _ = call.rows(logits.shape[0], logits.device)
        st = self.state.get(site.name)
        if st is None:
            st = self.state[site.name] = {
                "hits": torch.zeros(logits.shape[-1], dtype=torch.int64, device=logits.device),
                "pmax": torch.zeros((), dtype=torch.float64, device=logits.device)}
        top = logits.topk(2, dim=-1).indices
        hit = torch.zeros_like(logits, dtype=torch.int64).scatter_(-1, top, 1)
        p = logits.float().softmax(-1).amax(-1).double()
        if valid is not None:
            hit = hit * valid[:, None]
            p = p * valid
        st["hits"] += hit.sum(0)
        st["pmax"] += p.sum()


def _data(seed=0, b=6, t=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, tiny.VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[3, -5:] = 0  # right padding
    return ids, mask


def _offloaded(family, tmp_path, disk_layers=(1,)):
    """The tiny model with the given decoder layers offloaded to disk, the rest on the CPU."""
    from accelerate import dispatch_model

    model = tiny.build(family)
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    if hasattr(model.model, "rotary_emb"):
        dm["model.rotary_emb"] = "cpu"
    for i in range(len(model.model.layers)):
        dm[f"model.layers.{i}"] = "disk" if i in disk_layers else "cpu"
    model = dispatch_model(model, device_map=dm, offload_dir=str(tmp_path / "offload"))
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert offloaded and all(n.startswith(tuple(f"model.layers.{i}." for i in disk_layers)) for n in offloaded)
    return model


def test_ffn_and_router_probes_on_offloaded_model(tmp_path):
    ids, mask = _data()
    probes = lambda: ["neuron_stats", "abs_sketch", RouterCounts()]  # noqa: E731
    ref = wb.profile(tiny.build("qwen2_moe"), ids, attention_mask=mask, batch_size=4, probes=probes(),
                     progress=False)
    model = _offloaded("qwen2_moe", tmp_path, disk_layers=(1, 2))
    before = active_hooks(model)
    got = wb.profile(model, ids, attention_mask=mask, batch_size=4, probes=probes(), progress=False)
    assert active_hooks(model) == before
    assert any(k.startswith("router_counts/") for k in got.tensors)
    assert compare_runs(ref, got, rtol=0) == []


def test_intervention_and_metric_on_offloaded_model(tmp_path):
    ids, mask = _data(1)
    plain = tiny.build("llama")
    model = _offloaded("llama", tmp_path)
    rule = wb.Rule.magnitude(0.02)
    with torch.no_grad(), wm.intervene(plain, rule) as iv_a:
        a = plain(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), wm.intervene(model, rule) as iv_b:
        b = model(input_ids=ids, attention_mask=mask).logits
    assert iv_a.calls == iv_b.calls == 2
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    pa = wm.perplexity(plain, ids, attention_mask=mask, rule="fat(0.05)")
    pb = wm.perplexity(model, ids, attention_mask=mask, rule="fat(0.05)")
    assert pa == pb


def test_checkpointed_corpus_profile_on_offloaded_model(tmp_path):
    ids, mask = _data(2, b=9)
    ref = wb.profile(tiny.build("mixtral"), ids, attention_mask=mask, batch_size=2,
                     probes=[RouterCounts()], progress=False)
    model = _offloaded("mixtral", tmp_path)
    got = profile_corpus(model, ids, attention_mask=mask, batch_size=2, probes=[RouterCounts()],
                         out=tmp_path / "run", save_every=15, progress=False)
    assert compare_runs(ref, got, rtol=1e-12) == []
    assert compare_runs(ref, wb.Run.load(tmp_path / "run"), rtol=1e-12) == []
