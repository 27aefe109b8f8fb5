"""Test-wide setup: Triton runs under its CPU interpreter unless a GPU run asks otherwise.

Set before anything imports triton (pytest imports this file first). On the GPU machine,
`WB_KERNEL_TESTS_GPU=1 pytest -m gpu` compiles the kernels for real.
"""

import os

if os.environ.get("WB_KERNEL_TESTS_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
