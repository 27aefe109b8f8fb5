"""Capture: hooks + streaming probes -> Run."""

from workbench.capture.core import Capture, HookHandle, active_hooks, capture
from workbench.capture.probes import AbsSketch, ActivationSample, Batch, NeuronStats, Probe
from workbench.capture.profile import profile
from workbench.capture.rules import Rule
from workbench.capture.run import Run
from workbench.capture.sketch import SketchSpec, quantiles

__all__ = [
    "AbsSketch", "ActivationSample", "Batch", "Capture", "HookHandle", "NeuronStats", "Probe", "Rule",
    "Run", "SketchSpec", "active_hooks", "capture", "profile", "quantiles",
]
