"""Golden tests of CLS_L, TLS and the reuse ratio against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.metrics.chunk import (
    ChunkSparsityMeter,
    chunk_sparsity,
    reuse_ratio,
    token_sparsity,
)


def brute_cls(active, mask, L):
    unions, windows = 0, 0
    b, t, u = active.shape
    for i in range(b):
        valid = [j for j in range(t) if mask[i, j]]
        for w in range(len(valid) // L):
            toks = valid[w * L : (w + 1) * L]
            for k in range(u):
                unions += any(bool(active[i, j, k]) for j in toks)
            windows += 1
    return float("nan") if windows == 0 else 1 - unions / (windows * u)


def brute_tls(active, mask):
    on, n = 0, 0
    for i in range(active.shape[0]):
        for j in range(active.shape[1]):
            if mask[i, j]:
                on += int(active[i, j].sum())
                n += active.shape[2]
    return 1 - on / n


def brute_reuse(active, mask):
    vals = []
    for i in range(active.shape[0]):
        valid = [j for j in range(active.shape[1]) if mask[i, j]]
        for a, b in zip(valid[:-1], valid[1:]):
            s = int(active[i, a].sum())
            if s:
                vals.append(int((active[i, a] & active[i, b]).sum()) / s)
    return sum(vals) / len(vals)


def _mask(lengths, t, side):
    m = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            m[i, :n] = 1
        else:
            m[i, t - n :] = 1
    return m


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("L", [1, 2, 3, 5, 8])
def test_cls_matches_brute_force_with_padding(side, L):
    g = torch.Generator().manual_seed(L)
    active = torch.rand(4, 21, 7, generator=g) < 0.3
    # one full row, one with an odd tail, one shorter than most L, one empty
    mask = _mask([21, 13, 4, 0], 21, side)
    want = brute_cls(active, mask, L)
    got = chunk_sparsity(active, mask, L)
    assert got == pytest.approx(want, abs=1e-12)


def test_padding_content_is_ignored():
    g = torch.Generator().manual_seed(0)
    active = torch.rand(3, 16, 5, generator=g) < 0.4
    mask = _mask([16, 9, 11], 16, "right")
    other = active.clone()
    other[mask == 0] = True  # garbage where the padding is
    for L in (1, 4, 8):
        assert chunk_sparsity(active, mask, L) == chunk_sparsity(other, mask, L)
    assert token_sparsity(active, mask) == token_sparsity(other, mask)
    assert reuse_ratio(active, mask) == reuse_ratio(other, mask)


def test_holes_in_the_mask_use_valid_tokens_in_order():
    g = torch.Generator().manual_seed(1)
    active = torch.rand(2, 12, 3, generator=g) < 0.5
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    for L in (2, 3, 4):
        assert chunk_sparsity(active, mask, L) == pytest.approx(brute_cls(active, mask, L))


def test_short_sequences_contribute_no_window():
    active = torch.ones(2, 6, 4, dtype=torch.bool)
    mask = _mask([6, 3], 6, "right")
    # only row 0 has one window of 4; it is fully active
    assert chunk_sparsity(active, mask, 4) == 0.0
    assert math.isnan(chunk_sparsity(active, _mask([3, 2], 6, "left"), 4))


def test_tls_and_reuse_match_brute_force():
    g = torch.Generator().manual_seed(2)
    active = torch.rand(3, 17, 9, generator=g) < 0.25
    mask = _mask([17, 10, 5], 17, "left")
    assert token_sparsity(active, mask) == pytest.approx(brute_tls(active, mask))
    assert reuse_ratio(active, mask) == pytest.approx(brute_reuse(active, mask))


def test_cls_1_equals_tls_and_grows_down_with_L():
    g = torch.Generator().manual_seed(3)
    active = torch.rand(2, 64, 16, generator=g) < 0.2
    assert chunk_sparsity(active, None, 1) == pytest.approx(token_sparsity(active))
    vals = [chunk_sparsity(active, None, L) for L in (1, 2, 4, 8, 16)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_streaming_meter_equals_one_shot():
    g = torch.Generator().manual_seed(4)
    active = torch.rand(6, 30, 8, generator=g) < 0.3
    mask = _mask([30, 25, 8, 17, 30, 3], 30, "right")
    a, b = ChunkSparsityMeter((1, 3, 8)), ChunkSparsityMeter((1, 3, 8))
    a.update(active[:4], mask[:4])
    b.update(active[4:], mask[4:])
    r = a.merge(b).result()
    assert r["cls_3"] == pytest.approx(brute_cls(active, mask, 3))
    assert r["cls_8"] == pytest.approx(brute_cls(active, mask, 8))
    assert r["tls"] == pytest.approx(brute_tls(active, mask))
    assert r["reuse"] == pytest.approx(brute_reuse(active, mask))


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        chunk_sparsity(torch.zeros(3, 4, dtype=torch.bool), None, 2)
    with pytest.raises(ValueError):
        chunk_sparsity(torch.zeros(1, 4, 2, dtype=torch.bool), torch.ones(1, 5), 2)
    with pytest.raises(ValueError):
        chunk_sparsity(torch.zeros(1, 4, 2, dtype=torch.bool), None, 0)
