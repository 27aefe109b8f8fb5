"""Live acceleration: swap FFN modules for kernel-backed ones (`accelerate`), measure the effect,
and time greedy decoding dense vs accelerated (`decode_benchmark`, CUDA graphs on GPU)."""

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path


def _ensure_kernels() -> None:
    """workbench.kernels maps to the top-level kernels/ folder through setuptools' package-dir;
    from a plain checkout (PYTHONPATH=., as on the GPU machine) load it from the source tree."""
    try:
        import workbench.kernels  # noqa: F401

        return
    except ImportError:
        pass
    import workbench

    root = _Path(__file__).resolve().parents[2] / "kernels"
    spec = _ilu.spec_from_file_location("workbench.kernels", root / "__init__.py",
                                        submodule_search_locations=[str(root)])
    mod = _ilu.module_from_spec(spec)
    _sys.modules["workbench.kernels"] = mod
    spec.loader.exec_module(mod)
    workbench.kernels = mod


_ensure_kernels()

from workbench.accel.core import Accelerator, Measurement, accelerate  # noqa: E402
from workbench.accel.decode import decode_benchmark  # noqa: E402
from workbench.accel.ffn import (  # noqa: E402
    FusedAway,
    SparseDown,
    SparseFFN,
    SparseMoE,
    SparsePlainFFN,
    SparsePredictedUp,
)

__all__ = ["Accelerator", "FusedAway", "Measurement", "SparseDown", "SparseFFN", "SparseMoE", "SparsePlainFFN",
           "SparsePredictedUp", "accelerate", "decode_benchmark"]
