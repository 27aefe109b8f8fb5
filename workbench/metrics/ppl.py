"""Perplexity on token ids with an attention mask (padding excluded), dense or under a rule.

The loss of position s predicting token s+1 counts only when both positions are valid
(attention_mask != 0), so left and right padding give the same value as unpadded sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import CaptureError
from workbench.metrics._data import Batches, model_device, token_batches


@dataclass(frozen=True)
class NLL:
    """Summed next-token negative log-likelihood (nats, float64) and the number of predictions."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)


def batch_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL of logits [B, S, V] against ids [B, S] where both ends of a pair are valid."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = ids[:, 1:].to(lp.device)
    m = ((mask[:, :-1] != 0) & (mask[:, 1:] != 0)).to(lp.device)
    nll = -lp.gather(-1, tgt[..., None])[..., 0]
    return (nll.double() * m).sum(), int(m.sum())


def nll(model: nn.Module, batches: Batches) -> NLL:
    """Summed next-token NLL of `model` over (ids, mask) batches; no gradient."""
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for ids, m in batches:
            out = model(input_ids=ids.to(device), attention_mask=m.to(device))
            logits = out.logits if hasattr(out, "logits") else out[0]
            s, k = batch_nll(logits, ids, m)
            total += s.cpu()
            n += k
    if n == 0:
        raise CaptureError("no next-token predictions: every sequence has fewer than 2 valid tokens")
    if not math.isfinite(float(total)):
        raise CaptureError("the loss is NaN/Inf: check the model's dtype (fp16 overflow is common) and weights")
    return NLL(float(total), n)


def perplexity(model: nn.Module, data, *, rule=None, tokenizer=None, attention_mask=None,
               batch_size: int = 8, max_length: int | None = 256) -> float:
    """exp(mean next-token NLL) over `data` (texts, Documents, ids [B, S] + mask, or batches).

    rule: None for the dense model, or a rule applied through `intervene` during the forward.
    """
    from workbench.metrics.interventions import intervene

    batches = token_batches(data, tokenizer=tokenizer if tokenizer is not None else getattr(model, "tokenizer", None),
                            attention_mask=attention_mask, batch_size=batch_size, max_length=max_length)
    if rule is None:
        return nll(model, batches).ppl
    with intervene(model, rule):
        return nll(model, batches).ppl
