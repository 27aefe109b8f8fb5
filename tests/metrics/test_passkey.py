"""Passkey retrieval: exact-length prompts with the key at the requested depth, the scorer on
hand-made answers, the grid on a Transformer and a Mamba-2 (tiny random models), bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from workbench.metrics.passkey import (
    KEY_LINE,
    QUESTION,
    PasskeyBuilder,
    PasskeyError,
    passkey_grid,
    score,
    training_documents,
)
from workbench.models.tokenizer import load


@pytest.fixture(scope="module")
def tok():
    return load()


@pytest.mark.parametrize("length", [40, 97, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_prompt_length_and_key_depth(tok, length, depth):
    b = PasskeyBuilder(tok)
    p = b.build(length, depth, "40213")
    assert p.length == length
    line = tok.decode(p.ids[p.key_pos: p.key_pos + p.key_len])
    assert line.strip() == KEY_LINE.format(key="40213")
    assert tok.decode(p.ids[-len(b.question):]).strip() == QUESTION
    n_fill = length - p.key_len - len(b.question)
    # the key sits at the filler sentence boundary nearest to depth x filler (sentences <= 10 tokens)
    assert abs(p.key_pos - depth * n_fill) <= max(len(s) for s in b.sentences) / 2 + 0.5
    assert tok.decode(p.ids).count("40213") == 2


def test_keys_are_seeded_and_distinct(tok):
    b = PasskeyBuilder(tok)
    a = [p.key for p in b.prompts(128, depths=(0.0, 0.5), n_keys=5, seed=3)]
    assert a == [p.key for p in b.prompts(128, depths=(0.0, 0.5), n_keys=5, seed=3)]
    assert a != [p.key for p in b.prompts(128, depths=(0.0, 0.5), n_keys=5, seed=4)]
    assert all(len(k) == 5 and k.isdigit() for k in a) and len(set(a)) > 5


@pytest.mark.parametrize("text,ok", [
    (" 40213.", True), ("40213", True), (" 40213 is the passkey", True), (" the key 40213", True),
    (" 4021", False), (" 402134", False), (" 12 40213", False), (" no digits", False), ("", False),
    (" 40 213", False),
])
def test_score_is_exact(text, ok):
    assert score(text, "40213") is ok


def test_training_documents(tok):
    d = training_documents(tok, 3, 128, np.random.default_rng(0))
    assert d.shape == (3, 128) and (d[:, -1] == tok.eos_token_id).all()
    text = tok.decode(d[0, :-1].tolist())
    key = text.split("The passkey is ")[1][:5]
    assert text.endswith(QUESTION + " " + key)


def _llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              num_key_value_heads=2, max_position_embeddings=128)).eval()


def test_grid_on_a_transformer_and_a_mamba2(tok):
    llama = _llama()
    df = passkey_grid(llama, tok, [48, 96], depths=(0.0, 1.0), n_keys=2, seed=0)
    assert list(df.columns) == ["length", "depth", "n", "correct", "accuracy"]
    assert len(df) == 4 and (df.n == 2).all() and df.accuracy.between(0, 1).all()
    assert len(df.attrs["answers"]) == 8
    torch.manual_seed(0)
    mamba = tf.Mamba2ForCausalLM(tf.Mamba2Config(vocab_size=4096, hidden_size=32, state_size=8, num_hidden_layers=1,
                                                 expand=2, num_heads=8, head_dim=8, n_groups=1, chunk_size=16)).eval()
    df2 = passkey_grid(mamba, tok, [64], depths=(0.5,), n_keys=2)
    assert df2.n.tolist() == [2]


def test_scorer_on_a_model_that_knows_the_key(tok):
    """A stub LM whose greedy continuation is the key: the grid must read 100 %."""
    llama = _llama()
    b = PasskeyBuilder(tok)
    ps = b.prompts(60, depths=(0.0, 1.0), n_keys=2, seed=0)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = llama.config
            self.generation_config = llama.generation_config
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, max_new_tokens, **kw):
            rows = []
            for r in input_ids.tolist():
                p = next(p for p in ps if p.ids == r)
                ans = (p.answer_ids + [tok.eos_token_id] * max_new_tokens)[:max_new_tokens]
                rows.append(r + ans)
            return torch.tensor(rows)

    df = passkey_grid(Oracle(), tok, [60], depths=(0.0, 1.0), n_keys=2, seed=0)
    assert df.accuracy.tolist() == [1.0, 1.0]


def test_bad_inputs(tok):
    b = PasskeyBuilder(tok)
    with pytest.raises(PasskeyError, match=f"cannot be built with this tokenizer.*at least {b.min_length} tokens"):
        b.build(20, 0.5, "12345")
    with pytest.raises(PasskeyError, match=r"depth must lie in \[0, 1\]"):
        b.build(100, 1.5, "12345")
    with pytest.raises(PasskeyError, match="exceeds the model's max_position_embeddings"):
        passkey_grid(_llama(), tok, [200], depths=(0.5,), n_keys=1)

    class NoDigits:
        unk_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0 if c.isdigit() else 1 for c in text]}

        def decode(self, ids):
            return "".join("?" if i == 0 else "a" for i in ids)

    with pytest.raises(PasskeyError, match="cannot reproduce a 5-digit key"):
        PasskeyBuilder(NoDigits())


def test_grid_arguments_are_named(tok):
    llama = _llama()
    one = passkey_grid(llama, tok, 48, depths=0.5, n_keys=1)  # a single length / depth is a list of one
    assert one.length.tolist() == [48] and one.depth.tolist() == [0.5]
    llama.tokenizer = tok
    with pytest.raises(PasskeyError, match=r"tokenizer=None: .*\(pass model.tokenizer\)"):
        passkey_grid(llama, None, [48])
    for kw, match in (({"n_keys": 0}, r"n_keys=0: give a whole number >= 1"),
                      ({"batch_size": 0}, r"batch_size=0"), ({"token_budget": 0}, r"token_budget=0"),
                      ({"max_new_tokens": 0}, r"max_new_tokens=0"),
                      ({"lengths": []}, r"lengths=\[\]: give at least one"),
                      ({"lengths": [48, 0]}, r"whole numbers of tokens >= 1 \(got 0\)"),
                      ({"lengths": [48.5]}, r"\(got 48.5\)"), ({"lengths": "48"}, r"lengths='48'"),
                      ({"depths": []}, r"depths=\[\]"), ({"depths": [0.5, 2]}, r"must lie in \[0, 1\] \(got 2\)")):
        kw = {"lengths": [48], **kw}
        with pytest.raises(PasskeyError, match=match):
            passkey_grid(llama, tok, **kw)
    llama.generate = lambda *a, **k: pytest.fail("a length over the limit is refused before any forward")
    with pytest.raises(PasskeyError, match="length 200 exceeds"):
        passkey_grid(llama, tok, [48, 200], depths=(0.5,), n_keys=1)
