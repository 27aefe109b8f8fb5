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


def check_count(value, name: str, error: type = CaptureError, none_ok: bool = False) -> None:
    """Raise `error` naming `name` unless `value` is a whole number >= 1 (or None with none_ok)."""
    import numbers

    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"{name} must be a whole number >= 1{' (or None)' if none_ok else ''}; got {value!r}")
