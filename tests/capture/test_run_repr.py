"""A capture's Run repr shows the valid-token count (padding excluded)."""

from __future__ import annotations

import torch

import workbench as wb
from tests import tiny


def test_capture_repr_counts_valid_tokens():
    model = tiny.build("llama")
    ids = torch.randint(0, tiny.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    with wb.capture(model) as run:
        model(ids, attention_mask=mask)
        model(ids[:1, :3])
    assert run.meta["data"]["n_tokens"] == 7 + 5 + 3
    assert repr(run).endswith(", tokens=15)")
