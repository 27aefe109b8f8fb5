"""Corpora larger than memory, streamed from disk: text files, JSONL, Hugging Face `datasets`.

    texts = TextStream("corpus.jsonl")           # or a .txt, a save_to_disk folder, an .arrow file
    for ids, mask in stream_batches(texts, tokenizer, batch_size=8, max_length=512):
        ...

Nothing is read whole: text files and JSONL are read line by line (.gz / .xz
compressed ones too), a `datasets` dataset is memory-mapped Arrow
(`load_from_disk` / `Dataset.from_file`) and iterated a slice of rows at a time. The batches
equal `workbench.data.token_batches` on the same texts (same tokenization, dropping of empty
texts, padding), so a streamed profile equals an in-memory one.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from workbench.data import pad_rows
from workbench.errors import CaptureError

FORMATS = ("text", "jsonl", "datasets", "arrow")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _guess_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                or (path / "state.json").is_file():
            return "datasets"
        raise CaptureError(f"{path} is a folder but not a `datasets` dataset saved with save_to_disk "
                           "(no dataset_info.json / state.json); pass a text file, a .jsonl file, "
                           "an .arrow file or such a folder")
    names = path.name.lower().removesuffix(".gz").removesuffix(".xz")
    if names.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if names.endswith(".arrow"):
        return "arrow"
    return "text"


class TextStream:
    """Texts of a corpus on disk, read lazily, in file order; iterate it as often as needed.

    path: a UTF-8 text file (paragraphs separated by blank lines are the texts, as
    `workbench profile --text`), a JSONL file (one JSON object per line, the text under
    `field`), a folder written by `datasets.Dataset.save_to_disk` (`split` picks one of a
    DatasetDict), or an .arrow file. `fmt` overrides the guess from the name.
    """

    def __init__(self, path: str | Path, *, field: str = "text", fmt: str | None = None,
                 split: str | None = None, rows_per_read: int = 256):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CaptureError(f"corpus {self.path} does not exist; pass a text file, a .jsonl file, "
                               "an .arrow file or a folder saved by datasets' save_to_disk")
        self.fmt = fmt or _guess_format(self.path)
        if self.fmt not in FORMATS:
            raise CaptureError(f"unknown corpus format {self.fmt!r}; use one of {FORMATS}")
        self.field = field
        self.split = split
        self.rows_per_read = rows_per_read

    def describe(self) -> dict:
        """JSON-able provenance (identifies the corpus for --resume and for the ranks)."""
        d = {"corpus": str(self.path.resolve()), "format": self.fmt}
        if self.fmt in ("jsonl", "datasets", "arrow"):
            d["field"] = self.field
        if self.split is not None:
            d["split"] = self.split
        return d

    def __iter__(self) -> Iterator[str]:
        if self.fmt == "text":
            return self._paragraphs()
        if self.fmt == "jsonl":
            return self._jsonl()
        return self._arrow()

    def _paragraphs(self) -> Iterator[str]:
        buf: list[str] = []
        with _open_text(self.path) as f:
            for line in f:
                if line.strip():
                    buf.append(line)
                elif buf:
                    yield "".join(buf).strip()
                    buf = []
        if buf:
            yield "".join(buf).strip()

    def _jsonl(self) -> Iterator[str]:
        with _open_text(self.path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CaptureError(f"{self.path} line {i} is not JSON ({exc}); a JSONL corpus has "
                                       "one JSON object per line") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get(self.field), str):
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise CaptureError(f"{self.path} line {i} has no text field {self.field!r} (keys: "
                                       f"{keys}); pass the field that holds the text (--text-field)")
                yield obj[self.field]

    def _dataset(self):
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - a dependency
            raise CaptureError("reading a `datasets` corpus needs the datasets package: "
                               "pip install datasets") from exc
        if self.fmt == "arrow":
            ds = datasets.Dataset.from_file(str(self.path))  # memory-mapped, not read
        else:
            ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            if self.split is None or self.split not in ds:
                raise CaptureError(f"{self.path} holds splits {sorted(ds)}; choose one (split=... / "
                                   "--split)")
            ds = ds[self.split]
        if self.field not in ds.column_names:
            raise CaptureError(f"{self.path} has no column {self.field!r} (columns: {ds.column_names}); "
                               "pass the column that holds the text (--text-field)")
        return ds.select_columns([self.field])

    def _arrow(self) -> Iterator[str]:
        ds = self._dataset()
        for chunk in ds.iter(batch_size=self.rows_per_read):
            yield from chunk[self.field]


def stream_batches(texts: Iterable, tokenizer, *, batch_size: int = 8, max_length: int | None = 512,
                   padding_side: str = "right") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [B, S], attention_mask [B, S]) batches of `texts`, tokenized as they are read.

    The same batches as `workbench.data.token_batches(list(texts), ...)`: texts that tokenize to
    nothing are dropped, each batch is padded to its longest row on `padding_side`.
    """
    if tokenizer is None:
        raise CaptureError("got texts but no tokenizer: load the model with wb.load_model (it "
                           "attaches one) or pass tokenizer=...")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    rows: list[list[int]] = []
    for t in texts:
        if not isinstance(t, str):
            t = getattr(t, "text", t)
        ids = tokenizer(t, add_special_tokens=True, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
        if ids:
            rows.append(list(ids))
        if len(rows) == batch_size:
            yield pad_rows(rows, pad_id, padding_side)
            rows = []
    if rows:
        yield pad_rows(rows, pad_id, padding_side)
