"""Live acceleration: swap FFN modules for kernel-backed ones (`accelerate`), measure the effect."""

from workbench.accel.core import Accelerator, Measurement, accelerate
from workbench.accel.ffn import SparseFFN

__all__ = ["Accelerator", "Measurement", "SparseFFN", "accelerate"]
