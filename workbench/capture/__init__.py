"""Capture: hooks + streaming probes -> Run."""

from workbench.capture.bricks import CoActivation, InstanceScores
from workbench.capture.core import Capture, HookHandle, active_hooks, capture
from workbench.capture.probes import (
    AbsSketch,
    ActivationSample,
    Batch,
    HookPoint,
    ModelSite,
    NeuronStats,
    Probe,
    SiteCall,
    SiteProbe,
)
from workbench.capture.profile import profile
from workbench.capture.rules import Rule
from workbench.capture.run import Run
from workbench.capture.sketch import SketchSpec, quantiles

__all__ = [
    "AbsSketch", "ActivationSample", "Batch", "Capture", "CoActivation", "InstanceScores", "HookHandle", "HookPoint", "ModelSite",
    "NeuronStats", "Probe", "Rule", "Run", "SiteCall", "SiteProbe", "SketchSpec", "active_hooks", "capture", "profile", "quantiles",
]
