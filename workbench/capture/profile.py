"""`profile(model, data)`: batch, pad, capture, return the Run."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from workbench.capture.core import capture
from workbench.capture.run import Run
from workbench.errors import CaptureError


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device) and dev.type != "meta":
        return dev
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _tokenize(texts: Sequence[str], tokenizer, max_length: int | None):
    if tokenizer is None:
        raise CaptureError("profile got texts but no tokenizer: load the model with wb.load_model "
                           "(it attaches one) or pass tokenizer=...")
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
        if ids:
            rows.append(list(ids))
    return rows


def _rows_from_tensor(ids: torch.Tensor, attention_mask: torch.Tensor | None):
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise CaptureError(f"token ids must be a LongTensor [batch, tokens]; got {ids.dtype} {tuple(ids.shape)}")
    if attention_mask is not None and attention_mask.shape != ids.shape:
        raise CaptureError(f"attention_mask shape {tuple(attention_mask.shape)} != token ids shape {tuple(ids.shape)}")
    return ids, attention_mask


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
    device = _model_device(model)
    info = {"kind": None, "n_sequences": 0, "n_tokens": 0}
    if isinstance(data, torch.Tensor):
        ids, mask = _rows_from_tensor(data, attention_mask)
        info["kind"] = "token_ids"
        batches = []
        for i in range(0, ids.shape[0], batch_size):
            m = mask[i:i + batch_size] if mask is not None else torch.ones_like(ids[i:i + batch_size])
            batches.append((ids[i:i + batch_size], m))
    elif isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        info["kind"] = "texts"
        rows = _tokenize(data, tokenizer, max_length)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None) or 0
        side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
        batches = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            m = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                if side == "left":
                    ids[j, width - len(r):] = torch.tensor(r)
                    m[j, width - len(r):] = 1
                else:
                    ids[j, : len(r)] = torch.tensor(r)
                    m[j, : len(r)] = 1
            batches.append((ids, m))
    else:
        raise CaptureError("data must be a list of texts or a LongTensor of token ids [batch, tokens]; "
                           f"got {type(data).__name__}")
    total = sum(int(m.sum()) for _, m in batches)
    if total == 0:
        raise CaptureError("the dataset is empty: no valid (non-padding) tokens to profile")
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
                sha.update(ids.numpy().tobytes())
                sha.update(m.numpy().tobytes())
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
