"""A/B of the predictor's second layer fused into the updown kernel (MODE 2) inside P5's decode:
runs benchmarks/bench_decode.py with the fusion forced on or off (default: on, see
kernels/sparse_ffn/triton._fuse_pred2), the other arguments passed through.

    PYTHONPATH=$PWD python3 benchmarks/ab_decode_fuse_pred2.py --fuse off --layers 32 --modes predictor --compile on
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402,F401  (makes workbench.kernels importable from the tree)

# (the package binds the name sparse_ffn to the public function, so import the module by path)
T = importlib.import_module("workbench.kernels.sparse_ffn.triton")

args = sys.argv[1:]
fuse = "off"
if "--fuse" in args:
    i = args.index("--fuse")
    fuse = args[i + 1]
    del args[i : i + 2]
if fuse not in ("on", "off"):
    raise SystemExit("--fuse on|off")
T._fuse_pred2 = lambda w_pred2, config, _on=fuse == "on": _on and w_pred2.shape[1] <= 1024
print(f"ab_decode_fuse_pred2: predictor second layer fused into updown: {fuse}")
sys.argv = [str(Path(__file__).with_name("bench_decode.py"))] + args
runpy.run_path(sys.argv[0], run_name="__main__")
