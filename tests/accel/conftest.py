"""tests/accel runs from a plain checkout too (the GPU machine has no installed package): load
workbench.kernels from the source tree the way tests/kernels does."""

from tests.kernels.conftest import _ensure_workbench_kernels

_ensure_workbench_kernels()
