"""Every package folder is part of the distribution, under its workbench.* name."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = {"workbench": "workbench", "kernels": "workbench.kernels", "widgets": "workbench.widgets"}


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    for top, name in PREFIX.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            assert ".".join((name, *rel)) in listed, f"{init.parent} missing from [tool.setuptools] packages"


def test_kernels_and_widgets_import_as_subpackages():
    import workbench.kernels
    import workbench.widgets

    assert Path(workbench.kernels.__file__).parent == ROOT / "kernels"
    assert Path(workbench.widgets.__file__).parent == ROOT / "widgets"
