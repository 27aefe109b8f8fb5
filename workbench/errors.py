"""One exception family for everything a user can cause.

Every message says what went wrong and what to do about it.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose."""


class ModelLoadError(WorkbenchError):
    """A model source could not be resolved or loaded."""


class AdapterError(WorkbenchError):
    """The adapters could not locate FFNs, routers or mixers in a model."""


class CaptureError(WorkbenchError):
    """A capture saw bad input or bad activations (empty data, NaN/Inf, ...)."""


class RunError(WorkbenchError):
    """A Run directory is damaged, foreign, or would be overwritten."""


class KernelError(WorkbenchError):
    """A kernel was called with inputs it does not support."""


class DistributedError(WorkbenchError):
    """A distributed or resumable profile cannot start or continue (environment, ranks, checkpoint)."""
