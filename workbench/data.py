"""Token data shared by capture and metrics: batching and padding of texts or token ids, the
model's device, and the zoo's bundled validation text as fixed-length token ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workbench.errors import CaptureError, check_count

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _texts(data) -> list[str] | None:
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        return list(data)
    if isinstance(data, (list, tuple)) and data and all(hasattr(t, "text") for t in data):
        return [t.text for t in data]  # corpus Documents
    return None


def check_token_ids(model, ids: torch.Tensor, error=CaptureError) -> None:
    """Raise `error` naming the cause when `ids` hold ids the model's embedding cannot look up
    (negative, or >= its vocabulary size): checked up front, not as torch's IndexError from inside
    the forward (after which transformers may leave hooks on the model)."""
    if not isinstance(ids, torch.Tensor) or not ids.numel():
        return
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        vocab = emb.num_embeddings
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise error(f"token ids must lie in [0, {vocab}) for this model (its vocabulary); got ids from {lo} to "
                    f"{hi}: were they made by another tokenizer? Tokenize with model.tokenizer")


def token_batches(data, *, tokenizer=None, attention_mask: torch.Tensor | None = None,
                  batch_size: int = 8, max_length: int | None = 256, padding_side: str = "right",
                  max_sequences: int | None = None, kept: list | None = None) -> Batches:
    """[(input_ids [B, S], attention_mask [B, S])] from texts, corpus Documents, a LongTensor of
    ids [batch, tokens] (with an optional mask) or an existing list of (ids, mask) pairs.

    kept: a list that receives, in batch-row order, the index in `data` of every sequence kept
    (texts that tokenize to nothing are dropped), so per-text labels can follow their rows.
    Raises CaptureError when there is no valid (non-padding) token at all.
    """
    check_count(batch_size, "batch_size")
    check_count(max_length, "max_length", none_ok=True)
    kept = kept if kept is not None else []
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, tuple) and len(b) == 2
                                                         and isinstance(b[0], torch.Tensor) for b in data):
        batches = [(ids, m) for ids, m in data]
        kept.extend(range(sum(ids.shape[0] for ids, _ in batches)))
    elif isinstance(data, torch.Tensor):
        ids = data[None] if data.dim() == 1 else data
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise CaptureError(f"token ids must be a LongTensor [batch, tokens]; got {ids.dtype} {tuple(ids.shape)}")
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise CaptureError(f"attention_mask shape {tuple(mask.shape)} != token ids shape {tuple(ids.shape)}")
        if max_sequences is not None:
            ids, mask = ids[:max_sequences], mask[:max_sequences]
        kept.extend(range(ids.shape[0]))
        batches = [(ids[i:i + batch_size].long(), mask[i:i + batch_size].long())
                   for i in range(0, ids.shape[0], batch_size)]
    else:
        texts = _texts(data)
        if texts is None:
            if isinstance(data, (list, tuple)) and not data:
                raise CaptureError("the dataset is empty: no texts or token ids to run the model on")
            raise CaptureError("data must be texts, corpus Documents, a LongTensor of token ids "
                               f"[batch, tokens] or a list of (ids, mask) pairs; got {type(data).__name__}")
        if tokenizer is None:
            raise CaptureError("got texts but no tokenizer: load the model with wb.load_model (it "
                               "attaches one) or pass tokenizer=...")
        rows = []
        for i, t in enumerate(texts):
            ids = tokenizer(t, add_special_tokens=True, truncation=max_length is not None,
                            max_length=max_length)["input_ids"]
            if ids:
                rows.append(list(ids))
                kept.append(i)
            if max_sequences is not None and len(rows) >= max_sequences:
                break
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None) or 0
        batches = []
        for i in range(0, len(rows), batch_size):
            batches.append(pad_rows(rows[i:i + batch_size], pad_id, padding_side))
    if sum(int(m.sum()) for _, m in batches) == 0:
        raise CaptureError("the dataset is empty: no valid (non-padding) tokens")
    return batches


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0, side: str = "right"):
    """Pad token rows to one width; returns (ids [B, S], mask [B, S])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    m = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[j, sl] = torch.tensor(list(r), dtype=torch.long)
        m[j, sl] = 1
    return ids, m




def validation_tokens(model, n_tokens: int, seq_len: int = 256) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first `n_tokens` of the zoo's validation split as ids [batch, seq_len] + attention mask.

    Documents are tokenized with `model.tokenizer` and joined with EOS; the last row is padded
    (mask 0). A model without a tokenizer (builtin:...) gets seeded random ids instead. Returns
    (ids, mask, description).
    """
    if n_tokens < 1:
        raise CaptureError("n_tokens must be >= 1")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        g = torch.Generator().manual_seed(0)
        flat = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=g)
        desc = "random token ids (seed 0): the model has no tokenizer"
    else:
        from workbench.models.corpus import load_split

        ids: list[int] = []
        eos = tok.eos_token_id
        for doc in load_split("validation"):
            ids.extend(tok(doc.text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
            if len(ids) >= n_tokens:
                break
        if len(ids) < n_tokens:
            raise CaptureError(f"the validation text has only {len(ids)} tokens; ask for at most that many")
        flat = torch.tensor(ids[:n_tokens])
        desc = "zoo validation split, first tokens, documents joined by EOS"
    n_seq = -(-n_tokens // seq_len)
    out = torch.zeros(n_seq * seq_len, dtype=torch.long)
    out[:n_tokens] = flat
    mask = torch.zeros_like(out)
    mask[:n_tokens] = 1
    return out.view(n_seq, seq_len), mask.view(n_seq, seq_len), desc
