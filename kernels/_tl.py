"""Triton helpers shared by several kernels (device code only)."""

from __future__ import annotations

import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.4 on sm_90+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: PDL is never enabled (_common.use_pdl)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With programmatic dependent launch: wait until the previous kernel has finished and its
    writes are visible. Call before the first memory access."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """With programmatic dependent launch: let the next kernel's blocks be scheduled now (they
    still wait for this kernel to finish before touching memory)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def dot_acc(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b on the tensor cores; DOT_F32 upcasts both operands to fp32 first (the
    interpreter's bf16 dot is wrong, see _common.dot_f32)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


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


@triton.jit
def split_reduce(ptrs, pmask, part, cnt_ptr, n_parts, has_part):
    """Split reduction through a zeroed fp32 workspace, graph-safe (no host sync, no memset).

    Each of the `n_parts` programs that share `ptrs` adds its fp32 `part` (when `has_part`) and
    takes a ticket from `cnt_ptr`; the program that arrives last gets (True, the sum) and leaves the
    workspace and the counter zeroed for the next call; the others get (False, zeros).
    """
    if has_part:
        tl.atomic_add(ptrs, part, mask=pmask, sem="relaxed")
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    last = ticket == n_parts - 1
    total = tl.zeros_like(part)
    if last:
        zero = tl.zeros_like(part)
        total = tl.atomic_add(ptrs, zero, mask=pmask, sem="relaxed")  # coherent read
        tl.store(ptrs, zero, mask=pmask)
        tl.store(cnt_ptr, 0)
    return last, total
