"""`profile(model, data)`: batch, pad, capture, return the Run."""

from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm

from workbench.capture.core import Capture
from workbench.capture.run import Run
from workbench.data import model_device, token_batches
from workbench.errors import CaptureError


def _label_names(data, labels) -> tuple[list[str] | None, str | None]:
    """Per-item label strings of `data` (or None) and where they came from."""
    if labels is None:
        if isinstance(data, (list, tuple)) and data and all(hasattr(d, "domain") and hasattr(d, "text")
                                                            for d in data):
            return [str(d.domain) for d in data], "domain"  # zoo corpus Documents
        return None, None
    if isinstance(labels, str):
        if not (isinstance(data, (list, tuple)) and data and all(hasattr(d, labels) for d in data)):
            raise CaptureError(f"labels={labels!r} names an attribute, but the data items have no "
                               f"{labels!r}; pass one label string per text instead")
        return [str(getattr(d, labels)) for d in data], labels
    labels = [str(x) for x in labels]
    n = data.shape[0] if isinstance(data, torch.Tensor) and data.dim() == 2 else len(data)
    if len(labels) != n:
        raise CaptureError(f"got {len(labels)} labels for {n} sequences; give one label per text "
                           "(or per row of the token ids)")
    return labels, "user"


def profile(model, data, *, tokenizer=None, batch_size: int = 8, max_tokens: int | None = None,
            max_length: int | None = 512, attention_mask: torch.Tensor | None = None, rule="zero",
            probes=None, padding_side: str | None = None, progress: bool = True,
            data_info: dict | None = None, labels=None, layout=None) -> Run:
    """Profile FFN activations of `model` over `data` and return the Run.

    data: a list of texts (tokenized with `tokenizer`, default `model.tokenizer`) or a LongTensor
    of token ids [batch, tokens] with an optional `attention_mask`. Texts are batched
    `batch_size` at a time and padded (the tokenizer's padding side, or `padding_side`); padding
    is excluded from every statistic. `max_tokens` stops after that many valid tokens (the last
    batch is truncated to fit); `max_length` truncates each text.

    labels: one label string per text / row (e.g. the data's domain), the name of an attribute of
    the data items, or None (zoo corpus Documents are then labelled by their `domain`). Probes
    that count per label (routing, bricks) read them; the names are in run.meta["labels"].
    probes: FFN probes and/or site probes (routers, mixers), as for `wb.capture`.
    """
    from workbench.data import check_token_ids
    from workbench.errors import check_count

    check_count(max_tokens, "max_tokens", none_ok=True)
    if probes is not None and not isinstance(probes, (list, tuple)):
        probes = [probes]  # one probe (wb.RoutingProbe()) or one probe name
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    device = model_device(model)
    is_ids = isinstance(data, torch.Tensor)
    info = {"kind": "token_ids" if is_ids else "texts", "n_sequences": 0, "n_tokens": 0}
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    names, label_source = _label_names(data, labels)
    kept: list[int] = []
    batches = token_batches(data, tokenizer=tokenizer, attention_mask=attention_mask, batch_size=batch_size,
                            max_length=max_length, padding_side=side, kept=kept)
    label_ids = None
    if names is not None:
        vocab = sorted(set(names))
        index = {n: i for i, n in enumerate(vocab)}
        label_ids = torch.tensor([index[names[i]] for i in kept], dtype=torch.int64)
    for ids, _ in batches:
        check_token_ids(model, ids)
    total = sum(int(m.sum()) for _, m in batches)
    budget = min(total, max_tokens) if max_tokens else total
    sha = hashlib.sha256()
    used = 0
    row = 0
    with Capture(model, probes=probes, rule=rule, data=data_info, layout=layout) as cap:
        run = cap.run
        bar = tqdm(total=budget, unit="tok", desc="profile", disable=not progress, leave=False)
        try:
            for ids, m in batches:
                if label_ids is not None:
                    cap.set_labels(label_ids[row:row + ids.shape[0]])
                row += ids.shape[0]
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
    if names is not None:
        run.meta["labels"] = {"names": vocab, "source": label_source,
                              "sequences": {v: int((label_ids == i).sum()) for i, v in enumerate(vocab)}}
    return run
