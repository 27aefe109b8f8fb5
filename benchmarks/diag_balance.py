"""Does the spread of active rows over the chunks cost P1 time? (one token, library default)

The one-token kernel gives each program a fixed chunk of d_ff rows; with uniformly random masks
the number of active rows per chunk is binomial, the grid is one wave, and the layer ends with
the program that has the most rows (passes of BK). This script times, in one run:
- the library default on uniformly random masks (the P1 benchmark's masks);
- the same on "balanced" masks: exactly round((1-s) * rows) active rows in every chunk of the
  kernel's grid (same sparsity, same bytes, no spread between programs);
- s = 1.0 (no active row: the fixed cost of the launch, the list and the split reduction);
- optional extra configs (--cfgs JSON list) on the random masks;
beside cuBLAS, rotated weights, graph replays, as bench_kernels.py.

    PYTHONPATH=$PWD python3 benchmarks/diag_balance.py [--shapes 4096x11008,2048x8192]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import DEV, K, bench, exact_active, log, n_copies, rand_w, rotating  # noqa: E402
from workbench.kernels.sparse_gemv.triton import default_down_config, grid_rows  # noqa: E402


def balanced_active(f: int, rows: int, s: float) -> torch.Tensor:
    m = torch.zeros(f, dtype=torch.bool, device=DEV)
    for c0 in range(0, f, rows):
        n = min(rows, f - c0)
        k = round((1 - s) * n)
        m[c0 + torch.randperm(n, device=DEV)[:k]] = True
    return m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4096x11008,2048x8192")
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95,1.0")
    p.add_argument("--cfgs", default="[]")
    p.add_argument("--rep", type=int, default=20)
    args = p.parse_args()
    cfgs = json.loads(args.cfgs)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    dt = torch.float16
    for shp in args.shapes.split(","):
        d, f = (int(v) for v in shp.split("x"))
        cfg = default_down_config(1, f, d)
        num_nb = -(-d // cfg["BN"])
        rows = grid_rows(f, num_nb, cfg["CHUNK"], torch.device(DEV)) if d >= 4096 else cfg["CHUNK"]
        nw = n_copies(0.05 * d * f * 2, l2)
        wt = [rand_w(f, d, dt) for _ in range(nw)]
        wd = [w.t().contiguous() for w in wt]
        log(f"{shp}: {nw} copies, {rows} rows a chunk, {-(-f // rows) * num_nb} programs")
        for s in (float(v) for v in args.sparsities.split(",")):
            ar = [torch.randn(1, f, device=DEV).to(dt) * exact_active(f, s).to(dt) for _ in wt]
            ab = [torch.randn(1, f, device=DEV).to(dt) * balanced_active(f, rows, s).to(dt)
                  for _ in wt]  # fmt: skip
            cnt = (ar[0] != 0).reshape(-1)
            pad = -(-f // rows) * rows - f
            per = torch.nn.functional.pad(cnt.float(), (0, pad)).reshape(-1, rows).sum(1)
            base = bench(rotating(lambda a, w: F.linear(a, w), list(zip(ar, wd))), args.rep)
            t_r = bench(rotating(lambda a, w: K.sparse_down(a, w), list(zip(ar, wt))), args.rep)
            t_b = bench(rotating(lambda a, w: K.sparse_down(a, w), list(zip(ab, wt))), args.rep)
            t_r2 = bench(rotating(lambda a, w: K.sparse_down(a, w), list(zip(ar, wt))), args.rep)
            line = (
                f"  s={s}: cuBLAS {base * 1e3:.2f} us; default random {t_r * 1e3:.2f} / "
                f"{t_r2 * 1e3:.2f} us (x{base / t_r:.2f}), balanced {t_b * 1e3:.2f} us "
                f"(x{base / t_b:.2f}); active rows a chunk (random) mean {per.mean():.1f} "
                f"max {per.max():.0f}"
            )
            for c in cfgs:
                try:
                    t_c = bench(
                        rotating(lambda a, w, c=c: K.sparse_down(a, w, config=c), list(zip(ar, wt))),
                        args.rep,
                    )
                    y = K.sparse_down(ar[0], wt[0], config=c).float()
                    ref = F.linear(ar[0], wd[0]).float()
                    err = ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                    line += f"\n    {c}: {t_c * 1e3:.2f} us (x{base / t_c:.2f}), rel err {err:.1e}"
                except Exception as e:  # noqa: BLE001 - a config that fails must not stop the run
                    line += f"\n    {c}: FAILED {type(e).__name__}: {e}"
            log(line)
        del wt, wd
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
