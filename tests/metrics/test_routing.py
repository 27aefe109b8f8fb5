"""Routing tables against brute force from the router outputs; comparison, alignment and the
bad inputs (no router, different token ids, no common tokens, a label that does not exist)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
import workbench.metrics as wm
from tests import tiny
from tests.capture.test_routing_probe import LENGTHS, _brute, _calls, _record, _tokens
from workbench.capture import Capture
from workbench.metrics.routing import RoutingError, sample


def _run(model, calls, budget=64, names=("x", "y", "z")):
    with Capture(model, probes=[wb.RoutingProbe(budget=budget, lengths=LENGTHS)]) as cap:
        for ids, mask, labels in calls:
            cap.set_labels(labels)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    cap.run.meta["labels"] = {"names": list(names)}
    return cap.run


@pytest.mark.parametrize("family,side", [("mixtral", "left"), ("blockffn", "right"), ("deepseek_v3", "left")])
def test_tables_equal_brute_force(family, side):
    model = tiny.build_router(family)
    calls = _calls(side)
    layout, rec, _ = _record(model, calls)
    run = _run(model, calls)
    layers = wm.routing_layers(run).set_index("layer")
    load = wm.routing_load(run)
    cos = wm.coselection(run)
    ds = wm.domain_specialisation(run)
    vs = wm.vocab_specialisation(run, min_count=2)
    cls = wm.routing_cls(run)
    for site in layout.routers:
        toks = _tokens(site, rec[site.name], calls)
        w = _brute(site, toks, 0, LENGTHS)
        n, e, c = w["tokens"], site.n_experts, w["counts"].astype(float)
        row = layers.loc[site.layer]
        assert row.tokens == n
        assert row.load_cv == pytest.approx(np.std(c) / np.mean(c), rel=1e-12)
        assert row.mean_active == pytest.approx(c.sum() / n, rel=1e-12)
        assert row.entropy == pytest.approx(w["entropy"] / n, rel=1e-5)
        assert row.entropy_norm == pytest.approx(w["entropy"] / n / math.log(e), rel=1e-5)
        assert row.margin == pytest.approx(w["margin"] / n, rel=1e-5, abs=1e-7)
        assert row.reuse == pytest.approx(w["reuse_num"] / w["reuse_den"], rel=1e-12)
        assert row.tls == pytest.approx(1 - c.sum() / (n * e), rel=1e-12)
        for j, L in enumerate(LENGTHS):
            want = 1 - w["cls_num"][j] / w["cls_den"][j]
            assert row[f"cls_{L}"] == pytest.approx(want, rel=1e-12)
            got = cls[(cls.layer == site.layer) & (cls.L == L)].cls.item()
            assert got == pytest.approx(want, rel=1e-12)
        d = load[load.layer == site.layer]
        assert d["count"].tolist() == w["counts"].tolist()
        np.testing.assert_allclose(d["load"], c / n)
        np.testing.assert_allclose(d["mass"], w["mass"], rtol=1e-6, atol=1e-6)
        co = cos[cos.layer == site.layer].set_index(["a", "b"])
        for a in range(e):
            for b in range(e):
                if a == b:
                    continue
                cab = w["cosel"][a, b]
                r = co.loc[(a, b)]
                assert r["count"] == cab
                if c[a]:
                    assert r.p_b_given_a == pytest.approx(cab / c[a], rel=1e-12)
                if c[a] and c[b]:
                    assert r.lift == pytest.approx((cab / n) / ((c[a] / n) * (c[b] / n)), rel=1e-12)
        dd = ds[ds.layer == site.layer]
        for li, name in enumerate(("x", "y", "z")):
            nd = sum(1 for call in toks for seq in call for t in seq if t[4] == li)
            got = dd[dd.label == name].sort_values("expert")
            assert (got.tokens == nd).all()
            np.testing.assert_allclose(got.ds, w["label_counts"][li] / nd, rtol=1e-12)
        # VS(v) = max_e N(v -> e) / n_v over ids with n_v >= 2
        nv = {}
        for call in toks:
            for seq in call:
                for t in seq:
                    nv[t[0]] = nv.get(t[0], 0) + 1
        vv = vs[vs.layer == site.layer].set_index("token_id")
        assert sorted(vv.index) == sorted(v for v, k in nv.items() if k >= 2)
        for v in vv.index:
            assert vv.loc[v, "vs"] == pytest.approx(w["vocab_counts"][v].max() / nv[v], rel=1e-12)


def test_run_save_load_keeps_the_tables(tmp_path):
    model = tiny.build_router("olmoe")
    run = _run(model, _calls("left"))
    a = wm.routing_layers(run)
    back = wb.Run.load(run.save(tmp_path / "r"))
    pd.testing.assert_frame_equal(a, wm.routing_layers(back))
    assert sample(back, 0).tokens["rank"].tolist() == list(range(len(sample(back, 0).tokens)))


def test_compare_align_and_difference_on_the_same_tokens():
    calls = _calls("right")
    ra, rb = _run(tiny.build_router("mixtral"), calls), _run(tiny.build_router("blockffn"), calls)
    side = wm.compare_runs(ra, rb, names=("mixtral", "blockffn"))
    assert set(side.metric) >= {"load_cv", "entropy", "reuse", "cls_8"}
    np.testing.assert_allclose(side.difference, side.blockffn - side.mixtral)
    lay = wm.align_layers(ra, rb)
    assert lay.layer_a.tolist() == [0, 1] and lay.layer_b.tolist() == [0, 1]
    al = wm.align_experts(ra, rb, 1, 1)
    assert len(al.table) == 4 and al.table.expert_b.is_unique  # 4 experts of a matched into 7 of b
    n = sum(int(m.sum()) for _, m, _ in calls)
    assert al.tokens == n and -1 <= al.baseline <= al.quality <= 1
    # the assignment is optimal: no other one-to-one matching has a larger total similarity
    from itertools import permutations
    best = max(sum(al.similarity[i, p[i]] for i in range(4)) for p in permutations(range(7), 4))
    assert al.table.similarity.sum() == pytest.approx(best, rel=1e-12)
    xa, xb, toks = wm.token_difference(ra, rb, 1, 1, alignment=al)
    assert xa.shape == xb.shape == (n, 4) and len(toks) == n
    sb = sample(rb, 1)
    for i, j in zip(al.table.expert_a, al.table.expert_b):
        np.testing.assert_array_equal(xb[:, i], sb.weights[:n, j])
    with pytest.raises(RoutingError, match="pass alignment=align_experts"):
        wm.token_difference(ra, rb, 1, 1)


def test_same_model_two_datasets_side_by_side_only():
    model = tiny.build_router("mixtral")
    ra, rb = _run(model, _calls("left")), _run(model, _calls("right"))
    assert len(wm.compare_runs(ra, rb)) > 0
    with pytest.raises(RoutingError, match="same token ids.*compare side by side"):
        wm.token_difference(ra, rb, 0, 0)


def test_no_common_tokens_names_the_fix():
    model = tiny.build_router("mixtral")
    ra = _run(model, _calls("left"))
    g = torch.Generator().manual_seed(3)
    other = [(torch.randint(2, tiny.VOCAB, (2, 5), generator=g) * 0 + 1, torch.ones(2, 5, dtype=torch.long),
              torch.tensor([0, 1]))]
    rb = _run(model, other)
    with pytest.raises(RoutingError, match="no common tokens.*same data"):
        wm.align_experts(ra, rb, 0, 0)


def test_bad_inputs_name_the_fix():
    model = tiny.build_router("mixtral")
    run = _run(model, _calls("left"))
    with pytest.raises(RoutingError, match=r"label\(s\) \['nope'\] are not in this run; its labels are \['x', 'y', 'z'\]"):
        wm.domain_specialisation(run, labels=["nope"])
    with pytest.raises(RoutingError, match="no router at layer 5"):
        wm.coselection(run, layer=5)
    del run.meta["labels"]
    with pytest.raises(RoutingError, match="no data labels: profile with labels="):
        wm.domain_specialisation(run)
    dense = tiny.build("llama")
    with wb.capture(dense) as plain:
        dense(input_ids=torch.tensor([[3, 4]]))
    with pytest.raises(RoutingError, match=r"no routing statistics.*RoutingProbe"):
        wm.routing_layers(plain)
