"""Session-wide pytest set-up (the repository root, so it sees notebooks/ and tests/).

Under pytest-xdist with `--dist loadgroup` (scripts/test.sh) each notebook's cells stay together
on one worker, in order (they share one kernel), while every other test goes to whichever worker
is free.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = getattr(item, "path", None)
        if path is not None and path.suffix == ".ipynb":
            item.add_marker(pytest.mark.xdist_group(path.stem))
