"""The GPU benchmark scripts run end to end on a toy shape on the CPU (reference path), so that
they do not rot between device sessions: accuracy_7b.py and bench_decode.py's sensitivity check."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_accuracy_7b_smoke(tmp_path):
    _run("accuracy_7b.py", "--smoke-cpu", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "accuracy_7b.json").read_text())
    rows = doc["rows"]
    assert {(r["dtype"], r["rule"]) for r in rows} == {
        (d, r) for d in ("bf16", "fp16") for r in ("relu0", "fatrelu_q0.9")}
    pairs = {r["pair"] for r in rows}
    assert {"exact_vs_dense", "chunk_vs_dense8", "dense_split_vs_dense", "exact_vs_fp32"} <= pairs
    assert len(rows) == 4 * len(pairs)
    for r in rows:
        assert math.isfinite(r["logits_rel_rms"]) and 0.0 <= r["top1_agreement"] <= 1.0
        if r["pair"] == "exact_run2_vs_run1":  # the torch reference path is deterministic
            assert r["logits_rel_rms"] == 0.0
    assert abs(rows[0]["ffn_sparsity"] - 0.5) < 0.1  # ReLU on random weights
    assert doc["criterion"]["logits_rel_rms_max"] == 1e-2 and doc["device"] == "cpu (smoke test)"


def test_bench_decode_sensitivity_smoke(tmp_path):
    _run("bench_decode.py", "--smoke-cpu", "--sensitivity-only", "--layers", "2", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "decode_p5.json").read_text())
    sens = doc["sensitivity"]["2L"]
    for rule in ("relu0", "fatrelu_q0.9"):
        assert set(sens[rule]) == {"dense_split_order_vs_dense", "exact_vs_dense", "exact_run2_vs_run1"}
        assert sens[rule]["exact_run2_vs_run1"]["logits_rel_rms"] == 0.0
