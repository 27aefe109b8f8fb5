"""`workbench serve` / `report` argument mistakes (and a missing viz extra) end in one
`workbench: error:` line, exit 2, before anything is served; no panel needed."""

from __future__ import annotations

import sys

import pytest

from tests.cli.test_profile_errors import only_error
from workbench.cli import main

VIZ = "the dashboard needs the viz extra (panel, plotly): bash scripts/setup.sh viz"


@pytest.mark.parametrize("missing", ["panel", "plotly"])
@pytest.mark.parametrize("argv", [["report", "RUN", "--out", "x.html"], ["serve", "RUN"]])
def test_missing_viz_extra(capsys, monkeypatch, tmp_path, missing, argv):
    monkeypatch.setitem(sys.modules, missing, None)  # `import panel` now fails as if not installed
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert only_error(err) == VIZ


def test_predictors_without_model(capsys, tmp_path):
    assert main(["serve", "--predictors", str(tmp_path), str(tmp_path)]) == 2
    assert only_error(capsys.readouterr().err) == (
        "--predictors needs --model SOURCE (the predictors drive the live model's acceleration view); "
        "add --model, or drop --predictors")


def test_predictors_path_missing(capsys, tmp_path, monkeypatch):
    import workbench

    monkeypatch.setattr(workbench, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    assert main(["serve", "--model", "zoo:relu-llama", "--predictors", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert only_error(capsys.readouterr().err) == (
        f"--predictors {tmp_path / 'nope'} does not exist; pass a predictor directory written by "
        "save_predictors (or zoo:NAME for a zoo model's committed one)")
