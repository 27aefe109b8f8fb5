"""The offline zoo: small trained models under data/zoo/NAME.

`resolve(name)` maps `zoo:NAME` to its directory; the zoo issue fills in the registry, training
and model cards.
"""

from __future__ import annotations

from pathlib import Path

from workbench.errors import ModelLoadError

#: data/ at the repository root (editable install) holds the zoo.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
ZOO_DIR = DATA_DIR / "zoo"

#: The model the demo and the notebooks use by default.
DEFAULT_MODEL = "relu-llama"


def available() -> list[str]:
    """Names of the zoo models present on disk."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def resolve(name: str) -> Path:
    """Directory of zoo model `name`, or a clear error naming what exists."""
    path = ZOO_DIR / name
    if not (path / "config.json").is_file():
        have = ", ".join(available()) or "none"
        raise ModelLoadError(
            f"zoo model {name!r} not found under {ZOO_DIR} (available: {have}). "
            f"Rebuild it with `workbench zoo train {name}`."
        )
    return path
