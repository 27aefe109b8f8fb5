"""The Python blocks of docs/*.md run as written, in order, one scope per page (in a scratch
directory, on the zoo, CPU). A page whose blocks cannot run here is listed in SKIP with the reason;
every other page with a Python block is run, so a new page is covered without editing this file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

# pages whose blocks need what CI does not have
SKIP = {
    "scaling.md": "needs torchrun, a corpus file and a model defined in the prose",
}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def _pages() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md") if python_blocks(p))


def _import_triton_kernels() -> None:
    import importlib
    import os

    root = Path(__file__).resolve().parents[1]
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py
    for f in sorted((root / "kernels").rglob("*.py")):
        if "@triton.jit" in f.read_text(encoding="utf-8"):
            importlib.import_module(".".join(("workbench", *f.relative_to(root).with_suffix("").parts)))


def _given_dashboard(scope: dict) -> None:
    """dashboard.md loads `runs/zoo` (made by `workbench profile --out runs/zoo` in its prose)."""
    import workbench as wb

    model = wb.load_model("zoo:relu-llama")
    wb.profile(model, ["def add(a, b):\n    return a + b"], progress=False).save("runs/zoo")


# names a page's prose defines between its blocks: (page, after block i) -> set them in the scope
BETWEEN = {
    # state.md's last block compares two runs of the state-capacity pair (its prose makes them with
    # the first block's call on zoo:mamba2-s64 / -s16); the first block's run stands in for both
    ("state.md", 0): lambda s: s.update(run_s64=s["run"], run_s16=s["run"]),
}

GIVEN = {"dashboard.md": _given_dashboard}


def test_every_page_with_code_is_run_or_skipped_with_a_reason():
    assert set(SKIP) <= set(_pages())
    assert len(_pages()) > len(SKIP)


@pytest.mark.parametrize("name", _pages())
def test_doc_python_blocks_run(name, tmp_path, monkeypatch):
    if name in SKIP:
        pytest.skip(SKIP[name])
    if name in ("dashboard.md", "state.md", "routing.md"):
        pytest.importorskip("panel", reason="panel is not installed (the viz extra)")
    try:
        from workbench.widgets import views
    except ImportError:  # no viz extra: nothing can be registered
        views = None
    registered = list(views.VIEWS) if views else []
    monkeypatch.chdir(tmp_path)
    # as on a user's CPU: the kernels' torch path, not the Triton interpreter the kernel tests use.
    # Triton fixes interpreted-or-not when a @triton.jit module is imported: import them all under
    # the interpreter first, so the kernel tests that share this process still get interpreted ones
    _import_triton_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scope: dict = {"__name__": f"__docs_{name}__"}
    if name in GIVEN:
        GIVEN[name](scope)
    try:
        for i, code in enumerate(python_blocks(DOCS / name)):
            exec(compile(code, str(DOCS / name), "exec"), scope)  # noqa: S102
            if (name, i) in BETWEEN:
                BETWEEN[name, i](scope)
    finally:
        if views:
            views.VIEWS[:] = registered  # a page that registers a view leaves the registry as it was
