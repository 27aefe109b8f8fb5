"""The sparsity workbench: capture, measure, show and accelerate activation sparsity in LLMs.

    import workbench as wb
    model = wb.load_model("zoo:relu-llama")
    run = wb.profile(model, texts)
    run.summary()

`import workbench` is light: the public names below load their modules on first use (PEP 562),
so torch, transformers' model classes, Triton and the kernels are imported only when a function
that needs them is called (`workbench --help` imports none of them). The zoo's own architectures
(BlockFFN) are registered with transformers' Auto classes when `workbench.models` is imported,
which `wb.load_model` does.
"""

from __future__ import annotations

import importlib
import sys
import types

from workbench.errors import WorkbenchError

__version__ = "0.1.0"

#: public name -> module that defines it (loaded on first access)
_LAZY = {
    "accelerate": "workbench.accel",
    "decode_benchmark": "workbench.accel",
    "Adapter": "workbench.adapters",
    "locate": "workbench.adapters",
    "register_adapter": "workbench.adapters",
    "AbsSketch": "workbench.capture",
    "ActivationSample": "workbench.capture",
    "NeuronStats": "workbench.capture",
    "Rule": "workbench.capture",
    "Run": "workbench.capture",
    "capture": "workbench.capture",
    "profile": "workbench.capture",
    "load_model": "workbench.models",
    "load_tokenizer": "workbench.models",
}
_LAZY_MODULES = {"probes": "workbench.capture.probes"}


def __getattr__(name: str):
    if name == "kernels":  # workbench.accel finds the kernels also from a plain checkout (PYTHONPATH=.)
        importlib.import_module("workbench.accel")
        value = sys.modules["workbench.kernels"]
    elif name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES) | {"kernels"})


class _Workbench(types.ModuleType):
    """`wb.capture` is the function, also after the import system has loaded the subpackage
    `workbench.capture` (which sets the parent's attribute to the subpackage); the subpackage stays
    importable by name (`from workbench.capture import Run`)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "capture" and isinstance(value, types.ModuleType):
            self.__dict__.pop("capture", None)  # the next wb.capture goes through __getattr__
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Workbench


def show(obj=None, **kwargs):
    """The right Panel views for a Run (or run directories, or a live model for the acceleration
    view); displays in a notebook cell. Panel is imported on the first call only."""
    from workbench.widgets.app import show as _show

    return _show(obj, **kwargs)

__all__ = [
    "AbsSketch", "ActivationSample", "Adapter", "NeuronStats", "Rule", "Run", "WorkbenchError",
    "__version__", "accelerate", "capture", "decode_benchmark", "load_model", "load_tokenizer", "locate", "profile", "probes", "show",
    "register_adapter",
]
