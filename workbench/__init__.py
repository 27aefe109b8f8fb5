"""The sparsity workbench: capture, measure, show and accelerate activation sparsity in LLMs.

    import workbench as wb
    model = wb.load_model("zoo:relu-llama")
    run = wb.profile(model, texts)
    run.summary()
"""

__version__ = "0.1.0"

from workbench.accel import accelerate, decode_benchmark  # noqa: E402
from workbench.adapters import Adapter, locate, register_adapter  # noqa: E402
from workbench.capture import (  # noqa: E402
    AbsSketch,
    ActivationSample,
    NeuronStats,
    Rule,
    Run,
    capture,
    profile,
)
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.models import load_model, load_tokenizer  # noqa: E402

probes = __import__("workbench.capture.probes", fromlist=["probes"])


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
