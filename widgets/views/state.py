"""The recurrent-state view: state statistics against position, histograms, collapse flags and
(where stored in the Run) the passkey grid, for a Run made by workbench.metrics.state.state_scan.

    run = wm_state.state_scan(model, ids, bucket=128, hist_positions=(256, 4096))
    pn.panel(StateView(run=run, train_len=256))
    pn.panel(StateView(run=a, other=b, names=("d_state 16", "d_state 64")))   # two runs compared
"""

from __future__ import annotations

import panel as pn
import param
from workbench.widgets import figures_state as fs
from workbench.widgets.views import View, register_view

STATS = ["rms", "mean", "var", "median", "cos", "usage", "erank", "decay", "dt", "x", "B"]


@register_view
class StateView(View):
    """State statistics of a Mamba / Mamba-2 run against position (linked controls)."""

    title = "Recurrent state"
    needs = "state"
    compares = True  # with `other`: both runs' statistics, losses, histograms, flags and passkey grids
    stat = param.ObjectSelector(default="rms", objects=STATS, doc="the statistic plotted against position")
    layer = param.Integer(default=-1, bounds=(-1, None), doc="-1: every layer (mean over heads); else one layer's heads")
    train_len = param.Integer(default=0, bounds=(0, None),
                              doc="training length to mark (0: none; starts at the run's data meta 'train_len')")
    tol = param.Number(default=0.5, bounds=(0, None), doc="collapse rule tolerance (see metrics.state.collapse)")

    def __init__(self, **params):
        super().__init__(**params)
        if not self.train_len and self.run is not None:  # show the run's training length in its control
            self.train_len = int(self.run.meta.get("data", {}).get("train_len") or 0)

    @classmethod
    def applies(cls, run) -> bool:
        return bool(run.meta.get("state"))

    @classmethod
    def missing(cls, run) -> str:
        return ("this run has no recurrent-state statistics: make one with "
                "workbench.metrics.state.state_scan(model, ids) on a Mamba / Mamba-2 model")

    def _train_len(self) -> int | None:
        return self.train_len or None

    def _tables(self, run=None):
        from workbench.metrics import state as ms

        run = self.run if run is None else run
        cache = self.__dict__.setdefault("_cache", {})
        if id(run) not in cache:
            cache[id(run)] = (ms.head_stats(run), ms.layer_stats(run), ms.histograms(run))
        return cache[id(run)]

    def position_figure(self):
        heads, _, _ = self._tables()
        layer = None if self.layer < 0 else self.layer
        if self.other is not None:
            return fs.state_compare_figure({self.names[0]: heads, self.names[1]: self._tables(self.other)[0]},
                                           self.stat, train_len=self._train_len(), layer=layer)
        return fs.state_position_figure(heads, self.stat, train_len=self._train_len(), layer=layer)

    def loss_figure(self):
        _, layers, _ = self._tables()
        if self.other is not None:
            layers = {self.names[0]: layers, self.names[1]: self._tables(self.other)[1]}
        return fs.loss_position_figure(layers, train_len=self._train_len())

    def _shown(self) -> list:
        """(name, run) of each shown run: `run`, then `other` when comparing."""
        return [(self.names[0], self.run)] + ([(self.names[1], self.other)] if self.other is not None else [])

    def histogram_figures(self) -> list:
        """The value histograms (before / after the training length) of each shown run."""
        out = []
        for name, r in self._shown():
            hist = self._tables(r)[2]
            if hist.empty:
                continue
            lay = min(max(self.layer, 0), int(hist.layer.max()))
            out.append(fs.state_histogram_figure(
                hist, layer=lay, train_len=self._train_len(),
                title=f"state values, layer {lay}: {name}" if self.other is not None else None))
        return out

    def histogram_figure(self):
        figs = self.histogram_figures()
        return figs[0] if figs else None

    def collapse_figures(self) -> list:
        """The collapse flags of each shown run (none without a training length)."""
        from workbench.metrics import state as ms

        tl = self._train_len()
        if not tl:
            return []
        shown = [(name, self._tables(r)[0], ms.collapse(r, tl, tol=self.tol)) for name, r in self._shown()]
        pos = [p for _, _, flags in shown for p in flags.position]
        zrange = (min(pos), max(pos)) if len(shown) > 1 and pos else None  # one colour scale for both runs
        return [fs.collapse_figure(flags, int(heads.layer.max()) + 1, int(heads["head"].max()) + 1, zrange=zrange,
                                   title=f"collapse flags: {name} ({len(flags)})" if self.other is not None else None)
                for name, heads, flags in shown]

    def collapse_figure(self):
        figs = self.collapse_figures()
        return figs[0] if figs else None

    def passkey_figures(self) -> list:
        """The passkey grid of each shown run that stores one."""
        from workbench.metrics.store import table

        return [fs.passkey_grid_figure(table(r, "passkey"), train_len=self._train_len(),
                                       title=f"passkey retrieval: {name}" if self.other is not None else None)
                for name, r in self._shown() if "passkey" in r.meta.get("metrics", {})]

    def __panel__(self):
        if (lack := self.missing_pane()) is not None:
            return lack
        controls = pn.Param(self.param, parameters=["stat", "layer", "train_len", "tol"], show_name=False, width=260)
        pos = pn.bind(lambda stat, layer, tl: pn.pane.Plotly(self.position_figure()), self.param.stat,
                      self.param.layer, self.param.train_len)
        hist = pn.bind(lambda layer, tl: pn.Row(*[pn.pane.Plotly(f) for f in figs], sizing_mode="stretch_width")
                       if (figs := self.histogram_figures())
                       else pn.pane.Markdown("no value histograms in this run: state_scan(..., hist_positions=(p1, p2))"),
                       self.param.layer, self.param.train_len)
        flags = pn.bind(lambda tl, tol: pn.Row(*[pn.pane.Plotly(f) for f in figs], sizing_mode="stretch_width")
                        if (figs := self.collapse_figures())
                        else pn.pane.Markdown("set the training length to see collapse flags"),
                        self.param.train_len, self.param.tol)
        loss = pn.bind(lambda tl: pn.pane.Plotly(self.loss_figure()), self.param.train_len)
        items = [pos, loss, hist, flags]
        pks = self.passkey_figures()
        if pks:
            items.append(pn.Row(*[pn.pane.Plotly(f) for f in pks]))
        return pn.Row(controls, pn.Column(*items, sizing_mode="stretch_width"), sizing_mode="stretch_width")
