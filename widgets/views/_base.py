"""Shared plumbing of the figure views (private: not a view module, not registered)."""

from __future__ import annotations

import panel as pn
import param
from workbench.widgets.views import View

PLOT_HEIGHT = 420


def plot_pane(fig) -> pn.pane.Plotly:
    return pn.pane.Plotly(fig, sizing_mode="stretch_width", height=PLOT_HEIGHT,
                          config={"displaylogo": False, "responsive": True})


def layer_widget(p: param.ListSelector, name: str = "layers (none = all)"):
    """Toggle buttons for a few layers, a multi-choice box for many."""
    n = len(p.objects or [])
    if n <= 16:
        return pn.Column(pn.pane.Markdown(name, margin=(0, 10)),
                         pn.widgets.CheckButtonGroup.from_param(p, name=name, css_classes=["wb-layers"]),
                         width=min(60 * n + 40, 700))  # fixed width, height from the content
    return pn.widgets.MultiChoice.from_param(p, name=name)


def pick_layers(df, layers: list, column: str = "layer"):
    """Rows of `df` whose layer is selected (all rows when nothing is selected)."""
    return df if not layers else df[df[column].isin(layers)]


class FigureView(View):
    """A view of one or more plotly figures redrawn when its controls change.

    Subclasses list their control parameters in `controls`, build figures in `build()` (a dict
    {key: Figure}; each becomes a pane, updated in place), and may add `info()` (markdown).
    """

    controls: tuple[str, ...] = ()
    widgets: dict = {}

    def __init__(self, **params):
        super().__init__(**params)
        if self.run is None or not self.applies(self.run):  # __panel__ says what to run instead
            self._figs, self._panes, self._info = {}, {}, None
            return
        self._setup()
        self._figs = self.build()
        self._panes = {k: plot_pane(f) for k, f in self._figs.items()}
        self._info = pn.pane.Markdown(self.info(), sizing_mode="stretch_width")
        if self.controls:
            self.param.watch(self._redraw, list(self.controls))
        self.link_store(*[c for c in self.controls if c == "layers"])

    def _setup(self) -> None:
        """Set the control parameters' choices from the run (before the first build)."""

    def build(self) -> dict:
        raise NotImplementedError

    def info(self) -> str:
        return ""

    def _redraw(self, *events) -> None:
        figs = self.build()
        for k, f in figs.items():
            if k in self._panes:
                self._panes[k].object = f
        self._figs = figs
        self._info.object = self.info()

    @property
    def figure(self):
        """The first figure the view shows now (None when the run cannot feed this view)."""
        return next(iter(self._figs.values()), None)

    def figures(self) -> list[tuple[str, object]]:
        return [(f.layout.title.text or self.title, f) for f in self._figs.values()]

    def _control_widgets(self) -> list:
        out = []
        for c in self.controls:
            p = self.param[c]
            if c == "layers":
                out.append(layer_widget(p))
            elif c in self.widgets:
                out.append(self.widgets[c].from_param(p))
            elif isinstance(p, param.Selector):
                out.append(pn.widgets.Select.from_param(p))
            else:
                out.append(pn.Param(p, show_name=False))
        return out

    def __panel__(self):
        if self._info is None:
            return self.missing_pane()
        return pn.Column(
            pn.pane.Markdown(f"### {self.title}"),
            pn.Row(*self._control_widgets(), sizing_mode="stretch_width"),
            self._info,
            *self._panes.values(),
            sizing_mode="stretch_width",
        )
