"""Corpora stream from disk (text, JSONL, datasets save_to_disk / Arrow) in bounded memory, and
a streamed profile equals the in-memory one."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

import workbench as wb
from workbench.capture.distributed import compare_runs, profile_corpus
from workbench.capture.stream import TextStream, stream_batches
from workbench.data import token_batches
from workbench.errors import CaptureError

TEXTS = ["The quick brown fox.", "jumps over\nthe lazy dog", "", "x", "A longer text " * 9, "end"]


def _write_all(tmp_path, texts=TEXTS):
    (tmp_path / "c.txt").write_text("\n\n".join(t for t in texts if t) + "\n")
    with open(tmp_path / "c.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"id": 1, "body": t}) + "\n")
    import datasets

    ds = datasets.Dataset.from_dict({"body": texts, "n": list(range(len(texts)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    return tmp_path


def test_formats_read_the_same_texts(tmp_path):
    _write_all(tmp_path)
    assert list(TextStream(tmp_path / "c.txt")) == [t.strip() for t in TEXTS if t]
    assert list(TextStream(tmp_path / "c.jsonl", field="body")) == TEXTS
    assert list(TextStream(tmp_path / "ds", field="body", rows_per_read=4)) == TEXTS
    assert list(TextStream(tmp_path / "dd", field="body", split="train")) == TEXTS
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    assert list(TextStream(arrow, field="body")) == TEXTS
    assert TextStream(tmp_path / "ds").fmt == "datasets"


def test_stream_errors_name_the_fix(tmp_path):
    _write_all(tmp_path)
    with pytest.raises(CaptureError, match="line 1 has no text field 'text'.*--text-field"):
        list(TextStream(tmp_path / "c.jsonl"))
    with pytest.raises(CaptureError, match=r"no column 'text' \(columns: \['body', 'n'\]\)"):
        list(TextStream(tmp_path / "ds"))
    with pytest.raises(CaptureError, match=r"holds splits \['train'\]; choose one"):
        list(TextStream(tmp_path / "dd", field="body"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(CaptureError, match="line 2 is not JSON"):
        list(TextStream(tmp_path / "bad.jsonl"))
    with pytest.raises(CaptureError, match="does not exist"):
        TextStream(tmp_path / "missing.txt")


@pytest.mark.parametrize("side", ["left", "right"])
def test_stream_batches_equal_token_batches(side):
    from workbench.models.zoo import DATA_DIR

    tok = wb.load_tokenizer(DATA_DIR / "tokenizer")
    assert tok is not None
    texts = [t for t in TEXTS if t] * 3
    ref = token_batches(texts, tokenizer=tok, batch_size=4, max_length=7, padding_side=side)
    got = list(stream_batches(iter(texts), tok, batch_size=4, max_length=7, padding_side=side))
    assert len(got) == len(ref)
    for (a, m), (b, n) in zip(got, ref):
        assert torch.equal(a, b) and torch.equal(m, n)


def test_corpus_larger_than_the_memory_cap_streams(tmp_path):
    """A 6 MB corpus is read in every format with < 1 MB of Python allocations at any time."""
    cap = 1 << 20
    line = "word " * 60
    texts = [f"{i} {line}" for i in range(20_000)]
    _write_all(tmp_path, texts)
    for path, kw in ((tmp_path / "c.txt", {}), (tmp_path / "c.jsonl", {"field": "body"}),
                     (tmp_path / "ds", {"field": "body"})):
        assert path.stat().st_size > 5 * cap or path.is_dir()
        stream = TextStream(path, **kw)
        tracemalloc.start()
        try:
            n = sum(1 for _ in stream)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == len(texts)
        assert peak < cap, (path.name, peak)


def test_streamed_profile_equals_in_memory_profile(tmp_path):
    model = wb.load_model("zoo:relu-llama")
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(80)]
    _write_all(tmp_path, texts)
    ref = wb.profile(model, texts, batch_size=4, max_length=64, max_tokens=900, probes=["neuron_stats"],
                     progress=False)
    got = profile_corpus(model, TextStream(tmp_path / "c.jsonl", field="body"), batch_size=4, max_length=64,
                         max_tokens=900, probes=["neuron_stats"], progress=False)
    assert got.meta["data"]["n_tokens"] == 900
    assert compare_runs(ref, got, rtol=0) == []
