"""Model loading (hub id, local directory, zoo:NAME) and the workbench's own architectures.

Light to import (the CLI's `zoo` command lives here): `load_model` / `load_tokenizer` load their
module on first use, and the workbench's own architectures (BlockFFN) are registered with
transformers' Auto classes by `load_model`, or by `import workbench.models.blockffn`.
"""

from __future__ import annotations

import importlib

__all__ = ["load_model", "load_tokenizer"]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module("workbench.models.loading"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workbench.models' has no attribute {name!r}")
