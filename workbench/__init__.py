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
from workbench.capture.routing import ChunkProbe, RoutingProbe  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.models import load_model, load_tokenizer  # noqa: E402

probes = __import__("workbench.capture.probes", fromlist=["probes"])

__all__ = [
    "AbsSketch", "ActivationSample", "Adapter", "ChunkProbe", "NeuronStats", "RoutingProbe", "Rule", "Run", "WorkbenchError",
    "__version__", "accelerate", "capture", "decode_benchmark", "load_model", "load_tokenizer", "locate", "profile", "probes",
    "register_adapter",
]
