"""Kernel tests: the Triton interpreter runs the kernels on the CPU (set before triton imports).

GPU-compiled variants are marked ``gpu`` and run through the device machine
(``pytest -m gpu tests/kernels``); there TRITON_INTERPRET stays unset so the kernels compile.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_GPU_RUN = os.environ.get("WB_KERNEL_TESTS_GPU") == "1"
if not _GPU_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _ensure_workbench_kernels() -> None:
    """Make ``workbench.kernels`` importable from a plain checkout.

    The pyproject maps workbench.kernels -> kernels/ through setuptools' package-dir, which the
    editable finder does not honour for a sub-package; load it from the source tree then.
    """
    try:
        import workbench.kernels  # noqa: F401

        return
    except ImportError:
        pass
    import workbench

    root = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "workbench.kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["workbench.kernels"] = mod
    spec.loader.exec_module(mod)
    workbench.kernels = mod


_ensure_workbench_kernels()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
