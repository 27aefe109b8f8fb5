"""RunStore: the runs a notebook or an app session shows, loaded lazily, and the selections the
views share (`param` parameters).

    store = RunStore(["runs/a", "runs/b"])      # nothing loaded yet
    store.run_name = "b"                         # the selected run
    store.run()                                  # loaded on first use (cached for every store)
    store.layers = [0, 3]                        # views given this store show layers 0 and 3

Each browser session of the app gets its own RunStore (its own selections); the loaded Runs are
shared between sessions through a process-wide cache keyed by the run directory, so a run is read
from disk once. A run that cannot be loaded is remembered with its error (`store.error()`), which
the app shows as an error panel.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import panel as pn
import param

from workbench.errors import RunError, WorkbenchError

_CACHE: dict[tuple, object] = {}      # (resolved path, mtime of run.json) -> Run | WorkbenchError
_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


def _key(path: Path) -> tuple:
    meta = path / "run.json"
    try:
        mtime = meta.stat().st_mtime_ns
    except OSError:
        mtime = None
    return (str(path), mtime)


def load_cached(path: str | os.PathLike):
    """`Run.load(path)` once per process (and again after run.json changes); a load error is
    cached too and raised again."""
    from workbench.capture.run import Run

    path = Path(path).resolve()
    with _GUARD:
        lock = _LOCKS.setdefault(str(path), threading.Lock())
    with lock:  # one session loads, the others wait for it instead of loading the run again
        key = _key(path)
        if key not in _CACHE:
            try:
                _CACHE[key] = Run.load(path)
            except WorkbenchError as exc:
                _CACHE[key] = exc
            except Exception as exc:  # noqa: BLE001 - anything else in a run dir is damage too
                _CACHE[key] = RunError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the run is damaged, "
                                       "re-create it")
        got = _CACHE[key]
    if isinstance(got, Exception):
        raise got
    return got


def _names(paths: list[Path]) -> dict[str, Path]:
    """Short unique names for run directories: the folder name, its parent added on a clash."""
    out: dict[str, Path] = {}
    for p in paths:
        name = p.name or str(p)
        if name in out:
            name = f"{p.parent.name}/{p.name}"
        i = 2
        base = name
        while name in out:
            name = f"{base} ({i})"
            i += 1
        out[name] = p
    return out


NO_COMPARE = "(none)"


class RunStore(pn.viewable.Viewer):
    """Loaded runs (lazily, by name) and the selections shared by the views of one session."""

    run_name = param.Selector(default=None, objects=[], doc="the run the views show")
    compare_name = param.Selector(default=NO_COMPARE, objects=[NO_COMPARE],
                                  doc="a second run shown beside it by the views that compare two runs")
    layers = param.List(default=[], item_type=int, doc="layers the views show ([] = all)")

    def __init__(self, runs=(), **params):
        from workbench.capture.run import Run

        if isinstance(runs, (str, os.PathLike, Run)):
            runs = [runs]
        self._paths: dict[str, Path] = {}
        self._runs: dict[str, Run] = {}
        if isinstance(runs, dict):
            items = list(runs.items())
        else:
            paths = [r for r in runs if not isinstance(r, Run)]
            named = _names([Path(p) for p in paths])
            items = list(named.items())
            for i, r in enumerate(r for r in runs if isinstance(r, Run)):
                items.append((self._run_label(r, i), r))
        for name, r in items:
            if isinstance(r, Run):
                self._runs[name] = r
            else:
                self._paths[name] = Path(r)
        names = list(dict.fromkeys([n for n, _ in items]))
        super().__init__(**params)
        self.param.run_name.objects = names
        self.param.compare_name.objects = [NO_COMPARE, *names]
        if self.run_name is None and names:
            self.run_name = names[0]

    @staticmethod
    def _run_label(run, i: int) -> str:
        src = run.meta.get("model", {}).get("source") or run.meta.get("model", {}).get("class") or "run"
        return f"{src} [{i}]" if i else str(src)

    @property
    def names(self) -> list[str]:
        return list(self.param.run_name.objects)

    def path(self, name: str | None = None) -> Path | None:
        return self._paths.get(name or self.run_name)

    def run(self, name: str | None = None):
        """The Run called `name` (default: the selected one), loaded on first use; raises the
        RunError of a damaged or foreign run."""
        name = name or self.run_name
        if name in self._runs:
            return self._runs[name]
        if name not in self._paths:
            raise RunError(f"no run called {name!r} here (runs: {', '.join(self.names) or 'none'}); "
                           "pass its directory when starting: workbench serve RUN_DIR")
        return load_cached(self._paths[name])

    def other(self):
        """The run chosen to compare with (None when none is chosen, or it is the shown run);
        raises the RunError of a damaged one."""
        name = self.compare_name
        if name in (None, NO_COMPARE) or name == self.run_name:
            return None
        return self.run(name)

    def error(self, name: str | None = None) -> str | None:
        """The message of the load error of run `name`, or None when it loads."""
        try:
            self.run(name)
        except WorkbenchError as exc:
            return str(exc)
        return None

    def __panel__(self):
        return pn.widgets.Select.from_param(self.param.run_name, name="run")


__all__ = ["RunStore", "load_cached"]
