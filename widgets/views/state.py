"""The recurrent-state view: state statistics against position, histograms, collapse flags and
(where stored in the Run) the passkey grid, for a Run made by workbench.metrics.state.state_scan.

    run = wm_state.state_scan(model, ids, bucket=128, hist_positions=(256, 4096))
    pn.panel(StateView(run=run, train_len=256))
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
    stat = param.ObjectSelector(default="rms", objects=STATS, doc="the statistic plotted against position")
    layer = param.Integer(default=-1, bounds=(-1, None), doc="-1: every layer (mean over heads); else one layer's heads")
    train_len = param.Integer(default=0, bounds=(0, None), doc="training length to mark (0: from the run's data meta)")
    tol = param.Number(default=0.5, bounds=(0, None), doc="collapse rule tolerance (see metrics.state.collapse)")

    @classmethod
    def applies(cls, run) -> bool:
        return bool(run.meta.get("state"))

    @classmethod
    def missing(cls, run) -> str:
        return ("this run has no recurrent-state statistics: make one with "
                "workbench.metrics.state.state_scan(model, ids) on a Mamba / Mamba-2 model")

    def _train_len(self) -> int | None:
        return self.train_len or self.run.meta.get("data", {}).get("train_len") or None

    def _tables(self):
        from workbench.metrics import state as ms

        if not hasattr(self, "_cache"):
            self._cache = (ms.head_stats(self.run), ms.layer_stats(self.run), ms.histograms(self.run))
        return self._cache

    def position_figure(self):
        heads, _, _ = self._tables()
        return fs.state_position_figure(heads, self.stat, train_len=self._train_len(),
                                        layer=None if self.layer < 0 else self.layer)

    def histogram_figure(self):
        _, _, hist = self._tables()
        return fs.state_histogram_figure(hist, layer=max(self.layer, 0), train_len=self._train_len())

    def collapse_figure(self):
        from workbench.metrics import state as ms

        heads, _, _ = self._tables()
        tl = self._train_len()
        if not tl:
            return None
        flags = ms.collapse(self.run, tl, tol=self.tol)
        return fs.collapse_figure(flags, int(heads.layer.max()) + 1, int(heads["head"].max()) + 1)

    def passkey_figure(self):
        from workbench.metrics.store import table

        if "passkey" not in self.run.meta.get("metrics", {}):
            return None
        return fs.passkey_grid_figure(table(self.run, "passkey"), train_len=self._train_len())

    def __panel__(self):
        _, layers, _ = self._tables()
        controls = pn.Param(self.param, parameters=["stat", "layer", "train_len", "tol"], show_name=False)
        pos = pn.bind(lambda stat, layer, tl: pn.pane.Plotly(self.position_figure()), self.param.stat,
                      self.param.layer, self.param.train_len)
        hist = pn.bind(lambda layer, tl: pn.pane.Plotly(self.histogram_figure()), self.param.layer, self.param.train_len)
        flags = pn.bind(lambda tl, tol: pn.pane.Plotly(f) if (f := self.collapse_figure()) is not None
                        else pn.pane.Markdown("set the training length to see collapse flags"),
                        self.param.train_len, self.param.tol)
        items = [pos, pn.pane.Plotly(fs.loss_position_figure(layers, train_len=self._train_len())), hist, flags]
        pk = self.passkey_figure()
        if pk is not None:
            items.append(pn.pane.Plotly(pk))
        return pn.Row(controls, pn.Column(*items))
