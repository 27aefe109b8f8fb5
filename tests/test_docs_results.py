"""Every results file that the README, docs/, benchmarks/README.md and the notebooks quote exists in
benchmarks/results/, and every file there is quoted somewhere (no stale, no orphan results)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = re.compile(r"[a-z0-9_-]+_(?:h100|h200|cpu)(?:_[a-z0-9-]+)*\.json")


def quoted() -> dict[str, set[str]]:
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    return {str(p.relative_to(ROOT)): set(NAME.findall(p.read_text(encoding="utf-8"))) for p in docs}


def test_every_quoted_results_file_exists():
    missing = {doc: sorted(n for n in names if not (RESULTS / n).is_file()) for doc, names in quoted().items()}
    assert not {d: m for d, m in missing.items() if m}


def test_every_results_file_is_quoted():
    names = set().union(*quoted().values())
    orphans = sorted(p.name for p in RESULTS.glob("*.json") if p.name not in names)
    assert not orphans
