"""The GPU benchmark scripts run end to end on a toy shape on the CPU (reference path), so that
they do not rot between device sessions: accuracy_7b.py and bench_decode.py's sensitivity check;
and profile_timeline.py's trace summary on a synthetic trace."""

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


def test_profile_timeline_summary(tmp_path):
    """The trace-to-timeline step of profile_timeline.py on a synthetic chrome trace (MoE layer): warm-up
    layers (a separate segment) are left out, every replayed layer counts, times are relative to
    the router's start and the period excludes the jump between replays."""
    calls, replays = 40, 3
    plan = [{"tokens": 8, "cls": 0.8, "layer": "moe", "calls": calls, "replays": replays,
             "kernels": ["router", "_expert_up_kernel", "_expert_down_kernel"]}]
    ev, t = [], 0.0  # us
    for _ in range(3):  # warm-up calls, then a long pause
        ev += [{"cat": "kernel", "name": n, "ts": t + dt, "dur": 1.0} for n, dt in
               (("_router_logits_kernel", 0), ("_expert_up_kernel", 2), ("_expert_down_kernel", 4))]
        t += 50.0
    t += 5000.0
    for _ in range(replays):
        for _ in range(calls):
            ev += [{"cat": "kernel", "name": "_router_logits_kernel", "ts": t, "dur": 6.0},
                   {"cat": "kernel", "name": "_expert_up_kernel", "ts": t + 3.0, "dur": 15.0},
                   {"cat": "kernel", "name": "_expert_down_kernel", "ts": t + 9.0, "dur": 18.0},
                   {"cat": "kernel", "name": "some_other_kernel", "ts": t + 1.0, "dur": 1.0}]
            t += 24.0
        t += 500.0  # between replays
    (tmp_path / "trace.json").write_text(json.dumps({"traceEvents": ev}))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "diagnostics" / "profile_timeline.py"),
                        "--plan", str(tmp_path / "plan.json"), "--summarize",
                        str(tmp_path / "trace.json")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == (
        "T=8 cls=0.8 (120 layers; us from the first kernel's start, medians): router 0.00-6.00 | "
        "expert_up_kernel 3.00-18.00 | expert_down_kernel 9.00-27.00 | next layer after 24.00"
    )
