"""P4 exact (chunk of T tokens, gate dense): the gathered path's block shapes and stages, every
CLS, graph replays with rotated weights as in bench_kernels.py.

    python3 benchmarks/diag_chunk.py [--tokens 8,32] [--configs '[{...}, ...]'] [--stages]

Prints one line per (T, CLS, config) with the time and the speedup over the dense FFN timed in
the same run; --stages adds the gate GEMM alone and the gather path without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import K, bench, dense_ffn, rand_w, rotating, solve_rows, union_mask  # noqa: E402
from workbench.kernels.chunk_ffn.gather import gather_ffn  # noqa: E402

DEFAULT_CONFIGS = [
    {},
    {"S": 8},
    {"S": 32},
    {"BM": 32},
    {"BKD": 128},
    {"up_stages": 3},
    {"up_stages": 5},
    {"down_stages": 2},
    {"down_stages": 4},
    {"BN": 128, "S": 16},
    {"BN": 512, "S": 16, "down_warps": 8},
    {"BKR": 64, "S": 8},
    {"BKR": 16, "S": 32},
    {"S": 1, "BN": 32},
    {"S": 1, "BN": 64},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8,32")
    ap.add_argument("--cls", default="0.5,0.7,0.8")
    ap.add_argument("--configs", default="")
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--rows", action="store_true", help="also time the row-kernel path ('wide')")
    ap.add_argument("--dtype", default="fp16")
    args = ap.parse_args()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    configs = json.loads(args.configs) if args.configs else DEFAULT_CONFIGS
    d, f, nw = 4096, 11008, 3
    for t in [int(v) for v in args.tokens.split(",")]:
        wu = [rand_w(f, d, dt) for _ in range(nw)]
        wdt = [rand_w(f, d, dt) for _ in range(nw)]
        wd = [w.t().contiguous() for w in wdt]
        xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        wg0 = [rand_w(f, d, dt) for _ in range(nw)]
        base = bench(rotating(dense_ffn, list(zip(xs, wg0, wu, wd))), 10)
        print(f"T={t} dense {base * 1e3:.2f} us", flush=True)
        del wg0
        for cls in [float(v) for v in args.cls.split(",")]:
            wg = [solve_rows(xs[i], union_mask(t, f, cls), dt) for i in range(nw)]
            sets = list(zip(xs, wg, wu, wdt))
            tgt = 0.75 * 3 / (1 + 2 * (1 - cls))
            if args.stages:
                gates = [F.linear(xs[i], wg[i]) for i in range(nw)]
                tg = bench(rotating(lambda x, g, u, w: F.linear(x, g), sets), 10)
                gsets = list(zip(xs, gates, wu, wdt))
                tr = bench(rotating(lambda x, g, u, w: gather_ffn(x, g, u, w, 0.0), gsets), 10)
                print(f"  T={t} CLS={cls} stages: gate cuBLAS {tg * 1e3:.2f} us, "
                      f"union+up+down {tr * 1e3:.2f} us", flush=True)  # fmt: skip
            for c in configs:
                cfg = {"gather": c}
                ms = bench(rotating(lambda x, a, b, w, c=cfg: K.chunk_ffn(x, a, b, w, config=c),
                                    sets), 10)  # fmt: skip
                print(f"  T={t} CLS={cls} gather {json.dumps(c)}: {ms * 1e3:.2f} us "
                      f"x{base / ms:.2f} (target {tgt:.2f})", flush=True)  # fmt: skip
            if args.rows:
                wide = {"CHUNK": 256, "BK": 16, "BN": 512, "num_warps": 4 if t <= 16 else 8}
                cfg = {"rows": {"BK": 16, "BD": 512, "DS": 2048}, "down": wide}
                ms = bench(rotating(lambda x, a, b, w, c=cfg: K.chunk_ffn(x, a, b, w, config=c), sets), 10)
                print(f"  T={t} CLS={cls} rows 'wide': {ms * 1e3:.2f} us x{base / ms:.2f}", flush=True)
            y = K.chunk_ffn(xs[0], wg[0], wu[0], wdt[0])
            ref = dense_ffn(xs[0], wg[0], wu[0], wd[0])
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"  T={t} CLS={cls} rel err vs dense {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
