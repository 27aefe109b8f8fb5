"""Host time of one eager FFN call, dense module vs swapped module with and without per-call graphs.

    PYTHONPATH=$PWD python3 benchmarks/diagnostics/diag_call_overhead.py

One decoder layer's FFN of each 7B shape (the P5 Llama's gated FFN, bf16, FATReLU at 90 % sparsity;
OPT-6.7B's FFN, fc1 -> activation_fn -> fc2 as the decoder layer calls them, 90 % zero
activations; accelerated, fc1 is the SparsePlainFFN and the other two pass through), one token:
host microseconds to issue a call (no
synchronisation in the loop) and wall microseconds including the GPU, and the time a call's graph
capture takes (the first call after a switch).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import workbench as wb  # noqa: E402
from benchmarks.diagnostics.diag_eager_overhead import per_call_us  # noqa: E402


def main():
    from benchmarks.bench_decode import p5_setup
    from benchmarks.bench_decode_plain import SHAPE, build, sparsify

    gen = torch.Generator().manual_seed(2)
    llama, _, _, _, xs = p5_setup(2)
    opt = build(2, "cuda")
    sparsify(opt, torch.randint(0, SHAPE["vocab"], (1, 128), generator=gen).cuda(), 0.9)
    x = xs[0][:1][None]
    layer = opt.model.decoder.layers[0]

    def opt_ffn():  # the decoder layer's own sequence, whatever is swapped in
        return lambda h: layer.fc2(layer.activation_fn(layer.fc1(h)))

    cases = [("llama mlp", llama, lambda: llama.model.layers[0].mlp, x),
             ("opt ffn", opt, opt_ffn, torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16))]
    with torch.no_grad():
        for name, model, get, inp in cases:
            host, wall = per_call_us(lambda: get()(inp))  # noqa: B023
            print(f"{name:10s} dense         host {host:6.1f} us, wall {wall:6.1f} us")
            for cg in (False, True):
                h = wb.accelerate(model, mode="exact", backend="triton", call_graphs=cg)
                mod = get()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                mod(inp)
                torch.cuda.synchronize()
                first = (time.perf_counter() - t0) * 1e3
                host, wall = per_call_us(lambda: mod(inp))  # noqa: B023
                print(f"{name:10s} call_graphs={cg!s:5s} host {host:6.1f} us, wall {wall:6.1f} us "
                      f"(first call after the switch {first:.2f} ms)")
                h.off()


if __name__ == "__main__":
    main()
