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

`views_for(run)` lists the registered view classes that apply to a run, in registration order.
Views take the Run as `run` (and optionally the shared `store`); they must work both in a
notebook cell and inside the served app.
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

    @classmethod
    def applies(cls, run) -> bool:
        raise NotImplementedError

    @classmethod
    def missing(cls, run) -> str:
        return f"this run has no data for the {cls.title} view"


def register_view(cls: type) -> type:
    """Class decorator: add a view class to the registry (once)."""
    if cls not in VIEWS:
        VIEWS.append(cls)
    return cls


def views_for(run) -> list[type]:
    """The registered view classes whose `applies(run)` is true."""
    _load_builtin_views()
    return [v for v in VIEWS if v.applies(run)]


def _load_builtin_views() -> None:
    """Import the view modules shipped with the workbench so that they register themselves."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
