"""`import workbench` and `workbench --help` stay light: torch, transformers and Triton load on first use."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "triton", "pandas", "workbench.kernels")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [m for m in r.stdout.strip().split(",") if m]


def test_import_workbench_is_light():
    assert _loaded_after("import workbench") == []


def test_cli_help_is_light():
    code = ("import contextlib, io\nfrom workbench.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['profile', '--help'])")
    assert _loaded_after(code) == []


def test_public_names_resolve_and_capture_stays_the_function():
    import workbench as wb
    import workbench.capture.core  # noqa: F401  (loading the subpackage must not replace wb.capture)

    assert callable(wb.capture) and wb.capture.__module__ == "workbench.capture.core"
    for name in wb.__all__:
        assert getattr(wb, name) is not None
    assert wb.probes.__name__ == "workbench.capture.probes"
