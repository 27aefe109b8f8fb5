"""A/B of the dense GEMV's weight prefetch before the PDL wait (kernels/dense_gemv, config
"prefetch") inside P5's decode: runs benchmarks/bench_decode.py with the library default's
prefetch forced on or off, the other arguments passed through.

    PYTHONPATH=$PWD python3 benchmarks/ab_decode_gemv_prefetch.py --prefetch off --layers 32 --compile on
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402,F401  (makes workbench.kernels importable from the tree)

G = importlib.import_module("workbench.kernels.dense_gemv.triton")

args = sys.argv[1:]
on = "on"
if "--prefetch" in args:
    i = args.index("--prefetch")
    on = args[i + 1]
    del args[i : i + 2]
if on not in ("on", "off"):
    raise SystemExit("--prefetch on|off")
_default = G.default_config
G.default_config = lambda k, n, _on=on == "on": dict(_default(k, n), prefetch=_on)
print(f"ab_decode_gemv_prefetch: GEMV weight prefetch before the PDL wait: {on}")
sys.argv = [str(Path(__file__).with_name("bench_decode.py"))] + args
runpy.run_path(sys.argv[0], run_name="__main__")
