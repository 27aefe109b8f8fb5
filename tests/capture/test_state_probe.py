"""StateProbe / state_scan: bucket statistics against brute force from the full states (float64),
chunked vs unchunked runs, merging, hooks removed, and the bad inputs of issue 25."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import tiny
from workbench.capture import active_hooks
from workbench.capture.state import StateProbe, default_edges
from workbench.errors import CaptureError
from workbench.metrics.state import (
    StateError,
    collapse,
    drift_summary,
    head_stats,
    histograms,
    layer_stats,
    state_drift,
    state_scan,
)

BK = 8
TOTAL = 37  # odd: a partial last bucket


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def case(request):
    model = tiny.build(request.param)
    ids = torch.randint(2, tiny.VOCAB, (3, TOTAL), generator=torch.Generator().manual_seed(7))
    return request.param, model, ids


def _states_after(model, ids, t):
    """Brute force: one forward over the first t tokens; the cache's SSM state per layer."""
    from workbench._compat import output_cache, recurrent_state

    out = model(input_ids=ids[:, :t], use_cache=True)
    c = output_cache(out, old="cache_params")
    hs = []
    for i in range(model.config.num_hidden_layers):
        h = recurrent_state(c, i).double()
        hs.append(h[:, None] if h.dim() == 3 else h)  # Mamba: one head
    return hs


def _brute(model, ids, fam):
    """Reference head statistics (float64) at every bucket end, from the full states, and the
    token means of dt / decay / x / B from one full forward (plain hooks, test-side only)."""
    ends = [min(e, TOTAL) for e in range(BK, TOTAL + BK, BK)]
    states = [_states_after(model, ids, t) for t in ends]
    rows = {}
    for li in range(model.config.num_hidden_layers):
        prev = None
        for j in range(len(ends)):
            h = states[j][li]  # [b, H, P, N]
            v = h.permute(1, 0, 2, 3).reshape(h.shape[1], -1)
            r = {"mean": v.mean(1), "rms": v.pow(2).mean(1).sqrt(), "var": v.var(1, unbiased=False),
                 "median": v.median(1).values}  # the batch's pooled median (one call)
            if prev is not None:
                cos = F.cosine_similarity(h.flatten(2), prev.flatten(2), dim=-1)  # [b, H]
                r["cos"] = cos.mean(0)
            cn = h.pow(2).sum(-2).sqrt()
            r["usage"] = (cn > 1e-2 * cn.amax(-1, keepdim=True)).double().mean(-1).mean(0)
            sv = torch.linalg.svdvals(h)
            p = sv / sv.sum(-1, keepdim=True)
            r["erank"] = torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(-1)).mean(0)
            rows[(li, j)] = r
            prev = h
    # token means through the mixers' own projections on one full forward
    seen = {}
    hooks = []
    for li, layer in enumerate(model.backbone.layers):
        mix = layer.mixer
        mod = mix.in_proj if fam == "mamba2" else mix.x_proj
        hooks.append(mod.register_forward_hook(lambda m, a, o, li=li: seen.__setitem__(li, (a[0], o))))
    model(input_ids=ids)
    for hd in hooks:
        hd.remove()
    tok = {}
    for li, layer in enumerate(model.backbone.layers):
        mix = layer.mixer
        a, o = (t.double() for t in seen[li])
        if fam == "mamba2":
            H, P, N = mix.num_heads, mix.head_dim, mix.ssm_state_size
            xbc = o[..., mix.intermediate_size: mix.intermediate_size + mix.conv_dim]
            conv = F.conv1d(xbc.transpose(1, 2), mix.conv1d.weight.double(), mix.conv1d.bias.double(),
                            padding=mix.conv_kernel_size - 1, groups=mix.conv_dim)[..., :TOTAL]
            xbc = F.silu(conv).transpose(1, 2)
            dt = F.softplus(o[..., -H:] + mix.dt_bias.double())
            dec = torch.exp(dt * -torch.exp(mix.A_log.double()))
            x = xbc[..., : H * P].reshape(*xbc.shape[:2], H, P).mean(-1)
            B = xbc[..., H * P: H * P + N].mean(-1, keepdim=True).expand(-1, -1, H)
        else:
            r, N = mix.time_step_rank, mix.ssm_state_size
            dtf = F.softplus(F.linear(o[..., :r], mix.dt_proj.weight.double(), mix.dt_proj.bias.double()))
            dec = torch.exp(dtf[..., None] * -torch.exp(mix.A_log.double())).mean((-1, -2))[..., None]
            dt = dtf.mean(-1, keepdim=True)
            x = a.mean(-1, keepdim=True)
            B = o[..., r: r + N].mean(-1, keepdim=True)
        for j in range(len(ends)):
            s = slice(j * BK, min((j + 1) * BK, TOTAL))
            tok[(li, j)] = {"dt": dt[:, s].mean((0, 1)), "decay": dec[:, s].mean((0, 1)),
                            "x": x[:, s].mean((0, 1)), "B": B[:, s].mean((0, 1))}
    logits = model(input_ids=ids).logits.double()
    nll = -F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    loss = [float(nll[:, j * BK: min((j + 1) * BK, TOTAL - 1)].mean()) for j in range(len(ends))]
    return rows, tok, loss


@torch.no_grad()
def test_bucket_statistics_equal_brute_force(case):
    fam, model, ids = case
    before = active_hooks(model)
    run = state_scan(model, ids, bucket=BK)
    assert active_hooks(model) == before
    rows, tok, loss = _brute(model, ids, fam)
    df = head_stats(run)
    assert df.bucket.max() == len(loss) - 1
    for (li, j), ref in rows.items():
        got = df[(df.layer == li) & (df.bucket == j)].sort_values("head")
        for k, v in {**ref, **tok[(li, j)]}.items():
            np.testing.assert_allclose(got[k].to_numpy(), v.numpy(), rtol=2e-4, atol=1e-6, err_msg=f"{fam} {k} L{li} b{j}")
        if j == 0:
            assert got["cos"].isna().all()
    ls = layer_stats(run)
    np.testing.assert_allclose(ls[ls.layer == 0].loss.to_numpy(), loss, rtol=1e-5)


@torch.no_grad()
def test_chunked_and_unchunked_agree():
    model = tiny.build("mamba2")
    ids = torch.randint(2, tiny.VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))
    cols = ["mean", "var", "rms", "median", "cos", "usage", "erank", "dt", "decay", "x", "B"]
    ref = head_stats(state_scan(model, ids, bucket=BK, chunk=64))  # one forward, inner states by recurrence
    for chunk in (BK, 3 * BK, 32):
        got = head_stats(state_scan(model, ids, bucket=BK, chunk=chunk))
        np.testing.assert_allclose(got[cols].to_numpy(), ref[cols].to_numpy(), rtol=1e-4, atol=1e-6)
    # sequences one at a time (two captures merged) agree with one batch
    from workbench.capture.core import Capture  # noqa: F401  (merge goes through the probe API)

    a = StateProbe(bucket=BK)
    b = StateProbe(bucket=BK)
    import workbench as wb

    for p, x in ((a, ids[:1]), (b, ids[1:])):
        with wb.capture(model, probes=[p]):
            model(input_ids=x, use_cache=True)
    a.merge(b)
    one = StateProbe(bucket=BK)
    with wb.capture(model, probes=[one]):
        model(input_ids=ids, use_cache=True)
    for k, v in one.state_dict().items():
        if "med" not in k:  # the median is an estimate: mean of per-call medians
            torch.testing.assert_close(a.state_dict()[k].double(), v.double(), rtol=1e-5, atol=1e-6)


def test_host_linalg_equals_the_device_path():
    """The effective ranks computed on the host thread pool (the CUDA path) equal the in-line
    ones, through several calls, a merge and a state read mid-run."""
    import workbench as wb

    model = tiny.build("mamba2")
    ids = torch.randint(2, tiny.VOCAB, (2, 96), generator=torch.Generator().manual_seed(4))
    states = []
    for host in (False, True):
        a, b = StateProbe(bucket=BK, host_linalg=host), StateProbe(bucket=BK, host_linalg=host)
        for p, x in ((a, ids[:1]), (b, ids[1:])):
            with wb.capture(model, probes=[p]):
                for s in range(0, 96, 32):  # three calls: more than the pool's queue depth
                    model(input_ids=x[:, : s + 32], use_cache=True)
                    if s == 32:
                        p.state_dict()  # a read mid-run folds what is pending
        a.merge(b)
        states.append(a.state_dict())
    assert states[1].keys() == states[0].keys()
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=0, msg=k)


def test_histograms_and_collapse():
    model = tiny.build("mamba2")
    ids = torch.randint(2, tiny.VOCAB, (2, 48), generator=torch.Generator().manual_seed(5))
    run = state_scan(model, ids, bucket=BK, chunk=16, hist_positions=(8, 40))
    h = histograms(run)
    assert set(h.position) == {8, 40}
    ref = _states_after(model, ids, 40)[1].float().reshape(-1)
    e = default_edges()
    want = torch.bincount(torch.bucketize(ref, e), minlength=e.numel() + 1).double().numpy()
    got = h[(h.layer == 1) & (h.position == 40)]["count"].to_numpy()
    np.testing.assert_allclose(got, want)
    flags = collapse(run, train_len=16, tol=0.0)
    assert "span" in flags.attrs["rule"]
    assert set(flags.columns) >= {"layer", "head", "stat", "position"}
    assert (flags.position > 16).all()
    # a huge tolerance flags nothing
    assert collapse(run, train_len=16, tol=1e6).empty
    d = drift_summary(run, 8, at=[16, 40])
    assert d["rms x@40"].notna().all()
    for bad in (0, 12):  # not a bucket end: named, not a table of NaN
        with pytest.raises(StateError, match="must be a bucket end"):
            drift_summary(run, bad)
    with pytest.raises(StateError, match=r"positions \[20\] are not bucket ends"):
        drift_summary(run, 8, at=[20])


@torch.no_grad()
def test_state_drift_keeps_its_contract():
    model = tiny.build("mamba2")
    ids = torch.randint(2, tiny.VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    d = state_drift(model, ids, chunk=16, points=(16, 32, 64), buckets=(0, 16, 32, 64))
    assert d["points"] == [16, 32, 64] and set(d["state_rms"]) == {"0", "1"}
    ref = _states_after(model, ids, 32)[0]
    assert d["state_rms"]["0"][1] == pytest.approx(float(ref.pow(2).mean().sqrt()), rel=1e-4)
    assert set(d["loss"]) == {"0-16", "16-32", "32-63"}


# ----------------------------------------------------------------------------- bad input


def test_non_recurrent_model_is_refused_clearly():
    model = tiny.build("llama")
    with pytest.raises(CaptureError, match=r"no Mamba / Mamba-2 mixer.*passkey_grid\) works on any causal LM"):
        state_scan(model, torch.ones(1, 16, dtype=torch.long), bucket=8)


def test_bucket_must_divide_the_chunk():
    model = tiny.build("mamba2")
    with pytest.raises(StateError, match=r"bucket size \(8 tokens\) does not divide the chunk length \(12\)"):
        state_scan(model, torch.ones(1, 32, dtype=torch.long), bucket=8, chunk=12)


def test_input_shorter_than_a_bucket():
    model = tiny.build("mamba2")
    with pytest.raises(StateError, match="5 tokens, shorter than one bucket"):
        state_scan(model, torch.ones(1, 5, dtype=torch.long), bucket=8)


def test_ids_that_are_not_token_ids_are_named():
    model = tiny.build("mamba2")
    with pytest.raises(StateError, match="tokenize texts first"):
        state_scan(model, ["hello"], bucket=8)
    with pytest.raises(StateError, match="integer token ids"):
        state_scan(model, torch.ones(1, 16), bucket=8)
    with pytest.raises(StateError, match=r"token ids must lie in \[0, "):
        state_scan(model, torch.full((1, 16), tiny.VOCAB), bucket=8)
    assert not active_hooks(model)


def test_mamba_v1_chunking_refused():
    model = tiny.build("mamba")
    with pytest.raises(StateError, match="does not carry the SSM state"):
        state_scan(model, torch.ones(1, 32, dtype=torch.long), bucket=8, chunk=8)


def test_hist_positions_must_be_bucket_ends():
    with pytest.raises(CaptureError, match="not bucket ends"):
        StateProbe(bucket=8, hist_positions=(12,))


@torch.no_grad()
def test_grouped_b_bucket_states_match_the_cache():
    """n_groups = 2: bucket-end states inside a chunk (recurrence, per group) equal the cache's
    states of a run with one bucket per chunk."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Mamba2ForCausalLM(tf.Mamba2Config(vocab_size=tiny.VOCAB, hidden_size=32, state_size=8,
                                                 num_hidden_layers=1, expand=2, num_heads=8, head_dim=8,
                                                 n_groups=2, chunk_size=16)).eval()
    ids = torch.randint(2, tiny.VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    cols = ["rms", "median", "cos", "erank", "B"]
    a = head_stats(state_scan(model, ids, bucket=BK, chunk=BK))
    b = head_stats(state_scan(model, ids, bucket=BK, chunk=32))
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-4, atol=1e-6)
