"""`workbench serve` / `report`: bad input ends as `workbench: error: ...`, exit 2, before serving."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("panel", reason="panel is not installed (the viz extra)")

from workbench.widgets.app import host_warning, is_loopback  # noqa: E402

from workbench.cli import main  # noqa: E402


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench: error: ")
    return err


def test_serve_refuses_bad_run_dirs(capsys, tmp_path):
    assert "does not exist" in _err(capsys, ["serve", str(tmp_path / "nope")])
    assert "is not a workbench run (no run.json" in _err(capsys, ["serve", str(tmp_path)])
    assert "nothing to serve" in _err(capsys, ["serve"])


def test_serve_refuses_a_port_in_use(capsys, tiny_run_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _err(capsys, ["serve", str(tiny_run_dir), "--port", str(port)])
    assert f"127.0.0.1:{port}" in err and "--port" in err


def test_serve_refuses_a_model_that_does_not_load(capsys, tiny_run_dir):
    err = _err(capsys, ["serve", str(tiny_run_dir), "--port", "0", "--model", "zoo:no-such-model"])
    assert "no-such-model" in err


def test_report_cli(capsys, tiny_run_dir, damaged_run_dir, tmp_path):
    assert main(["report", str(tiny_run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 100_000
    assert "damaged" in _err(capsys, ["report", str(damaged_run_dir), "--out", str(tmp_path / "d.html")])
    assert "does not exist" in _err(capsys, ["report", str(tiny_run_dir), "--out", str(tmp_path / "x" / "r.html")])


def test_non_loopback_host_is_warned():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert host_warning("127.0.0.1", 5006) is None
    msg = host_warning("0.0.0.0", 5006, live_model=True)
    assert "reachable from other machines" in msg and "drive the model" in msg and "--host 127.0.0.1" in msg


def test_serve_reads_the_predictors_before_serving(capsys, tiny_run_dir, tmp_path, monkeypatch):
    from workbench.widgets import app

    monkeypatch.setattr(app, "serve", lambda *a, **k: pytest.fail("served before the predictors were read"))
    assert main(["serve", str(tiny_run_dir), "--port", "0", "--model", "zoo:relu-llama",
                 "--predictors", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # after the weights' progress bar
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"workbench: error: --predictors {tmp_path}: {tmp_path} holds neither predictor.json "
                           "nor a run.json; save predictors with save_predictors")
