"""RoutingProbe against a brute-force recomputation (float64 loops) from the router modules'
own outputs, on tiny random configs of every router family, with left and right padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import workbench as wb
from tests import tiny
from workbench.capture import Capture, active_hooks
from workbench.capture.routing import ChunkProbe, RoutingProbe, decode_router_output
from workbench.errors import AdapterError, CaptureError

LENGTHS = (1, 2, 3, 8)


def _calls(side: str):
    """Two forward calls (ids, mask, labels) with padding on `side` and a sequence of 2 tokens."""
    g = torch.Generator().manual_seed(7 if side == "left" else 8)
    out = []
    for b, t in ((3, 13), (2, 9)):
        ids = torch.randint(2, tiny.VOCAB, (b, t), generator=g)
        mask = torch.ones_like(ids)
        if side == "left":
            mask[0, :5] = 0
            mask[-1, : t - 2] = 0
        else:
            mask[0, -4:] = 0
            mask[-1, 2:] = 0
        labels = torch.tensor([i % 3 for i in range(b)])
        out.append((ids, mask, labels))
    return out


def _record(model, calls):
    """Router outputs per layer and call, through plain hooks (independent of the capture)."""
    layout = wb.locate(model)
    rec = {r.name: [] for r in layout.routers}
    gates = {r.name: [] for r in layout.routers if r.shared_gate is not None}
    hs = [r.module.register_forward_hook(lambda m, a, o, n=r.name: rec[n].append(o)) for r in layout.routers]
    hs += [r.shared_gate.register_forward_hook(lambda m, a, o, n=r.name: gates[n].append(o))
           for r in layout.routers if r.shared_gate is not None]
    with torch.no_grad():
        for ids, mask, _ in calls:
            model(input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    return layout, rec, gates


def _tokens(site, outs, calls):
    """Per call: list over sequences of [(token id, selected set, weights {e: w}, p float64)]
    for the valid tokens in order, decoded by hand from the raw router output."""
    e = site.n_experts
    res = []
    for o, (ids, mask, labels) in zip(outs, calls):
        b, t = ids.shape
        if isinstance(o, tuple):
            logits = o[0].double().reshape(b * t, e).numpy()
            w = o[1].double().reshape(b * t, -1).numpy()
            idx = o[2].reshape(b * t, -1).numpy()
            if site.kind == "sigmoid_topk":
                s = 1 / (1 + np.exp(-logits))
                p = s / s.sum(1, keepdims=True)
            else:
                z = np.exp(logits - logits.max(1, keepdims=True))
                p = z / z.sum(1, keepdims=True)
            rows = [(set(idx[i].tolist()), dict(zip(idx[i].tolist(), w[i].tolist())), p[i]) for i in range(b * t)]
        else:
            a = o.double().reshape(b * t, e).numpy()
            rows = []
            for i in range(b * t):
                sel = {j for j in range(e) if a[i, j] != 0}
                tot = a[i].clip(0).sum()
                rows.append((sel, {j: a[i, j] for j in sel}, a[i].clip(0) / tot if tot > 0 else np.zeros(e)))
        seqs = []
        for r in range(b):
            seqs.append([(int(ids[r, j]), *rows[r * t + j], int(labels[r])) for j in range(t) if mask[r, j]])
        res.append(seqs)
    return res


def _brute(site, per_call, budget, lengths):
    e = site.n_experts
    toks = [tok for call in per_call for seq in call for tok in seq]
    counts = np.zeros(e, np.int64)
    mass = np.zeros(e)
    cosel = np.zeros((e, e), np.int64)
    hist = np.zeros(e + 1, np.int64)
    ent = marg = 0.0
    lab = np.zeros((3, e), np.int64)
    vocab = np.zeros((tiny.VOCAB, e), np.int64)
    for tid, sel, w, p, label in toks:
        for a in sel:
            counts[a] += 1
            mass[a] += w[a]
            lab[label, a] += 1
            vocab[tid, a] += 1
            for b2 in sel:
                cosel[a, b2] += 1
        hist[len(sel)] += 1
        ent -= sum(x * math.log(x) for x in p if x > 0)
        top = sorted(p, reverse=True)
        marg += top[0] - top[1]
    rnum, rden = 0.0, 0
    cls_num, cls_den = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    for call in per_call:
        for seq in call:
            for i in range(len(seq) - 1):
                if seq[i][1]:
                    rnum += len(seq[i][1] & seq[i + 1][1]) / len(seq[i][1])
                    rden += 1
            for j, L in enumerate(lengths):
                for wdx in range(len(seq) // L):
                    union = set().union(*(tok[1] for tok in seq[wdx * L:(wdx + 1) * L]))
                    cls_num[j] += len(union)
                    cls_den[j] += e
    sample = toks[:budget]
    return dict(tokens=len(toks), counts=counts, mass=mass, cosel=cosel, active_hist=hist, entropy=ent,
                margin=marg, reuse_num=rnum, reuse_den=rden, cls_num=cls_num, cls_den=cls_den,
                label_counts=lab, vocab_counts=vocab, sample=sample)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", tiny.ALL_ROUTER_FAMILIES)
def test_routing_probe_equals_brute_force(family, side):
    model = tiny.build_router(family)
    calls = _calls(side)
    layout, rec, gates = _record(model, calls)
    budget = 20  # shorter than the data: the sample is the first 20 valid tokens
    probe = RoutingProbe(budget=budget, lengths=LENGTHS)
    before = active_hooks(model)
    with Capture(model, probes=[probe]) as cap:
        for ids, mask, labels in calls:
            cap.set_labels(labels)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    assert active_hooks(model) == before
    run = cap.run
    for site in layout.routers:
        want = _brute(site, _tokens(site, rec[site.name], calls), budget, LENGTHS)
        got = {k[len(f"routing/{site.name}/"):]: v for k, v in run.tensors.items()
               if k.startswith(f"routing/{site.name}/")}
        assert int(got["tokens"]) == want["tokens"]
        for f in ("counts", "cosel", "active_hist", "cls_num", "cls_den"):
            assert got[f].tolist() == want[f].tolist(), f
        assert int(got["reuse_den"]) == want["reuse_den"]
        assert float(got["reuse_num"]) == pytest.approx(want["reuse_num"], rel=1e-12)
        np.testing.assert_allclose(got["mass"].numpy(), want["mass"], rtol=1e-6, atol=1e-6)
        assert float(got["entropy"]) == pytest.approx(want["entropy"], rel=1e-5)
        assert float(got["margin"]) == pytest.approx(want["margin"], rel=1e-5, abs=1e-6)
        assert got["label_counts"].tolist() == want["label_counts"].tolist()
        assert got["vocab_counts"].tolist() == want["vocab_counts"].tolist()
        # the token sample equals the brute-force selection at the sampled positions
        s = want["sample"]
        assert got["sample_rank"].tolist() == list(range(budget))
        assert got["sample_token"].tolist() == [tok[0] for tok in s]
        assert got["sample_label"].tolist() == [tok[4] for tok in s]
        for i, tok in enumerate(s):
            assert set(torch.nonzero(got["sample_selected"][i]).flatten().tolist()) == tok[1]
            w = got["sample_weights"][i]
            for a, val in tok[2].items():
                assert float(w[a]) == pytest.approx(val, rel=1e-6, abs=1e-7)
        if site.shared_gate is not None:
            want_g = sum(1 / (1 + math.exp(-float(o.reshape(-1)[r * ids.shape[1] + j])))
                         for o, (ids, mask, _) in zip(gates[site.name], calls)
                         for r in range(ids.shape[0]) for j in range(ids.shape[1]) if mask[r, j])
            assert float(got["shared_gate"]) == pytest.approx(want_g, rel=1e-9)
            assert int(got["shared_gate_tokens"]) == want["tokens"]


def test_vocab_tokens_and_positions():
    model = tiny.build_router("mixtral")
    calls = _calls("left")
    probe = RoutingProbe(budget=64)
    with Capture(model, probes=[probe]) as cap:
        for ids, mask, _ in calls:
            model(input_ids=ids, attention_mask=mask)
    name = cap.run.meta["routers"][0]["name"]
    vt = cap.run.tensors[f"routing/{name}/vocab_tokens"]
    want = torch.zeros(tiny.VOCAB, dtype=torch.int64)
    for ids, mask, _ in calls:
        want.index_add_(0, ids[mask.bool()], torch.ones(int(mask.sum()), dtype=torch.int64))
    assert vt.tolist() == want.tolist()
    pos = cap.run.tensors[f"routing/{name}/sample_pos"]
    seq = cap.run.tensors[f"routing/{name}/sample_seq"]
    n = sum(int(m.sum()) for _, m, _ in calls)
    assert (pos[:n] >= 0).all() and (pos[n:] == -1).all()
    lens = [int(m[r].sum()) for _, m, _ in calls for r in range(m.shape[0])]
    assert seq[:n].tolist() == [i for i, L in enumerate(lens) for _ in range(L)]
    assert pos[:n].tolist() == [j for L in lens for j in range(L)]


def test_merge_equals_one_capture():
    model = tiny.build_router("olmoe")
    calls = _calls("right")
    whole, a, b = RoutingProbe(budget=12), RoutingProbe(budget=12), RoutingProbe(budget=12)
    with Capture(model, probes=[whole]) as cap:
        for ids, mask, labels in calls:
            cap.set_labels(labels)
            model(input_ids=ids, attention_mask=mask)
    for probe, part in ((a, calls[:1]), (b, calls[1:])):
        with Capture(model, probes=[probe]) as cap:
            for ids, mask, labels in part:
                cap.set_labels(labels)
                model(input_ids=ids, attention_mask=mask)
    a.merge(b)
    merged = a.state_dict()
    assert merged.keys() == whole.state_dict().keys()
    for k, v in whole.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-6)
        else:
            assert merged[k].tolist() == v.tolist(), k


def _assert_states_equal(got, want):
    assert got.keys() == want.keys()
    for k, v in want.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
        else:
            assert got[k].tolist() == v.tolist(), k


def test_state_round_trip_and_counting_on_after_a_merge():
    """state_dict -> load_state_dict gives the same state (checkpoints, distributed folds), and a
    probe that merged another one counts on correctly in a later capture."""
    model = tiny.build_router("qwen2_moe")
    calls = _calls("left") + _calls("right")
    whole, a, b = RoutingProbe(budget=30), RoutingProbe(budget=30), RoutingProbe(budget=30)
    with Capture(model, probes=[whole]) as cap:
        for ids, mask, labels in calls:
            cap.set_labels(labels)
            model(input_ids=ids, attention_mask=mask)
    for probe, part in ((a, calls[:1]), (b, calls[1:2])):
        with Capture(model, probes=[probe]) as cap:
            for ids, mask, labels in part:
                cap.set_labels(labels)
                model(input_ids=ids, attention_mask=mask)
    loaded = RoutingProbe(budget=30)
    loaded.load_state_dict(b.state_dict())
    _assert_states_equal(loaded.state_dict(), b.state_dict())
    a.merge(loaded)
    with Capture(model, probes=[a]) as cap:  # the merged state goes back into the stacked state
        for ids, mask, labels in calls[2:]:
            cap.set_labels(labels)
            model(input_ids=ids, attention_mask=mask)
    _assert_states_equal(a.state_dict(), whole.state_dict())


def test_routers_counted_once_per_model_call(monkeypatch):
    """Every router of a forward call is decoded and counted in one batch, at the end of the call."""
    from workbench.capture import routing

    model = tiny.build_router("mixtral")
    n_routers = len(wb.locate(model).routers)
    assert n_routers >= 2
    seen = []
    real = routing.decode_router_output
    monkeypatch.setattr(routing, "decode_router_output", lambda site, out: seen.append(out[0].shape) or real(site, out))
    with wb.capture(model, probes=[RoutingProbe()]):
        for ids, mask, _ in _calls("left"):
            model(input_ids=ids, attention_mask=mask)
    assert len(seen) == 2  # two forward calls
    assert [s[0] for s in seen] == [n_routers * 3 * 13, n_routers * 2 * 9]


def test_sample_text_pieces_from_the_tokenizer():
    class Tok:
        def decode(self, ids):
            return f"t{ids[0]}"

    model = tiny.build_router("mixtral")
    model.tokenizer = Tok()
    ids = torch.tensor([[5, 6, 7]])
    with wb.capture(model, probes=[RoutingProbe(budget=4)]) as run:
        model(input_ids=ids)
    assert run.meta["routing"]["sample_text"] == ["t5", "t6", "t7", ""]


def test_hooks_removed_after_exception():
    model = tiny.build_router("deepseek_v3")
    before = active_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with wb.capture(model, probes=[RoutingProbe(), ChunkProbe("experts")]):
            model(input_ids=torch.tensor([[3, 4, 5]]))
            raise RuntimeError("boom")
    assert active_hooks(model) == before


def test_model_without_router_names_the_fix():
    model = tiny.build("llama")
    with pytest.raises(CaptureError, match="no router the adapters know.*register_adapter"):
        with wb.capture(model, probes=[RoutingProbe()]):
            pass


def test_unknown_router_output_names_what_to_register():
    class Site:
        name, kind, n_experts, top_k = "m.gate", "topk_softmax", 4, 2

    with pytest.raises(AdapterError, match=r"returned a dict.*Register an adapter"):
        decode_router_output(Site(), {"logits": 1})
    Site.kind = "mystery"
    with pytest.raises(AdapterError, match="router_kind 'mystery'.*register an adapter"):
        decode_router_output(Site(), torch.zeros(3, 4))


def test_plain_linear_gate_output_is_top_k_of_softmax():
    class Site:
        name, kind, n_experts, top_k = "m.gate", "topk_softmax", 4, 2

    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    out = decode_router_output(Site(), logits)
    assert out.selected.tolist() == [[False, True, True, False]]
    torch.testing.assert_close(out.weights.sum(), torch.softmax(logits, -1)[0, 1:3].sum())


def test_too_many_labels_names_the_fix():
    model = tiny.build_router("mixtral")
    with pytest.raises(CaptureError, match="max_labels=2"):
        with Capture(model, probes=[RoutingProbe(max_labels=2)]) as cap:
            cap.set_labels(torch.tensor([0, 5]))
            model(input_ids=torch.tensor([[3, 4], [5, 6]]))


def test_nonfinite_router_scores_name_the_layer():
    model = tiny.build_router("blockffn")
    with torch.no_grad():
        model.model.layers[1].mlp.router.proj.weight[0, 0] = float("nan")
    with pytest.raises(CaptureError, match=r"layer 1 .*non-finite router scores"):
        with wb.capture(model, probes=[RoutingProbe()]):
            model(input_ids=torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_vocab_counts_by_next_token(side):
    model = tiny.build_router("gpt_oss")
    calls = _calls(side)
    layout, rec, _ = _record(model, calls)
    probe = RoutingProbe(budget=0, vocab="next")
    with Capture(model, probes=[probe]) as cap:
        for ids, mask, _ in calls:
            model(input_ids=ids, attention_mask=mask)
    assert cap.run.meta["routing"]["vocab"] == "next"
    for site in layout.routers:
        want = np.zeros((tiny.VOCAB, site.n_experts), np.int64)
        for call in _tokens(site, rec[site.name], calls):
            for seq in call:  # padding is contiguous here: the next position is the next valid token
                for tok, nxt in zip(seq[:-1], seq[1:]):
                    for a in tok[1]:
                        want[nxt[0], a] += 1
        got = cap.run.tensors[f"routing/{site.name}/vocab_counts"]
        assert got.tolist() == want.tolist()
    with pytest.raises(CaptureError, match="vocab must be 'input'"):
        RoutingProbe(vocab="prev")


def test_router_never_called_names_the_fix():
    model = tiny.build_router("mixtral")
    block = model.model.layers[1].mlp
    block.forward = lambda hidden_states: hidden_states  # routing done elsewhere: the gate is never called
    with pytest.raises(CaptureError, match=r"model.layers.1.mlp.gate'\] were never called during 1 forward"):
        with wb.capture(model, probes=[RoutingProbe()]):
            model(input_ids=torch.tensor([[3, 4, 5]]))
