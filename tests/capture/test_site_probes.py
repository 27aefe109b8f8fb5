"""Site probes (routers, mixers, the model call) ride on the same capture hooks as FFN probes."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from tests import tiny
from workbench.capture import HookPoint, SiteProbe, active_hooks
from workbench.errors import CaptureError


class RouterRows(SiteProbe):
    """Test probe: counts valid router rows and keeps the router inputs' valid rows."""

    name = "router_rows"
    site_kind = "router"

    def __init__(self):
        super().__init__()
        self.seen = {}

    def observe(self, site, call):
        x = call.args[0]
        x2 = x.reshape(-1, x.shape[-1])
        valid, tok = call.rows(x2.shape[0], x2.device)
        st = self.state.setdefault(site.name, {"rows": torch.zeros((), dtype=torch.int64)})
        st["rows"] += int(valid.sum()) if valid is not None else x2.shape[0]
        self.seen.setdefault(site.name, []).append((x2 if valid is None else x2[valid]).clone())


class ModelLogits(SiteProbe):
    name = "model_logits"
    site_kind = "model"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def points(self, site):
        return [HookPoint(site.module, "logits", "post")]

    def observe(self, site, call):
        assert call.output.logits.shape[:2] == call.input_ids.shape
        self.calls += 1


def _ids(b=2, t=9, seed=0):
    return torch.randint(1, tiny.VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("side", ["left", "right"])
def test_router_probe_sees_only_valid_rows(side):
    model = tiny.build("mixtral")
    ids = _ids()
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[1, -4:] = 0
    before = active_hooks(model)
    probe = RouterRows()
    with wb.capture(model, probes=[probe]) as run:
        model(input_ids=ids, attention_mask=mask)
    assert active_hooks(model) == before
    assert run.meta["data"]["n_tokens"] == int(mask.sum())
    names = [r["name"] for r in run.meta["routers"]]
    assert names and all(int(run.tensors[f"router_rows/{n}/rows"]) == int(mask.sum()) for n in names)
    # the kept rows are exactly the router inputs at valid positions (brute force via a plain hook)
    brute = {}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: brute.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
          for n, m in model.named_modules() if n in names]
    model(input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    for n in names:
        torch.testing.assert_close(probe.seen[n][0], brute[n][mask.reshape(-1) != 0])
    assert run.summary().empty  # no FFN probe: no per-FFN table


def test_site_probe_hooks_removed_after_exception():
    model = tiny.build("olmoe")
    before = active_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with wb.capture(model, probes=[RouterRows(), ModelLogits()]):
            model(input_ids=_ids())
            raise RuntimeError("boom")
    assert active_hooks(model) == before


def test_model_site_and_ffn_probes_together():
    model = tiny.build("llama")
    p = ModelLogits()
    with wb.capture(model, probes=["neuron_stats", p]) as run:
        model(input_ids=_ids())
        model(input_ids=_ids(seed=1))
    assert p.calls == 2
    assert len(run.summary()) == 2


def test_router_probe_on_a_model_without_router_names_the_fix():
    model = tiny.build("llama")
    with pytest.raises(CaptureError, match="no router the adapters know.*register_adapter"):
        with wb.capture(model, probes=[RouterRows()]):
            pass


class LabelRows(SiteProbe):
    """Test probe: valid router rows per data label."""

    name = "label_rows"

    def observe(self, site, call):
        x = call.args[0]
        n = x.reshape(-1, x.shape[-1]).shape[0]
        valid, _ = call.rows(n, x.device)
        lab = call.row_labels(n, x.device)
        st = self.state.setdefault(site.name, {"per_label": torch.zeros(3, dtype=torch.int64)})
        keep = lab[valid] if valid is not None else lab
        st["per_label"] += torch.bincount(keep, minlength=3)


class _Tok:
    """A whitespace tokenizer over ints: text '3 5 7' -> [3, 5, 7] (empty text -> no tokens)."""

    pad_token_id = 0
    padding_side = "right"

    def __call__(self, t, **kw):
        return {"input_ids": [int(w) for w in t.split()]}


@pytest.mark.parametrize("side", ["left", "right"])
def test_profile_labels_follow_their_rows_through_batches_and_dropped_texts(side):
    model = tiny.build("mixtral")
    texts = ["3 4 5", "", "6 7", "8 9 10 11 12", "13", "14 15 16"]
    labels = ["code", "math", "prose", "code", "prose", "math"]
    probe = LabelRows()
    run = wb.profile(model, texts, tokenizer=_Tok(), labels=labels, probes=[probe],
                     batch_size=2, padding_side=side, progress=False)
    assert run.meta["labels"]["names"] == ["code", "math", "prose"]
    want = torch.tensor([3 + 5, 3, 2 + 1])  # tokens per label; the empty "math" text is dropped
    for r in run.meta["routers"]:
        assert run.tensors[f"label_rows/{r['name']}/per_label"].tolist() == want.tolist()
    assert run.meta["data"]["n_tokens"] == 14


def test_profile_labels_count_mismatch_names_the_fix():
    model = tiny.build("mixtral")
    with pytest.raises(CaptureError, match="2 labels for 3 sequences"):
        wb.profile(model, ["3 4", "5", "6"], tokenizer=_Tok(), labels=["a", "b"], progress=False)
