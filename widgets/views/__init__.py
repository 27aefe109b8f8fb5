"""Views: one `pn.viewable.Viewer` per analysis, and the registry that maps a Run to its views.

Adding an analysis view is one class plus one line:

    from workbench.widgets.views import View, register_view

    @register_view
    class RoutingView(View):
        title = "Routing"
        needs = "routing"            # what this view reads; `missing(run)` says how to get it

        @classmethod
        def applies(cls, run) -> bool:          # can this Run feed the view?
            return any(k.startswith("routing/") for k in run.tensors)

        @classmethod
        def missing(cls, run) -> str:           # shown when it cannot (which analysis to run)
            return "this run has no routing statistics: profile with probes=[wm.RoutingProbe()]"

        def __panel__(self):                    # built from the pure functions in figures.py
            ...

`views_for(run)` lists the registered view classes that apply to a run, in registration order;
`all_views()` lists every registered one and `make_view(cls, run, store)` builds a view, or, for a
run that lacks its data, an alert saying which analysis to run. Views take the Run as `run` (and
optionally the shared `store`); they must work both in a notebook cell and inside the served app.

Optional extras a view may use (the base class works without them):
- `self.link_store("layers", ...)`: keep parameters of the view and of the store (the shared
  selections of a session, `workbench.widgets.store.RunStore`) in step, both ways.
- `figures()`: the (title, plotly Figure) pairs the view shows now; `workbench report` writes them
  into the static HTML report. The default returns `self.figure` when the view has one.
- `live = True` on a view that takes a live model (`model`) instead of a Run (acceleration).
"""

from __future__ import annotations

import panel as pn
import param

VIEWS: list[type] = []


class View(pn.viewable.Viewer):
    """Base of every analysis view: a Run in, a Panel layout out (`__panel__`)."""

    title = "view"
    needs = ""
    run = param.Parameter(doc="the workbench Run this view shows")
    store = param.Parameter(default=None, doc="the shared RunStore (selections), when inside the app")
    other = param.Parameter(default=None, doc="a second Run shown beside `run` (views with `compares`)")
    names = param.Tuple(default=("run", "other"), length=2, doc="the two runs' names in titles and legends")

    compares = False  # True: the view shows `other` beside `run` when given one (the app's "compare with")

    @classmethod
    def applies(cls, run) -> bool:
        raise NotImplementedError

    live = False
    order = 50  # place among the views (lower first); registration order breaks ties

    @classmethod
    def missing(cls, run) -> str:
        return f"this run has no data for the {cls.title} view"

    def missing_pane(self):
        """What `__panel__` shows when `run` cannot feed this view (None when it can): which
        analysis to run instead, never an error from inside the view."""
        if self.run is None:
            return pn.pane.Alert(f"**{self.title}**: no run", alert_type="warning")
        if not self.applies(self.run):
            return pn.pane.Alert(f"**{self.title}**: {self.missing(self.run)}", alert_type="warning")
        return None

    def link_store(self, *names: str) -> None:
        """Keep the parameters `names` of this view and of `self.store` equal, both ways (no-op
        without a store, or for a name the store lacks)."""
        store = self.store
        if store is None:
            return
        names = [n for n in names if n in store.param and n in self.param]
        if not names:
            return
        for n in names:
            v = self._fit(n, getattr(store, n))
            if v is not None:
                setattr(self, n, v)

        def to_view(*events):
            for e in events:
                v = self._fit(e.name, e.new)
                if v is not None and v != getattr(self, e.name):
                    setattr(self, e.name, v)

        def to_store(*events):
            for e in events:
                if e.new != getattr(store, e.name):
                    setattr(store, e.name, list(e.new) if isinstance(e.new, list) else e.new)

        store.param.watch(to_view, names)
        self.param.watch(to_store, names)

    def _fit(self, name: str, value):
        """`value` restricted to what parameter `name` of this view accepts (None: leave it)."""
        p = self.param[name]
        objs = getattr(p, "objects", None)
        if isinstance(value, list) and isinstance(objs, list) and objs:
            kept = [v for v in value if v in objs]
            return kept if kept or not value else None
        if objs and value not in objs:
            return None
        return value

    def figures(self) -> list[tuple[str, object]]:
        """(title, plotly Figure) of what the view shows now (for the static report)."""
        fig = getattr(self, "figure", None)
        return [(self.title, fig)] if fig is not None else []


def register_view(cls: type) -> type:
    """Class decorator: add a view class to the registry (once)."""
    if cls not in VIEWS:
        VIEWS.append(cls)
    return cls


def views_for(run) -> list[type]:
    """The registered view classes whose `applies(run)` is true."""
    _load_builtin_views()
    return [v for v in _ordered() if not getattr(v, "live", False) and v.applies(run)]


def _ordered() -> list[type]:
    return sorted(VIEWS, key=lambda v: (getattr(v, "order", 50), VIEWS.index(v)))


def all_views() -> list[type]:
    """Every registered view class, in registration order."""
    _load_builtin_views()
    return _ordered()


def make_view(cls: type, run, store=None, other=None, names=None):
    """`cls(run=run, store=store)` when the run feeds it, else an alert with `cls.missing(run)`.
    With `other` (and its `names`), a view that `compares` and that `other` feeds too shows both."""
    if cls.applies(run):
        if other is not None and cls.compares and cls.applies(other):
            return cls(run=run, store=store, other=other, names=tuple(names or ("run", "other")))
        return cls(run=run, store=store)
    return pn.pane.Alert(f"**{cls.title}**: {cls.missing(run)}", alert_type="warning")


def _load_builtin_views() -> None:
    """Import the view modules shipped with the workbench so that they register themselves."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
