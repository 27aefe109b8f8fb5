"""The zoo corpus: text present on any machine with Python, plus generated text, by domain.

Domains (the labels the bricks and routing analyses use):

- ``prose``: English docstrings of the standard library (grouped per module) and the pydoc
  topics (``pydoc_data.topics``), i.e. the language reference as prose.
- ``code``: standard-library Python source with its docstrings stripped (so prose and code do
  not share text).
- ``math``: generated arithmetic: sums, products, multi-step expressions, equations, word
  problems, with worked answers.
- ``records``: generated structured records: JSON lines, CSV tables, key-value blocks, logs.

The stdlib differs between Python versions, so the builder is run once
(``python -m workbench.models.corpus build``) and its output is committed under
``data/corpus``: xz-compressed JSON-lines shards plus ``manifest.json`` (sources, domains,
per-document hashes, the train/validation split and shard hashes). Training and every
measurement read the committed shards through :func:`load_split`, never the live stdlib.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import lzma
import os
import random
import sys
import sysconfig
import tokenize
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from workbench.errors import ModelLoadError

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
CORPUS_DIR = DATA_DIR / "corpus"
MANIFEST = "manifest.json"
DOMAINS = ("prose", "code", "math", "records")
SPLITS = ("train", "validation")
#: percent of documents (by a hash of the document id) that go to validation
VALIDATION_PERCENT = 5
SEED = 20260124
MAX_DOC_CHARS = 12_000
SHARD_CHARS = 4_000_000
BUILD_COMMAND = "python -m workbench.models.corpus build"

_SKIP_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "tkinter",
    "unittest",
    "pydoc_data",
    "encodings",
}


@dataclass(frozen=True)
class Document:
    """One corpus document: `domain` is one of DOMAINS, `source` says where the text came from."""

    id: str
    domain: str
    source: str
    text: str


# --------------------------------------------------------------------------- reading


def _check_manifest(corpus_dir: Path) -> dict:
    path = corpus_dir / MANIFEST
    if not path.is_file():
        raise ModelLoadError(
            f"corpus manifest {path} is missing. Rebuild the corpus with `{BUILD_COMMAND}` "
            "(or restore data/corpus from git)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"corpus manifest {path} is not valid JSON ({e}). Restore it from git or rebuild "
            f"with `{BUILD_COMMAND}`."
        ) from e


@lru_cache(maxsize=4)
def _load_split_cached(split: str, corpus_dir: str) -> tuple[Document, ...]:
    cdir = Path(corpus_dir)
    manifest = _check_manifest(cdir)
    docs: list[Document] = []
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        path = cdir / shard["file"]
        if not path.is_file():
            raise ModelLoadError(
                f"corpus shard {path} is missing. Restore data/corpus from git or rebuild with "
                f"`{BUILD_COMMAND}`."
            )
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
            raise ModelLoadError(
                f"corpus shard {path} is corrupted (sha256 differs from {cdir / MANIFEST}). "
                f"Restore data/corpus from git or rebuild with `{BUILD_COMMAND}`."
            )
        try:
            lines = lzma.decompress(raw).decode("utf-8").splitlines()
        except lzma.LZMAError as e:
            raise ModelLoadError(
                f"corpus shard {path} cannot be decompressed ({e}). Restore data/corpus from git "
                f"or rebuild with `{BUILD_COMMAND}`."
            ) from e
        for line in lines:
            d = json.loads(line)
            docs.append(Document(d["id"], d["domain"], d["source"], d["text"]))
    return tuple(docs)


def load_split(split: str = "train", corpus_dir: str | Path | None = None) -> list[Document]:
    """Documents of `split` ("train" or "validation") from the committed shards.

    Each shard's sha256 is checked against the manifest; a missing or damaged shard raises
    ModelLoadError naming the file and how to restore it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cdir = Path(corpus_dir) if corpus_dir is not None else CORPUS_DIR
    return list(_load_split_cached(split, str(cdir.resolve())))


def manifest(corpus_dir: str | Path | None = None) -> dict:
    """The corpus manifest (sources, domains, hashes, split) as a dict."""
    return _check_manifest(Path(corpus_dir) if corpus_dir is not None else CORPUS_DIR)


# --------------------------------------------------------------------------- building


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        for f in sorted(filenames):
            if f.endswith(".py"):
                out.append(Path(dirpath) / f)
    return out


def _split_text(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Cut `text` at line boundaries into pieces of at most about `limit` characters."""
    parts, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if n + len(line) > limit and cur:
            parts.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def _strip_docstrings(src: str) -> tuple[str, list[str]]:
    """Source without its docstrings (and the docstrings themselves, for the prose domain)."""
    tree = ast.parse(src)
    drop: set[int] = set()
    replace: dict[int, str] = {}
    docs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = node.body
        if not (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            continue
        expr = body[0]
        docs.append(ast.get_docstring(node, clean=True) or "")
        if not isinstance(node, ast.Module) and expr.lineno == node.lineno:
            continue  # one-line `def f(): "doc"`: keep it rather than break the line
        drop.update(range(expr.lineno - 1, expr.end_lineno))
        if len(body) == 1 and not isinstance(node, ast.Module):
            # a body that was only a docstring still needs a statement
            replace[expr.lineno - 1] = " " * expr.col_offset + "pass\n"
    lines = src.splitlines(keepends=True)
    code = "".join(
        replace.get(i, "") if i in drop else line for i, line in enumerate(lines)
    )
    return code, docs


def _code_and_prose() -> tuple[list[Document], list[Document]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    code_docs, prose_docs = [], []
    for path in _stdlib_files():
        rel = path.relative_to(root).as_posix()
        try:
            with tokenize.open(path) as fh:
                src = fh.read()
            code, docstrings = _strip_docstrings(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for i, part in enumerate(_split_text(code)):
            code_docs.append(Document(f"code/{rel}/{i}", "code", f"stdlib:{rel}", part))
        prose = "\n\n".join(d for d in docstrings if len(d) >= 80)
        for i, part in enumerate(_split_text(prose)):
            if len(part) >= 200:
                prose_docs.append(
                    Document(f"prose/{rel}/{i}", "prose", f"stdlib-docstrings:{rel}", part)
                )
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        for i, part in enumerate(_split_text(topics.topics[key])):
            prose_docs.append(
                Document(f"prose/topics/{key}/{i}", "prose", f"pydoc_data.topics:{key}", part)
            )
    return code_docs, prose_docs


_NAMES = (
    "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy Rupert "
    "Sybil Trent Victor Walter Yasmin Zoe Omar Priya Chen Sofia Mateo Aisha Lars Ingrid Kenji"
).split()
_SURNAMES = (
    "Smith Garcia Chen Okafor Novak Rossi Tanaka Muller Dubois Silva Kowalski Larsen Patel "
    "Nguyen Haddad Ivanova Costa Moreau Jensen Schmidt Ali Kim Brown Lopez Weber"
).split()
_CITIES = (
    "Lisbon Oslo Nairobi Lima Osaka Berlin Toronto Austin Porto Krakow Seoul Cairo Denver "
    "Madrid Dublin Quito Perth Hanoi Tunis Zurich Bergen Accra Leeds Lyon Turin"
).split()
_ITEMS = (
    "apples pears books pencils coins marbles stamps cards bottles boxes tickets shirts "
    "plates cups chairs lamps keys rings shells stones"
).split()
_PRODUCTS = (
    "widget gadget sprocket bracket valve sensor cable adapter filter pump motor switch "
    "panel hinge bearing gasket"
).split()
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARNING", "ERROR")
_EVENTS = (
    "request served",
    "cache miss",
    "cache hit",
    "connection opened",
    "connection closed",
    "job started",
    "job finished",
    "retrying upload",
    "disk usage high",
    "user logged in",
    "user logged out",
    "timeout waiting for lock",
)


def _math_problem(r: random.Random) -> str:
    k = r.randrange(9)
    if k == 0:
        a, b = r.randint(0, 999), r.randint(0, 999)
        return f"{a} + {b} = {a + b}"
    if k == 1:
        a, b = r.randint(0, 999), r.randint(0, 999)
        return f"{a} - {b} = {a - b}"
    if k == 2:
        a, b = r.randint(2, 99), r.randint(2, 99)
        return f"{a} * {b} = {a * b}"
    if k == 3:
        b, q = r.randint(2, 30), r.randint(2, 60)
        rem = r.randint(0, b - 1)
        a = b * q + rem
        return f"{a} divided by {b} is {q} remainder {rem}."
    if k == 4:
        a, b, c = r.randint(2, 40), r.randint(2, 40), r.randint(1, 200)
        ab = a * b
        return (
            f"Compute {a} * {b} + {c}. First {a} * {b} = {ab}. "
            f"Then {ab} + {c} = {ab + c}. The answer is {ab + c}."
        )
    if k == 5:
        a, x, b = r.randint(2, 12), r.randint(-20, 20), r.randint(-50, 50)
        c = a * x + b
        sb = f"+ {b}" if b >= 0 else f"- {-b}"
        return f"Solve {a}x {sb} = {c}. Then {a}x = {c - b}, so x = {x}."
    if k == 6:
        name, item = r.choice(_NAMES), r.choice(_ITEMS)
        a, b = r.randint(2, 60), r.randint(2, 60)
        if r.random() < 0.5:
            return (
                f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now? "
                f"{a} + {b} = {a + b}. {name} has {a + b} {item}."
            )
        a, b = max(a, b), min(a, b)
        return (
            f"{name} has {a} {item} and gives away {b}. How many {item} are left? "
            f"{a} - {b} = {a - b}. There are {a - b} {item} left."
        )
    if k == 7:
        a, b = r.randint(2, 200), r.randint(2, 200)
        x, y = a, b
        steps = []
        while y:
            steps.append(f"gcd({x}, {y})")
            x, y = y, x % y
        return " = ".join(steps) + f" = {x}. So gcd({a}, {b}) = {x}."
    a, e = r.randint(2, 12), r.randint(2, 5)
    return f"{a} to the power {e} is {a**e}."


def _math_docs(n_docs: int, seed: int) -> list[Document]:
    out = []
    for i in range(n_docs):
        r = random.Random(seed * 1000 + i)
        lines = [_math_problem(r) for _ in range(r.randint(30, 70))]
        out.append(Document(f"math/gen/{i}", "math", f"generated:math:seed={seed}:{i}", "\n".join(lines) + "\n"))
    return out


def _record(r: random.Random, idx: int) -> dict:
    first, last = r.choice(_NAMES), r.choice(_SURNAMES)
    return {
        "id": idx,
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}@example.org",
        "city": r.choice(_CITIES),
        "age": r.randint(18, 90),
        "product": r.choice(_PRODUCTS),
        "quantity": r.randint(1, 500),
        "price": round(r.uniform(0.5, 999.0), 2),
        "date": f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    }


def _records_doc(r: random.Random) -> str:
    n = r.randint(15, 45)
    start = r.randint(1, 90000)
    recs = [_record(r, start + j) for j in range(n)]
    fmt = r.randrange(4)
    if fmt == 0:
        keys = r.sample(list(recs[0]), r.randint(4, 7))
        return "\n".join(json.dumps({k: rec[k] for k in keys}) for rec in recs) + "\n"
    if fmt == 1:
        keys = r.sample(list(recs[0]), r.randint(4, 7))
        buf = io.StringIO()
        buf.write(",".join(keys) + "\n")
        for rec in recs:
            buf.write(",".join(str(rec[k]) for k in keys) + "\n")
        return buf.getvalue()
    if fmt == 2:
        keys = r.sample(list(recs[0]), r.randint(3, 6))
        return "\n".join("\n".join(f"{k}: {rec[k]}" for k in keys) + "\n" for rec in recs)
    lines = []
    h, m, s = r.randint(0, 23), r.randint(0, 59), r.randint(0, 59)
    day = f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    for rec in recs:
        s += r.randint(0, 40)
        m, s = m + s // 60, s % 60
        h, m = (h + m // 60) % 24, m % 60
        lines.append(
            f"{day} {h:02d}:{m:02d}:{s:02d} {r.choice(_LEVELS)} [{rec['city'].lower()}] "
            f"{r.choice(_EVENTS)} user={rec['email']} latency_ms={r.randint(1, 2000)}"
        )
    return "\n".join(lines) + "\n"


def _records_docs(n_docs: int, seed: int) -> list[Document]:
    out = []
    for i in range(n_docs):
        r = random.Random(seed * 7919 + i)
        out.append(
            Document(f"records/gen/{i}", "records", f"generated:records:seed={seed}:{i}", _records_doc(r))
        )
    return out


def split_of(doc_id: str) -> str:
    """Fixed split: a document is in validation iff a hash of its id says so."""
    h = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16)
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def build(
    out_dir: str | Path | None = None,
    *,
    n_math_docs: int = 1000,
    n_records_docs: int = 1000,
    max_code_chars: int = 7_000_000,
    seed: int = SEED,
) -> dict:
    """Build the corpus from the running Python's stdlib plus generated text; write shards.

    Returns the manifest. Code is capped at `max_code_chars` (files taken in a seeded random
    order) so the committed shards stay small.
    """
    out = Path(out_dir) if out_dir is not None else CORPUS_DIR
    out.mkdir(parents=True, exist_ok=True)
    code, prose = _code_and_prose()
    r = random.Random(seed)
    r.shuffle(code)
    kept, n = [], 0
    for d in code:
        if n + len(d.text) > max_code_chars:
            continue
        kept.append(d)
        n += len(d.text)
    docs = sorted(kept, key=lambda d: d.id) + prose + _math_docs(n_math_docs, seed) + _records_docs(
        n_records_docs, seed
    )
    for old in out.glob("*.jsonl.xz"):
        old.unlink()
    shards, entries = [], []
    for split in SPLITS:
        sdocs = [d for d in docs if split_of(d.id) == split]
        random.Random(seed + (split == "validation")).shuffle(sdocs)
        chunks: list[list[Document]] = [[]]
        size = 0
        for d in sdocs:
            if size > SHARD_CHARS:
                chunks.append([])
                size = 0
            chunks[-1].append(d)
            size += len(d.text)
        for i, chunk in enumerate(chunks):
            name = f"{split}-{i:02d}.jsonl.xz"
            payload = "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in chunk)
            raw = lzma.compress(payload.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
            (out / name).write_bytes(raw)
            shards.append(
                {
                    "file": name,
                    "split": split,
                    "documents": len(chunk),
                    "chars": sum(len(d.text) for d in chunk),
                    "bytes": len(raw),
                    "sha256": hashlib.sha256(raw).hexdigest(),
                }
            )
            for d in chunk:
                entries.append(
                    [d.id, d.domain, split, name, hashlib.sha256(d.text.encode()).hexdigest()[:16]]
                )
    stats: dict = {}
    for split in SPLITS:
        for dom in DOMAINS:
            ds = [d for d in docs if d.domain == dom and split_of(d.id) == split]
            stats.setdefault(split, {})[dom] = {
                "documents": len(ds),
                "chars": sum(len(d.text) for d in ds),
            }
    man = {
        "version": 1,
        "built_with": f"Python {sys.version.split()[0]} ({sys.platform})",
        "seed": seed,
        "domains": {
            "prose": "stdlib docstrings (per module, >= 80 chars each) + pydoc_data.topics",
            "code": "stdlib .py sources (no tests, idlelib, tkinter, ...) with docstrings stripped",
            "math": "generated arithmetic, equations, gcd, word problems with worked answers",
            "records": "generated JSON lines, CSV tables, key-value blocks and log lines",
        },
        "split_rule": f"validation iff int(sha1(id)[:8], 16) % 100 < {VALIDATION_PERCENT}",
        "stats": stats,
        "shards": shards,
        "documents_columns": ["id", "domain", "split", "shard", "sha256_16"],
        "documents": entries,
        "sources": sorted(Counter(d.source.split(":")[0] for d in docs).items()),
        "build_command": BUILD_COMMAND,
    }
    (out / MANIFEST).write_text(json.dumps(man, indent=1) + "\n")
    _load_split_cached.cache_clear()
    return man


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m workbench.models.corpus")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build data/corpus from this Python's stdlib + generators")
    b.add_argument("--out", default=None)
    sub.add_parser("stats", help="print the committed corpus's per-domain statistics")
    args = p.parse_args(argv)
    if args.cmd == "build":
        man = build(args.out)
    else:
        man = manifest()
    print(json.dumps(man["stats"], indent=1))
    print("shards:", [(s["file"], s["bytes"]) for s in man["shards"]])


if __name__ == "__main__":
    main()
