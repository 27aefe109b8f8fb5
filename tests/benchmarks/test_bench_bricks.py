"""bench_bricks.py runs end to end at a toy layer shape on the CPU (the GPU command's code path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_bricks_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bricks.py"), "--smoke-cpu",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    doc = json.loads((tmp_path / "bricks_smoke.json").read_text())
    lay = doc["layer"]
    assert doc["device"] == "cpu (smoke test)" and lay["d_ff"] == 96 and lay["tokens"] == 2048
    assert lay["counts_exact_vs_fp64"] is True and lay["ratio"] > 0 and lay["state_dtype"] == "torch.int64"
    assert 0.3 < lay["activation_sparsity"] < 0.7  # ReLU on random weights
