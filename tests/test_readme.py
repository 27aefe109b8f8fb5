"""The README's Python blocks run as written (in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks, "the README has no Python block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__readme__"}
    for code in blocks:
        exec(compile(code, str(README), "exec"), scope)  # noqa: S102
    out = capsys.readouterr().out
    # the comment in the block states the repr the block prints
    assert "Run(model='zoo:relu-llama', rule='zero', sites=6, tokens=29)" in out
    assert (tmp_path / "runs" / "mine" / "run.json").is_file()
