"""Passkey retrieval (the public Stuffed Mamba set-up) on any causal LM.

A prompt is the filler "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again." repeated, with the key line "The passkey is {key}. Remember it. {key} is
the passkey." inserted at depth d of the filler (d = 0: first, d = 1: last), followed by the
question "What is the pass key? The passkey is". The model decodes greedily a few tokens; the
answer is correct when the key appears in it as a whole number (the first run of digits of the
decoded text equals the key). :func:`passkey_grid` gives the accuracy over total length x depth.

Prompts are built from token ids, not text, so that a prompt has exactly the requested length:
the pieces (each filler sentence, the key line, the question) are tokenized once, each with a
leading space; the filler is cycled sentence by sentence and cut to the token count left after
the key line and the question; the key line goes in at the sentence boundary nearest to
``depth`` x (filler tokens). Keys are drawn from a seeded generator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from workbench.errors import WorkbenchError

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
KEY_LINE = "The passkey is {key}. Remember it. {key} is the passkey."
QUESTION = "What is the pass key? The passkey is"
DEFAULT_DEPTHS = tuple(round(i / 9, 4) for i in range(10))  # 10 depths, 0 .. 1


class PasskeyError(WorkbenchError):
    """A passkey prompt or grid cannot be built as asked."""


@dataclass
class PasskeyPrompt:
    """One prompt. ``ids`` [length]; ``key_pos``: index of the key line's first token;
    ``answer_ids``: the tokens of " {key}" (what a perfect model continues with)."""

    ids: list[int]
    key: str
    depth: float
    key_pos: int
    key_len: int
    answer_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.ids)


class PasskeyBuilder:
    """Builds exact-length passkey prompts for `tokenizer` (any transformers tokenizer)."""

    def __init__(self, tokenizer, n_digits: int = 5):
        if n_digits < 1:
            raise PasskeyError(f"n_digits must be >= 1, got {n_digits}.")
        self.tok = tokenizer
        self.n_digits = n_digits
        enc = self._enc
        self.sentences = [enc(" " + s) for s in FILLER]
        self.question = enc(" " + QUESTION)
        probe = "1" * n_digits
        line = enc(" " + KEY_LINE.format(key=probe))
        # the key must survive a round trip through the tokenizer, else no model can answer it
        if probe not in tokenizer.decode(line) or tokenizer.unk_token_id in line:
            raise PasskeyError(
                f"the tokenizer cannot reproduce a {n_digits}-digit key (decode(encode(key line)) "
                "lost it); use a tokenizer that encodes digits, or fewer digits.")
        self.key_line_len = len(line)

    def _enc(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    @property
    def min_length(self) -> int:
        """The shortest prompt: the key line, the question and one filler sentence."""
        return self.key_line_len + len(self.question) + min(len(s) for s in self.sentences)

    def sample_key(self, rng: np.random.Generator) -> str:
        lo = 10 ** (self.n_digits - 1) if self.n_digits > 1 else 0
        return str(int(rng.integers(lo, 10**self.n_digits)))

    def build(self, length: int, depth: float, key: str, *, end_boundary: bool = True) -> PasskeyPrompt:
        """A prompt of exactly `length` tokens with `key` at `depth` (0..1) of the filler.
        end_boundary=False: only whole-sentence boundaries (not the cut end of the filler) are
        insertion points (the zoo pair's training documents were made so)."""
        if not 0.0 <= depth <= 1.0:
            raise PasskeyError(f"depth must lie in [0, 1], got {depth}.")
        if len(key) != self.n_digits or not key.isdigit():
            raise PasskeyError(f"key must be {self.n_digits} digits, got {key!r}.")
        line = self._enc(" " + KEY_LINE.format(key=key))
        n_fill = length - len(line) - len(self.question)
        if n_fill < min(len(s) for s in self.sentences):
            raise PasskeyError(
                f"a passkey prompt of {length} tokens cannot be built with this tokenizer: the key "
                f"line and the question alone take {len(line) + len(self.question)} tokens; ask "
                f"for at least {self.min_length} tokens.")
        filler: list[int] = []
        bounds = [0]
        i = 0
        while len(filler) < n_fill:
            filler += self.sentences[i % len(self.sentences)]
            bounds.append(len(filler))
            i += 1
        filler = filler[:n_fill]
        bounds = [b for b in bounds if b <= n_fill]
        if end_boundary and bounds[-1] != n_fill:
            bounds.append(n_fill)  # the filler's (cut) end: depth 1 puts the key before the question
        target = depth * n_fill
        at = min(bounds, key=lambda b: (abs(b - target), b))
        ids = filler[:at] + line + filler[at:] + self.question
        return PasskeyPrompt(ids, key, depth, at, len(line), self._enc(" " + key))

    def prompts(self, length: int, depths=DEFAULT_DEPTHS, n_keys: int = 4, seed: int = 0):
        """n_keys prompts per depth at `length`, keys from a generator seeded by (seed, length)."""
        rng = np.random.default_rng([seed, length])
        return [self.build(length, float(d), self.sample_key(rng)) for d in depths for _ in range(n_keys)]


def score(text: str, key: str) -> bool:
    """True when the first run of digits in the decoded answer `text` is exactly `key`."""
    m = re.search(r"\d+", text)
    return m is not None and m.group(0) == key


@torch.no_grad()
def greedy(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation (b, max_new_tokens) of the equal-length prompts `ids` (b, T) by any
    causal LM of transformers (``generate`` with sampling off, the model's own cache)."""
    cfg = model.generation_config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else model.config.pad_token_id
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad if pad is not None else 0)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _listed(value, name: str, what: str, scalar) -> list:
    """`value` as a non-empty list (one scalar becomes a list of one), else a PasskeyError."""
    if scalar(value):
        return [value]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise PasskeyError(f"{name}={value!r}: give {what}")
    value = list(value)
    if not value:
        raise PasskeyError(f"{name}=[]: give at least one: {what}")
    return value


def _check_grid_args(model, tokenizer, lengths, depths, *, n_keys, max_new_tokens, batch_size, token_budget):
    """Arguments of passkey_grid, checked before any prompt is built: (lengths, depths) as lists."""
    if tokenizer is None or not callable(tokenizer):
        hint = " (pass model.tokenizer)" if getattr(model, "tokenizer", None) is not None else ""
        raise PasskeyError(f"tokenizer={tokenizer!r}: passkey_grid needs the model's tokenizer to build the "
                           f"prompts{hint}")
    lengths = _listed(lengths, "lengths", "prompt lengths in tokens, e.g. [256, 1024] or 256", _whole)
    for L in lengths:
        if not _whole(L) or L < 1:
            raise PasskeyError(f"lengths={lengths!r}: prompt lengths must be whole numbers of tokens >= 1 "
                               f"(got {L!r})")
    depths = _listed(depths, "depths", "key depths in [0, 1], e.g. [0, 0.5, 1]",
                     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float, np.number)) or not 0.0 <= float(d) <= 1.0:
            raise PasskeyError(f"depths={depths!r}: key depths must lie in [0, 1] (got {d!r})")
    for name, v in (("n_keys", n_keys), ("batch_size", batch_size), ("token_budget", token_budget)):
        if not _whole(v) or v < 1:
            raise PasskeyError(f"{name}={v!r}: give a whole number >= 1")
    if max_new_tokens is not None and (not _whole(max_new_tokens) or max_new_tokens < 1):
        raise PasskeyError(f"max_new_tokens={max_new_tokens!r}: give a whole number >= 1, or None for the "
                           "answer's length + 2")
    return lengths, depths


def passkey_grid(model, tokenizer, lengths, depths=DEFAULT_DEPTHS, *, n_keys: int = 4,
                 seed: int = 0, n_digits: int = 5, max_new_tokens: int | None = None,
                 batch_size: int = 16, token_budget: int = 1 << 16):
    """Passkey accuracy of `model` over total length x depth: a tidy DataFrame with columns
    length, depth, n, correct, accuracy (plus the decoded answers in ``.attrs['answers']``).

    Works on any causal LM (recurrent or Transformer); prompts of one length share a batch
    (they have the same length by construction, so there is no padding), at most `batch_size`
    prompts and `token_budget` tokens per forward."""
    import pandas as pd

    lengths, depths = _check_grid_args(model, tokenizer, lengths, depths, n_keys=n_keys,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       token_budget=token_budget)
    b = PasskeyBuilder(tokenizer, n_digits)
    limit = getattr(model.config, "max_position_embeddings", None)
    family = getattr(model.config, "model_type", "")
    for L in lengths:  # all of them before the first forward
        if limit and "mamba" not in family and L > limit:
            raise PasskeyError(
                f"length {L} exceeds the model's max_position_embeddings ({limit}); drop it "
                "from `lengths` (a recurrent model has no such limit).")
    device = next(model.parameters()).device
    rows, answers = [], []
    was = model.training
    model.eval()
    try:
        for L in lengths:
            ps = b.prompts(int(L), depths, n_keys, seed)
            new = max_new_tokens or max(len(p.answer_ids) for p in ps) + 2
            bs = max(1, min(batch_size, token_budget // int(L)))
            for s in range(0, len(ps), bs):
                part = ps[s:s + bs]
                ids = torch.tensor([p.ids for p in part], device=device)
                gen = greedy(model, ids, new).cpu()
                for p, g in zip(part, gen):
                    text = tokenizer.decode(g.tolist())
                    answers.append({"length": int(L), "depth": p.depth, "key": p.key, "answer": text})
                    rows.append({"length": int(L), "depth": p.depth, "correct": score(text, p.key)})
    finally:
        model.train(was)
    df = pd.DataFrame(rows).groupby(["length", "depth"], as_index=False).agg(
        n=("correct", "size"), correct=("correct", "sum"))
    df["accuracy"] = df["correct"] / df["n"]
    df.attrs["answers"] = answers
    df.attrs["setup"] = {"n_keys": n_keys, "seed": seed, "n_digits": n_digits,
                         "rule": "correct when the first run of digits in the greedy answer equals the key"}
    return df


def training_documents(tokenizer, n: int, length: int, rng: np.random.Generator,
                       n_digits: int = 5) -> torch.Tensor:
    """(n, length) passkey documents for training: a prompt of length - answer - 1 tokens at a
    uniform random depth, then the answer " {key}" and the EOS token (token-exact, seeded)."""
    b = PasskeyBuilder(tokenizer, n_digits)
    eos = tokenizer.eos_token_id
    out = []
    for _ in range(n):
        key = b.sample_key(rng)
        ans = b._enc(" " + key)
        p = b.build(length - len(ans) - 1, float(rng.uniform()), key, end_boundary=False)
        out.append(p.ids + ans + [eos])
    return torch.tensor(out, dtype=torch.long)
