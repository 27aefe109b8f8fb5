"""CLS_L window unions and consecutive reuse (workbench.capture.routing) against brute-force
loops, on random activity with holes and padding, by both paths (cumulative sum and reshape)."""

from __future__ import annotations

import pytest
import torch

from workbench.capture import routing


def _brute(act, valid, lengths):
    nums, dens, rn, rd = [0] * len(lengths), [0] * len(lengths), 0.0, 0
    for b in range(act.shape[0]):
        rows = [set(torch.nonzero(act[b, i]).flatten().tolist()) for i in range(act.shape[1]) if valid[b, i]]
        for j, L in enumerate(lengths):
            for w in range(len(rows) // L):
                nums[j] += len(set().union(*rows[w * L:(w + 1) * L]))
                dens[j] += act.shape[2]
        for a, c in zip(rows, rows[1:]):
            if a:
                rn += len(a & c) / len(a)
                rd += 1
    return nums, dens, rn, rd


@pytest.mark.parametrize("path", ["cumsum", "reshape"])
def test_window_unions_and_reuse_equal_brute_force(path, monkeypatch):
    if path == "reshape":
        monkeypatch.setattr(routing, "_CUMSUM_MAX", 0)
    g = torch.Generator().manual_seed(3)
    lengths = (1, 2, 3, 8, 5, 64)
    for b, s, u in ((1, 1, 3), (3, 37, 5), (2, 70, 9), (4, 13, 1)):
        valid = torch.rand(b, s, generator=g) < 0.75
        valid[0, :2] = False  # left padding and holes
        act = (torch.rand(b, s, u, generator=g) < 0.3) & valid[..., None]
        seq, n_valid = routing.compact(act, valid)
        num, den = routing.window_union_counts(seq, n_valid, lengths)
        rn, rd = routing.reuse_sums(seq, n_valid)
        want = _brute(act, valid, lengths)
        assert num.tolist() == want[0] and den.tolist() == want[1]
        assert float(rn) == pytest.approx(want[2], rel=1e-12) and int(rd) == want[3]


@pytest.mark.parametrize("path", ["cumsum", "reshape"])
def test_grouped_counts_equal_each_group_alone(path, monkeypatch):
    """groups=G (G layers over the same sequences, as RoutingProbe counts every layer of a call
    at once) gives each group's own counts."""
    if path == "reshape":
        monkeypatch.setattr(routing, "_CUMSUM_MAX", 0)
    g = torch.Generator().manual_seed(5)
    lengths = (1, 2, 3, 8)
    for G, b, s, u in ((3, 2, 21, 4), (2, 1, 9, 3), (4, 3, 1, 2)):
        valid = torch.rand(b, s, generator=g) < 0.7
        valid[-1, -3:] = False  # right padding and holes
        act = (torch.rand(G, b, s, u, generator=g) < 0.4) & valid[None, ..., None]
        seq, n_valid = routing.compact(act.reshape(G * b, s, u), valid, groups=G)
        num, den = routing.window_union_counts(seq, n_valid, lengths, groups=G)
        rn, rd = routing.reuse_sums(seq, n_valid, groups=G)
        assert num.shape == (G, len(lengths)) and rn.shape == (G,) and rd.shape == (G,)
        for k in range(G):
            want = _brute(act[k], valid, lengths)
            assert num[k].tolist() == want[0] and den.tolist() == want[1]
            assert float(rn[k]) == pytest.approx(want[2], rel=1e-12) and int(rd[k]) == want[3]
