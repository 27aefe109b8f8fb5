"""`profile(model, data)`: batch, pad, capture, return the Run."""

from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm

from workbench.capture.core import capture
from workbench.capture.run import Run
from workbench.data import model_device, token_batches


def profile(model, data, *, tokenizer=None, batch_size: int = 8, max_tokens: int | None = None,
            max_length: int | None = 512, attention_mask: torch.Tensor | None = None, rule="zero",
            probes=None, padding_side: str | None = None, progress: bool = True,
            data_info: dict | None = None) -> Run:
    """Profile FFN activations of `model` over `data` and return the Run.

    data: a list of texts (tokenized with `tokenizer`, default `model.tokenizer`) or a LongTensor
    of token ids [batch, tokens] with an optional `attention_mask`. Texts are batched
    `batch_size` at a time and padded (the tokenizer's padding side, or `padding_side`); padding
    is excluded from every statistic. `max_tokens` stops after that many valid tokens (the last
    batch is truncated to fit); `max_length` truncates each text.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    device = model_device(model)
    is_ids = isinstance(data, torch.Tensor)
    info = {"kind": "token_ids" if is_ids else "texts", "n_sequences": 0, "n_tokens": 0}
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    batches = token_batches(data, tokenizer=tokenizer, attention_mask=attention_mask, batch_size=batch_size,
                            max_length=max_length, padding_side=side)
    total = sum(int(m.sum()) for _, m in batches)
    budget = min(total, max_tokens) if max_tokens else total
    sha = hashlib.sha256()
    used = 0
    with capture(model, probes=probes, rule=rule, data=data_info) as run:
        bar = tqdm(total=budget, unit="tok", desc="profile", disable=not progress, leave=False)
        try:
            for ids, m in batches:
                if used >= budget:
                    break
                n = int(m.sum())
                if used + n > budget:
                    # keep the first (budget - used) valid tokens of the batch, in reading order
                    keep = budget - used
                    flat_rank = torch.cumsum(m.reshape(-1), 0).reshape(m.shape)
                    m = m * (flat_rank <= keep).long()
                    n = keep
                sha.update(ids.cpu().numpy().tobytes())
                sha.update(m.cpu().numpy().tobytes())
                with torch.no_grad():
                    model(input_ids=ids.to(device), attention_mask=m.to(device))
                used += n
                info["n_sequences"] += int((m.sum(1) > 0).sum())
                bar.update(n)
        finally:
            bar.close()
    info["n_tokens"] = used
    info["sha256"] = sha.hexdigest()
    run.meta["data"] = {**(data_info or {}), **info, "forward_calls": run.meta["data"].get("forward_calls")}
    return run
