"""Per-call timings in milliseconds: CUDA events around each call on a GPU, the wall clock
elsewhere. One helper for the acceleration handle's measurements and the benchmarks."""

from __future__ import annotations

import time

import torch


def timed_ms(fn, reps: int, device="cpu", warmup: int = 0) -> list[float]:
    """Milliseconds of each of `reps` calls of fn() after `warmup` untimed ones: on a CUDA
    `device` by CUDA events recorded around each call (waiting for the end event), else by the
    wall clock."""
    for _ in range(warmup):
        fn()
    out = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out
