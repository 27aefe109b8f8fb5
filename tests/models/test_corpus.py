"""The committed corpus: domains, split, hashes, and clear errors for damaged shards."""

from __future__ import annotations

import hashlib
import lzma
import shutil

import pytest

from workbench.errors import ModelLoadError
from workbench.models import corpus


def test_manifest_hashes_match_the_shards():
    man = corpus.manifest()
    for s in man["shards"]:
        raw = (corpus.CORPUS_DIR / s["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]
    total = sum(f.stat().st_size for f in corpus.CORPUS_DIR.iterdir())
    assert total < 8e6


def test_every_domain_in_both_splits_and_split_is_fixed():
    for split in corpus.SPLITS:
        docs = corpus.load_split(split)
        assert {d.domain for d in docs} == set(corpus.DOMAINS)
        assert all(corpus.split_of(d.id) == split for d in docs[:500])


def test_documents_match_their_manifest_hashes():
    man = corpus.manifest()
    want = {e[0]: e[4] for e in man["documents"]}
    for d in corpus.load_split("validation"):
        assert hashlib.sha256(d.text.encode()).hexdigest()[:16] == want[d.id]


def test_generators_are_deterministic():
    a = corpus._math_docs(3, 7) + corpus._records_docs(3, 7)
    b = corpus._math_docs(3, 7) + corpus._records_docs(3, 7)
    assert a == b


def test_docstrings_are_stripped_from_code():
    src = 'def f(x):\n    """Doc here."""\n    return x\n\n\nclass A:\n    """Only doc."""\n'
    code, docs = corpus._strip_docstrings(src)
    assert "Doc here" not in code and "Only doc" not in code
    assert docs == ["Doc here.", "Only doc."]
    compile(code, "<t>", "exec")


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_damaged_shard_names_the_file_and_the_fix(tmp_path, damage):
    dst = tmp_path / "corpus"
    shutil.copytree(corpus.CORPUS_DIR, dst)
    f = dst / "validation-00.jsonl.xz"
    if damage == "missing":
        f.unlink()
    else:
        f.write_bytes(lzma.compress(b'{"id": "x", "domain": "prose", "source": "", "text": ""}\n'))
    with pytest.raises(ModelLoadError, match=r"validation-00\.jsonl\.xz.*(missing|corrupted).*corpus build"):
        corpus.load_split("validation", dst)
