"""benchmarks/bench_routing.py runs end to end on toy shapes on the CPU (so it does not rot
between device sessions). Its parts are called in this process (importing the script as a
module): the probe-cost part, one memory child run, and the heatmap; the subprocess wrapper
around the memory child is exercised by `python benchmarks/bench_routing.py --smoke-cpu`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_routing", ROOT / "benchmarks" / "bench_routing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_routing_smoke():
    br = _bench()
    args = br.parse_args(["--smoke-cpu"])
    gpu = br.part_gpu(args)
    assert gpu["device"] == "cpu (smoke test)" and gpu["routers"] == 2
    assert {x["mode"] for x in gpu["rows"]} == {"routing-probe", "routing-probe-no-sample", "routing-probe-cuda-graphs"}
    assert all(x["overhead"] > 0 for x in gpu["rows"])
    args.tokens = 256
    small = br._child_profile(args)
    args.tokens = 1024
    big = br._child_profile(args)
    assert (small["tokens"], big["tokens"]) == (256, 1024)
    assert small["probe_state_bytes"] == big["probe_state_bytes"]
    hm = br.part_heatmap(args)
    assert hm["columns"] == 512 and "pooled" in hm["title"] and hm["json_bytes"] < 2_000_000
