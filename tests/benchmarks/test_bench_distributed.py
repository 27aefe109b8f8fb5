"""benchmarks/bench_distributed.py's GPU measurement (world size 1, plain vs distributed path)
runs end to end at a toy shape on the CPU, in this process (gloo, world size 1)."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import transformers  # noqa: F401

import workbench  # noqa: F401  (imported here so the test time is the benchmark's)

ROOT = Path(__file__).resolve().parents[2]


def test_bench_distributed_world1_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_distributed", ROOT / "benchmarks" / "bench_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     WB_BENCH_COMMAND="python benchmarks/bench_distributed.py --smoke-cpu").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["bench_distributed.py", "--worker-world1", "--smoke-cpu", "--tokens", "512",
                                      "--repeats", "1", "--out", str(tmp_path)])
    mod.main()
    doc = json.loads((tmp_path / "distributed_smoke.json").read_text())
    assert doc["backend"] == "gloo" and doc["world_size"] == 1 and doc["tokens"] == 512
    assert doc["runs_equal_exactly"] is True
    assert doc["cost_ratio_median"] > 0 and doc["criterion"] == "cost_ratio_median <= 1.02"
    assert doc["command"] == "python benchmarks/bench_distributed.py --smoke-cpu"
