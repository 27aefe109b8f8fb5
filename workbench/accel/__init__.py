"""Live acceleration: swap FFN modules for kernel-backed ones (see the kernels issue)."""
