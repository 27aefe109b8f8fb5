"""Chunk-level sparsity (CLS_L), token-level sparsity and the reuse ratio over activity masks.

Pure functions over boolean activity masks ``active [batch, tokens, units]`` (units = experts
or neurons; True = active) and an optional ``attention_mask [batch, tokens]`` (1 = valid token;
left or right padding, or any holes). Following BlockFFN (arXiv 2507.08771), with windows taken
per sequence (the tool's default; the paper's training code windows the flattened stream):

- CLS_L: per sequence, over its valid tokens only (in order), non-overlapping windows of L
  tokens starting at the first valid token; a tail shorter than L is dropped and a sequence
  with fewer than L valid tokens contributes no window. A unit is active in a window if it is
  active on any of its tokens. CLS_L = 1 - mean over windows and units of that union.
- TLS (token-level sparsity): 1 - active (valid token, unit) pairs / (valid tokens x units).
- Reuse ratio: mean over consecutive valid token pairs (i, i+1) of one sequence with
  |S_i| > 0 of |S_i & S_{i+1}| / |S_i|.

Every function has a streaming form: the ``*_counts`` functions return additive sums (numerator,
denominator) so batches can be accumulated (:class:`ChunkSparsityMeter`) and merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _check(active: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if active.dim() != 3:
        raise ValueError(f"active must be [batch, tokens, units], got shape {tuple(active.shape)}")
    if attention_mask is None:
        return torch.ones(active.shape[:2], dtype=torch.bool, device=active.device)
    if attention_mask.shape != active.shape[:2]:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match active's "
            f"[batch, tokens] = {tuple(active.shape[:2])}"
        )
    return attention_mask.to(device=active.device).bool()


def chunk_counts(
    active: torch.Tensor, attention_mask: torch.Tensor | None, L: int
) -> tuple[int, int]:
    """(active unions summed over windows and units, windows x units) for CLS_L.

    active ``[batch, tokens, units]`` bool; attention_mask ``[batch, tokens]``.
    """
    if L < 1:
        raise ValueError(f"window length L must be >= 1, got {L}")
    mask = _check(active, attention_mask)
    b, t, u = active.shape
    rank = mask.long().cumsum(1) - 1  # position among the valid tokens of the row
    n_valid = mask.sum(1, keepdim=True)
    n_win = n_valid // L  # [b, 1]
    win = rank // L
    keep = mask & (win < n_win)
    if not bool(keep.any()):
        return 0, 0
    max_w = int(n_win.max())
    # flat window index per (row, window); tokens outside any window go to a dump slot
    flat = torch.where(keep, torch.arange(b, device=active.device)[:, None] * max_w + win, b * max_w)
    union = torch.zeros(b * max_w + 1, u, dtype=torch.int32, device=active.device)
    idx = flat.reshape(-1, 1).expand(-1, u)
    union.scatter_reduce_(0, idx, active.reshape(b * t, u).to(torch.int32), "amax")
    total_windows = int(n_win.sum())
    return int(union[:-1].sum()), total_windows * u


def chunk_sparsity(
    active: torch.Tensor, attention_mask: torch.Tensor | None = None, L: int = 8
) -> float:
    """CLS_L of one batch (see module docstring); NaN if no sequence has L valid tokens."""
    num, den = chunk_counts(active, attention_mask, L)
    return float("nan") if den == 0 else 1.0 - num / den


def token_counts(active: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, int]:
    """(active valid (token, unit) pairs, valid tokens x units)."""
    mask = _check(active, attention_mask)
    return int((active & mask[..., None]).sum()), int(mask.sum()) * active.shape[-1]


def token_sparsity(active: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """TLS: 1 - active valid pairs / (valid tokens x units); padding excluded."""
    num, den = token_counts(active, attention_mask)
    return float("nan") if den == 0 else 1.0 - num / den


def reuse_counts(active: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[float, int]:
    """(sum over consecutive valid pairs with |S_i| > 0 of |S_i & S_next| / |S_i|, pair count)."""
    mask = _check(active, attention_mask)
    total, count = 0.0, 0
    for row in range(active.shape[0]):
        s = active[row][mask[row]]  # valid tokens in order, [n, units]
        if s.shape[0] < 2:
            continue
        prev, nxt = s[:-1], s[1:]
        size = prev.sum(-1)
        ok = size > 0
        if not bool(ok.any()):
            continue
        inter = (prev & nxt).sum(-1)
        total += float((inter[ok].double() / size[ok].double()).sum())
        count += int(ok.sum())
    return total, count


def reuse_ratio(active: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Mean over consecutive valid token pairs of |S_i & S_{i+1}| / |S_i| (pairs with |S_i|>0)."""
    num, den = reuse_counts(active, attention_mask)
    return float("nan") if den == 0 else num / den


@dataclass
class ChunkSparsityMeter:
    """Streaming TLS, CLS_L for several L and reuse ratio: ``update`` per batch, ``merge``."""

    lengths: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    sums: dict = field(default_factory=dict)

    def _add(self, key, num, den):
        a, b = self.sums.get(key, (0, 0))
        self.sums[key] = (a + num, b + den)

    def update(self, active: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """active ``[batch, tokens, units]`` bool; attention_mask ``[batch, tokens]``."""
        active = active.bool()
        self._add("tls", *token_counts(active, attention_mask))
        for L in self.lengths:
            self._add(f"cls_{L}", *chunk_counts(active, attention_mask, L))
        self._add("reuse", *reuse_counts(active, attention_mask))

    def merge(self, other: ChunkSparsityMeter) -> ChunkSparsityMeter:
        for k, (a, b) in other.sums.items():
            self._add(k, a, b)
        return self

    def result(self) -> dict[str, float]:
        out = {}
        for k, (num, den) in self.sums.items():
            if den == 0:
                out[k] = float("nan")
            elif k == "reuse":
                out[k] = num / den
            else:
                out[k] = 1.0 - num / den
        return out


__all__ = [
    "chunk_counts",
    "chunk_sparsity",
    "token_counts",
    "token_sparsity",
    "reuse_counts",
    "reuse_ratio",
    "ChunkSparsityMeter",
]
