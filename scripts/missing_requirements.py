"""Print the requirements of pyproject.toml (core + the given extras) that are not satisfied,
one per line.

Usage: python scripts/missing_requirements.py [extra,extra]. torch is never printed: setup.sh
handles it (keeping an existing install).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement


def main() -> None:
    extras = [e for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if e]
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for e in extras:
        reqs += project["optional-dependencies"][e]
    out = []
    for r in reqs:
        req = Requirement(r)
        if req.name == "torch":
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            out.append(r)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(r)
    for r in dict.fromkeys(out):
        print(r)


if __name__ == "__main__":
    main()
