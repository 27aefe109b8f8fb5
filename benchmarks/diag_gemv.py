"""Dense one-token GEMV: cuBLAS (F.linear) against the Triton `dense_gemv` kernel for the shapes of
the sparse FFN's dense parts (gate 4096x11008 / 4096x14336, predictor 1024x4096 and 11008x1024)
and attention's 4096x4096, fp16 and bf16, graph replays over rotated weights (more than 3x the L2
read between two uses of a copy).

    PYTHONPATH=$PWD python3 benchmarks/diag_gemv.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import bench, log, n_copies, rand_w, rotating  # noqa: E402
from workbench.kernels.dense_gemv.triton import default_config, gemv  # noqa: E402

SHAPES = [(11008, 4096), (14336, 4096), (4096, 4096), (1024, 4096), (11008, 1024)]  # (K, N)
SWEEP = [
    dict(R=1, BN=4096, num_warps=4), dict(R=2, BN=4096, num_warps=4),
    dict(R=1, BN=4096, num_warps=8), dict(R=4, BN=4096, num_warps=8),
    dict(R=2, BN=2048, num_warps=4), dict(R=1, BN=2048, num_warps=4),
    dict(R=4, BN=1024, num_warps=4), dict(R=8, BN=1024, num_warps=4),
    dict(R=16, BN=1024, num_warps=8), dict(R=2, BN=1024, num_warps=2),
]  # fmt: skip


def main():
    for dt in (torch.float16, torch.bfloat16):
        for k, n in SHAPES:
            mb = k * n * 2 / 1e6
            nw = n_copies(k * n * 2, 50 * 2**20)
            ws = [rand_w(k, n, dt) for _ in range(nw)]
            xs = [torch.randn(1, n, device="cuda").to(dt) for _ in range(nw)]
            sets = list(zip(xs, ws))
            base = bench(rotating(lambda x, w: F.linear(x, w), sets), 10)
            ref = F.linear(xs[0], ws[0]).float()
            log(f"{str(dt)[6:]} K={k} N={n} ({mb:.1f} MB, {nw} copies): cuBLAS {base * 1e3:.2f} us "
                f"({mb / base / 1e3:.2f} TB/s); default {default_config(k, n)}")  # fmt: skip
            for cfg in [None] + [c for c in SWEEP if c["BN"] <= max(1024, n)]:
                ms = bench(rotating(lambda x, w, cfg=cfg: gemv(x, w, config=cfg), sets), 10)
                y = gemv(xs[0], ws[0], config=cfg).float()
                err = ((y - ref).norm() / ref.norm()).item()
                log(f"  triton {cfg or 'default'}: {ms * 1e3:.2f} us ({mb / ms / 1e3:.2f} TB/s, "
                    f"x{base / ms:.3f} vs cuBLAS), rel diff {err:.1e}")  # fmt: skip
            del ws, xs, sets
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
