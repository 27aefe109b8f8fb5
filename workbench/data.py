"""Token data for profiling: the zoo's bundled validation text as fixed-length token ids."""

from __future__ import annotations

import torch

from workbench.errors import CaptureError


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
