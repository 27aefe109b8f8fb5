"""Triton helpers shared by several kernels (device code only)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 x rounded to DT (round to nearest even), kept in fp32. bf16 is rounded on the bits:
    the Triton interpreter's fp32 -> bf16 cast truncates, the compiled one rounds."""
    if DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)
