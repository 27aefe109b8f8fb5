"""Bricks: FuncScore / predictivity / co-activation against brute force, balanced partitions,
exact restoration after ablation, partition files, and the errors a user can cause."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import workbench as wb
from tests.metrics.helpers import tiny_llama
from workbench.capture import Rule
from workbench.capture.bricks import CoActivation, InstanceScores
from workbench.metrics import bricks as B
from workbench.metrics._data import collect

FUNCS = ["code", "math", "prose"]


class _Tok:
    """Whitespace tokenizer over ints: '3 5 7' -> [3, 5, 7]."""

    pad_token_id = 0
    padding_side = "right"

    def __call__(self, t, **kw):
        ids = [int(w) for w in t.split()]
        ml = kw.get("max_length")
        return {"input_ids": ids[:ml] if kw.get("truncation") and ml else ids}


def _texts(n=18, seed=0, vocab=64):
    """Labelled texts whose token ranges differ by label, of odd lengths."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        f = i % 3
        length = int(torch.randint(3, 14, (1,), generator=g))
        lo = 1 + 20 * f
        ids = torch.randint(lo, lo + 20, (length,), generator=g).tolist()
        texts.append(" ".join(map(str, ids)))
        labels.append(FUNCS[f])
    return texts, labels


# ----------------------------------------------------------------------------- FuncScore
@pytest.mark.parametrize("n,m", [(7, 5), (33, 17)])
def test_average_precision_equals_sklearn_with_ties(n, m):
    g = torch.Generator().manual_seed(n)
    s = torch.randint(0, 4, (n, m), generator=g).double() / 3  # many ties
    s[:, 0] = torch.rand(n, generator=g, dtype=torch.float64)  # and one column without
    y = torch.zeros(n, dtype=torch.bool)
    y[torch.randperm(n, generator=g)[: n // 3 + 1]] = True
    got = B.average_precision(s.float(), y, chunk=4)
    want = [average_precision_score(y.numpy(), s[:, j].float().numpy()) for j in range(m)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_funcscore_and_predictivity_equal_brute_force():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(29, 11, generator=g)
    s[::4, 2] = 0.0
    labels = torch.randint(0, 3, (29,), generator=g)
    labels[:3] = torch.tensor([0, 1, 2])
    fs, pr = B.func_scores(s, labels, 3), B.predictivity(s, labels, 3)
    for f in range(3):
        y = (labels == f).numpy()
        for j in range(11):
            ap = average_precision_score(y, s[:, j].numpy())
            apn = average_precision_score(~y, s[:, j].numpy())
            assert fs[f, j].item() == pytest.approx(ap, abs=1e-12)
            assert pr[f, j].item() == pytest.approx(max(ap, apn), abs=1e-12)


def test_average_precision_needs_both_classes():
    with pytest.raises(B.BricksError, match="both positive and negative"):
        B.average_precision(torch.rand(5, 2), torch.ones(5, dtype=torch.bool))


def test_concentration_is_the_hypergeometric_tail():
    assign = torch.arange(24) % 4
    top = torch.tensor([[0, 4, 8, 1]])  # three in brick 0, one in brick 1
    df = B.concentration(top, assign, 4, ["f"])
    m, size, n = 24, 6, 4
    for b, k in [(0, 3), (1, 1), (2, 0)]:
        want = sum(math.comb(size, i) * math.comb(m - size, n - i) for i in range(k, n + 1)) / math.comb(m, n)
        row = df[df["brick"] == b].iloc[0]
        assert row["top_count"] == k and row["p_value"] == pytest.approx(want, rel=1e-10)


# ----------------------------------------------------------------------------- probes
def _padded(seed=0, b=4, s=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (b, s), generator=g)
    m = torch.ones_like(ids)
    m[0, :4] = 0   # left padding
    m[1, 7:] = 0   # right padding
    m[b - 1, :] = 0  # an empty sequence
    return ids, m


@pytest.mark.parametrize("rule", ["zero", "fat(0.05)"])
def test_coactivation_equals_brute_force(rule):
    model = tiny_llama("relu", d_ff=37)
    batches = [_padded(0), _padded(1, b=3, s=6)]
    probe = CoActivation()
    with wb.capture(model, probes=[probe], rule=rule) as run:
        for ids, m in batches:
            model(input_ids=ids, attention_mask=m)
    rows = collect(model, batches, want_g=True, dtype=torch.float64)
    r = Rule.parse(rule)
    for s in run.meta["sites"]:
        a, gg = rows[s["name"]]["a"], rows[s["name"]].get("g")
        act = r.active(a, gg, layer=s["layer"], gated=True).double()
        want = act.t() @ act
        got = run.tensors[f"coactivation/{s['name']}/counts"]
        assert got.dtype == torch.int64 and torch.equal(got, want.long())
        assert int(run.tensors[f"coactivation/{s['name']}/tokens"]) == a.shape[0]


def test_instance_scores_equal_brute_force_and_keep_labels():
    model = tiny_llama("relu", d_ff=24)
    model.tokenizer = _Tok()
    texts, labels = _texts(10)
    site = B.ffn_sites(model)[0].name
    wants = []  # brute force: every text alone, mean |a| over its tokens
    for t in texts:
        ids = torch.tensor([_Tok()(t)["input_ids"]])
        wants.append((collect(model, [(ids, torch.ones_like(ids))], dtype=torch.float64)[site]["a"].abs().mean(0),
                      ids.shape[1]))
    for side in ("left", "right"):
        probe = InstanceScores(budget=64)
        run = wb.profile(model, texts, labels=labels, probes=[probe], batch_size=4, padding_side=side,
                         progress=False)
        st = {k: run.tensors[f"instance_scores/{site}/{k}"] for k in ("score", "label", "tokens")}
        keep = st["tokens"] > 0
        assert int(keep.sum()) == 10 and int(run.tensors[f"instance_scores/{site}/seen"]) == 10
        for (want, n), lab in zip(wants, labels):
            d = (st["score"][keep].double() - want).abs().amax(1)
            j = int(d.argmin())
            assert d[j] < 1e-5
            assert run.meta["labels"]["names"][int(st["label"][keep][j])] == lab
            assert int(st["tokens"][keep][j]) == n


def test_instance_scores_budget_is_a_sample_shared_by_layers():
    model = tiny_llama("relu", d_ff=24, layers=3)
    model.tokenizer = _Tok()
    texts, labels = _texts(30)
    probe = InstanceScores(budget=7, seed=1)
    run = wb.profile(model, texts, labels=labels, probes=[probe], batch_size=4, progress=False)
    names = [s["name"] for s in run.meta["sites"]]
    toks = [run.tensors[f"instance_scores/{n}/tokens"] for n in names]
    labs = [run.tensors[f"instance_scores/{n}/label"] for n in names]
    keys = [run.tensors[f"instance_scores/{n}/key"] for n in names]
    assert run.tensors[f"instance_scores/{names[0]}/score"].shape == (7, 24)
    assert all((t > 0).all() for t in toks)  # full: 30 instances seen, 7 kept
    for t, la, k in zip(toks[1:], labs[1:], keys[1:]):
        assert torch.equal(t, toks[0]) and torch.equal(la, labs[0]) and torch.equal(k, keys[0])
    # the kept ones are the 7 largest priorities drawn (keys in (0, 1); empty slots are -1)
    assert (keys[0] > 0).all() and int(run.tensors[f"instance_scores/{names[0]}/seen"]) == 30


def test_instance_scores_under_a_rule_keep_the_masked_mean():
    model = tiny_llama("silu", d_ff=16)
    ids, m = _padded(2)
    with wb.capture(model, probes=[InstanceScores(budget=8)], rule="fat(0.1)") as run:
        model(input_ids=ids, attention_mask=m)
    site = run.meta["sites"][0]["name"]
    rows = collect(model, [(ids, m)], want_g=True, dtype=torch.float64)[site]
    masked = rows["a"].abs() * (rows["g"].abs() > 0.1)
    st = {k: run.tensors[f"instance_scores/{site}/{k}"] for k in ("score_rule", "tokens")}
    off = 0
    for i in range(ids.shape[0]):
        n = int(m[i].sum())
        if not n:
            continue
        want = masked[off:off + n].mean(0)
        off += n
        j = int(((st["score_rule"].double() - want).abs().amax(1)).argmin())
        torch.testing.assert_close(st["score_rule"][j].double(), want, atol=1e-5, rtol=1e-5)
        assert int(st["tokens"][j]) == n


# ----------------------------------------------------------------------------- partitions
def _planted(m=48, groups=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randperm(m, generator=g) % groups
    # tokens activate one group at a time, plus noise
    act = torch.zeros(400, m)
    for t in range(400):
        grp = t % groups
        act[t] = ((truth == grp) & (torch.rand(m, generator=g) < 0.7)) | (torch.rand(m, generator=g) < 0.05)
    return truth, (act.t() @ act).long()


def test_coactivation_partition_recovers_planted_groups_and_is_balanced():
    truth, counts = _planted()
    lab, info = B.partition_coactivation(counts, 4)
    assert lab.shape == (48,) and sorted(torch.bincount(lab).tolist()) == [12] * 4
    # same groups up to renaming
    pairs = {(int(a), int(b)) for a, b in zip(lab, truth)}
    assert len(pairs) == 4
    lab2, info2 = B.partition_coactivation(counts, "auto")
    assert info2["k"] == 4 and info2["criterion"] == "max modularity"
    assert torch.bincount(lab2).tolist() == [12] * 4


def test_balanced_assignment_is_optimal():
    rng = np.random.default_rng(0)
    cost = rng.random((6, 3))
    got = B.balanced_assignment(cost)
    best = min(cost[np.arange(6), np.array(p) // 2].sum() for p in itertools.permutations(range(6)))
    assert np.bincount(got).tolist() == [2, 2, 2]
    assert cost[np.arange(6), got].sum() == pytest.approx(best)


def test_modularity_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(9, 9, generator=g, dtype=torch.float64)
    a = a + a.t()
    a.fill_diagonal_(0)
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2])
    w, k = a.sum(), a.sum(1)
    want = sum(float(a[i, j] - k[i] * k[j] / w) for i in range(9) for j in range(9) if lab[i] == lab[j]) / float(w)
    assert B.modularity(a, lab) == pytest.approx(want, abs=1e-12)


def test_weight_partition_is_balanced_and_checks_k():
    model = tiny_llama("relu", d_ff=24)
    site = B.ffn_sites(model)[0]
    lab = B.partition_weights(site, 4)
    assert sorted(torch.bincount(lab).tolist()) == [6] * 4
    with pytest.raises(B.BricksError, match="larger than the layer's 24 neurons"):
        B.partition_weights(site, 48)
    with pytest.raises(B.BricksError, match="does not divide the layer's 24 neurons"):
        B.partition_coactivation(torch.eye(24).long(), 5)


# ----------------------------------------------------------------------------- ablation
def test_ablation_zeroes_the_neurons_and_restores_the_model_exactly():
    model = tiny_llama("relu", d_ff=24)
    ids, m = _padded(4)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=m).logits.clone()
        idx = torch.tensor([1, 5, 7, 20])
        with B.ablate(model, {1: idx}):
            inside = model(input_ids=ids, attention_mask=m).logits.clone()
        after = model(input_ids=ids, attention_mask=m).logits
        assert torch.equal(before, after)
        down = B.ffn_sites(model)[1].down
        w = down.weight.data.clone()
        down.weight.data[:, idx] = 0
        manual = model(input_ids=ids, attention_mask=m).logits
        down.weight.data.copy_(w)
    torch.testing.assert_close(inside, manual, atol=1e-5, rtol=1e-5)
    assert not torch.equal(inside, before)
    with pytest.raises(B.BricksError, match="layer 5 does not exist"):
        with B.ablate(model, {5: idx}):
            pass


# ----------------------------------------------------------------------------- files
def test_partition_roundtrip_and_foreign_model(tmp_path):
    model = tiny_llama("relu", d_ff=24)
    part = B.Partition({0: torch.arange(24) % 4, 1: torch.arange(24) // 6}, "coactivation",
                       B.model_identity(model), {0: ["a", "b", "c", "d"]}, {"k": 4})
    part.save(tmp_path / "p")
    back = B.Partition.load(tmp_path / "p", model)
    assert back.method == "coactivation" and back.names[0] == ["a", "b", "c", "d"]
    assert all(torch.equal(back.assignments[k], part.assignments[k]) for k in (0, 1))
    assert repr(back).startswith("Partition(method='coactivation', model=") and repr(back).endswith(
        "layers=[0, 1], k=4, named=True)")  # one line, not the assignment tensors
    other = tiny_llama("relu", d_ff=24, seed=1)
    with pytest.raises(B.BricksError, match="was made for .* not for this model.*recompute"):
        B.Partition.load(tmp_path / "p", other)
    with pytest.raises(B.BricksError, match="is not a saved partition"):
        B.Partition.load(tmp_path / "nothing")


# ----------------------------------------------------------------------------- the analysis
def test_brick_analysis_end_to_end_and_bad_inputs(tmp_path):
    model = tiny_llama("relu", d_ff=24)
    model.tokenizer = _Tok()
    texts, labels = _texts(18)
    res = B.brick_analysis(model, texts, labels=labels, k=4, seeds=2, batch_size=9, budget=32, layers=[1])
    assert res.functions == FUNCS
    assert sorted(res.partition.assignments) == [1]
    for la, a in res.partition.assignments.items():
        assert torch.bincount(a, minlength=4).tolist() == [6] * 4
        assert torch.bincount(res.baseline.assignments[la], minlength=4).tolist() == [6] * 4
        assert res.funcscore[la].shape == (3, 24)
    assert set(res.ablation["kind"]) == {"brick", "random"}
    assert len(res.summary) == 3 and set(res.top_ablation["target"]) == set(FUNCS) | {"random"}
    assert res.bricks["name"].str.match(r"L\d\.B\d:").all()
    # stored in the run, survives save/load
    path = res.run.save(tmp_path / "run")
    run = wb.Run.load(path)
    from workbench.metrics import table, tensors
    assert len(table(run, "bricks/ablation")) == len(res.ablation)
    assert torch.equal(tensors(run, "bricks/bricks")["assignment/1"], res.partition.assignments[1])

    with pytest.raises(B.BricksError, match="has no labels"):
        B.brick_analysis(model, texts, k=4)
    with pytest.raises(B.BricksError, match="single label"):
        B.brick_analysis(model, texts, labels=["code"] * len(texts), k=4)
    with pytest.raises(B.BricksError, match=r"layer\(s\) \[7\] do not exist"):
        B.brick_analysis(model, texts, labels=labels, layers=[7])
    with pytest.raises(B.BricksError, match="larger than the layer's 24 neurons"):
        B.brick_analysis(model, texts, labels=labels, k=100)
    with pytest.raises(B.BricksError, match="does not divide"):
        B.brick_analysis(model, texts, labels=labels, k=5)
    with pytest.raises(B.BricksError, match=r"layers=\[\]: give some of"):
        B.brick_analysis(model, texts, labels=labels, layers=[])
    with pytest.raises(B.BricksError, match=r"cett_target=1.5: .*\[0, 1\]"):
        B.brick_analysis(model, texts, labels=labels, k=4, cett_target=1.5)


def test_brick_analysis_on_a_silu_model_uses_a_cett_rule():
    model = tiny_llama("silu", d_ff=16, layers=1)
    model.tokenizer = _Tok()
    texts, labels = _texts(12)
    res = B.brick_analysis(model, texts, labels=labels, k=2, seeds=1, batch_size=6, layers=[0],
                           baseline_ablation=False)
    assert res.rule.startswith("magnitude")
    assert 0 in res.funcscore_rule and res.funcscore_rule[0].shape == (3, 16)
