"""Host time per eager call of the sparse kernels against cuBLAS (what eager decoding pays per layer).

    PYTHONPATH=$PWD python3 benchmarks/diagnostics/diag_eager_overhead.py

Eager decoding of a 7B-shape model is bound by the CPU's launch work, not the GPU: a kernel whose
wrapper and launch take longer on the host than cuBLAS's makes an eager step slower even where its
GPU time is a fifth (the CUDA-graph decode harness removes all of it). Per call: host microseconds
to issue it (no synchronisation in the loop) and wall microseconds including the GPU, for one token
at 4096x16384 (OPT-6.7B's fc2), bf16, 90 % sparse activations.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import workbench  # noqa: E402, F401  (binds workbench.kernels from the source tree)
from workbench import kernels as K  # noqa: E402


def per_call_us(fn, n: int = 300) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def main():
    dev = "cuda"
    torch.manual_seed(0)
    d, f = 4096, 16384
    w_t = torch.randn(f, d, device=dev, dtype=torch.bfloat16) * 0.02
    b = torch.randn(d, device=dev, dtype=torch.bfloat16)
    a = torch.relu(torch.randn(1, f, device=dev) - 1.28).to(torch.bfloat16)  # ~90 % zeros
    lin = torch.nn.Linear(f, d, device=dev, dtype=torch.bfloat16)
    cases = [
        ("cuBLAS nn.Linear", lambda: lin(a)),
        ("sparse_down", lambda: K.sparse_down(a, w_t, backend="triton")),
        ("sparse_down + bias", lambda: K.sparse_down(a, w_t, bias=b, backend="triton")),
        ("sparse_down, no PDL", lambda: K.sparse_down(a, w_t, backend="triton", config={"pdl": False})),
    ]
    for name, fn in cases:
        host, wall = per_call_us(fn)
        print(f"{name:22s} host {host:6.1f} us/call, wall {wall:6.1f} us/call")
    # does a call wait for the GPU? queue ~20 ms of matmuls, then time issuing the call
    big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for name, fn in cases:
        torch.cuda.synchronize()
        for _ in range(20):
            big @ big
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        rest = (time.perf_counter() - t0) * 1e3
        print(f"{name:22s} behind ~20 ms of queued work: the call returns after {host:7.3f} ms, "
              f"the queue drains {rest:7.3f} ms later ({'waits for the GPU' if host > rest else 'asynchronous'})")


if __name__ == "__main__":
    main()
