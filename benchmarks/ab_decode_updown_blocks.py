"""A/B of the predicted updown kernel's blocks (MODE 2, bf16) inside P5's decode: runs
benchmarks/bench_decode.py with `--blocks JSON` merged into the bf16 MODE 2 defaults
(kernels/sparse_ffn/updown.DEFAULT_UPDOWN_BF16), the other arguments passed through.

    PYTHONPATH=$PWD python3 benchmarks/ab_decode_updown_blocks.py --blocks '{"CHUNK": 32, "num_warps": 8}' \
        --layers 32 --modes predictor --compile on
"""

from __future__ import annotations

import importlib
import json
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402,F401  (makes workbench.kernels importable from the tree)

U = importlib.import_module("workbench.kernels.sparse_ffn.updown")

args = sys.argv[1:]
blocks = {}
if "--blocks" in args:
    i = args.index("--blocks")
    blocks = json.loads(args[i + 1])
    del args[i : i + 2]
U.DEFAULT_UPDOWN_BF16[2] = {**U.DEFAULT_UPDOWN_BF16.get(2, {}), **blocks}
print(f"ab_decode_updown_blocks: bf16 MODE 2 blocks {U.DEFAULT_UPDOWN[2] | U.DEFAULT_UPDOWN_BF16[2]}", flush=True)
sys.argv = [str(Path(__file__).resolve().parent / "bench_decode.py"), *args]
runpy.run_path(sys.argv[0], run_name="__main__")
