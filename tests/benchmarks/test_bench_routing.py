"""benchmarks/bench_routing.py runs end to end on toy shapes on the CPU (so it does not rot
between device sessions): the probe-cost part, the memory part (fresh processes) and the heatmap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_routing_smoke(tmp_path):
    out = tmp_path / "routing.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_routing.py"), "--smoke-cpu", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["gpu"]["device"] == "cpu (smoke test)" and {x["mode"] for x in doc["gpu"]["rows"]} == {
        "routing-probe", "routing-probe-no-sample"}
    assert all(x["overhead"] > 0 for x in doc["gpu"]["rows"])
    mem = doc["memory"]
    assert [x["tokens"] for x in mem["rows"]] == [256, 1024] and mem["probe_state_equal"]
    hm = doc["heatmap"]
    assert hm["columns"] == 512 and "pooled" in hm["title"] and hm["json_bytes"] < 2_000_000
