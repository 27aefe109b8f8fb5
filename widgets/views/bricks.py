"""The bricks view: brick map, FuncScore distributions, ablation matrix and the top-5 % ablation
of a Run that `wm.brick_analysis` filled (tables "bricks/*" and their tensors)."""

from __future__ import annotations

import panel as pn
import param
from workbench.widgets.figures_bricks import (
    ablation_matrix_figure,
    brick_map_figure,
    funcscore_hist_figure,
    top_ablation_figure,
)
from workbench.widgets.views import View, register_view


@register_view
class BricksView(View):
    """Pick a layer and a partition method; the figures follow."""

    title = "Bricks"
    needs = "bricks"
    layer = param.Selector(objects=[], doc="FFN layer")
    method = param.Selector(default="coactivation", objects=["coactivation", "weights"],
                            doc="partition: co-activation bricks or MoEfication's weight-clustering baseline")

    @classmethod
    def applies(cls, run) -> bool:
        return "bricks/bricks" in (run.meta.get("metrics") or {})

    @classmethod
    def missing(cls, run) -> str:
        return ("this run has no bricks analysis: run `res = wm.brick_analysis(model, labelled_texts)` "
                "and show `res.run` (or save it and load that run)")

    def __init__(self, **params):
        super().__init__(**params)
        import importlib

        # the module: `workbench.metrics.store` as an attribute is the store() function
        store_mod = self._store = importlib.import_module("workbench.metrics.store")
        if self.run is not None and self.applies(self.run):
            info = store_mod.info(self.run, "bricks/bricks")
            self._functions = list(info["functions"])
            self._tensors = store_mod.tensors(self.run, "bricks/bricks")
            layers = [int(x) for x in info["layers"]]
            self.param.layer.objects = layers
            if self.layer not in layers:
                self.layer = layers[0]

    def _table(self, name):
        return self._store.table(self.run, name)

    def map_figure(self):
        key = "assignment" if self.method == "coactivation" else "baseline"
        names = None
        if self.method == "coactivation":
            b = self._table("bricks/bricks")
            names = b[b["layer"] == self.layer].sort_values("brick")["name"].tolist()
        return brick_map_figure(self._tensors[f"funcscore/{self.layer}"], self._tensors[f"{key}/{self.layer}"],
                                self._functions, names=names,
                                title=f"Layer {self.layer}: {self.method} bricks, neurons coloured by best function")

    def hist_figure(self):
        return funcscore_hist_figure(self._tensors[f"funcscore/{self.layer}"], self._functions,
                                     title=f"Layer {self.layer}: FuncScore per function")

    def ablation_figure(self):
        if self.method == "weights":
            tables = self._store.tables(self.run)
            if "bricks/baseline_ablation" not in tables:
                return None
            return ablation_matrix_figure(self._table("bricks/baseline_ablation"), layer=self.layer,
                                          title=f"Layer {self.layer}: weight-baseline bricks ablated")
        return ablation_matrix_figure(self._table("bricks/ablation"), layer=self.layer,
                                      names=self._table("bricks/bricks"))

    def __panel__(self):
        if (lack := self.missing_pane()) is not None:
            return lack
        controls = pn.Row(pn.widgets.Select.from_param(self.param.layer),
                          pn.widgets.RadioButtonGroup.from_param(self.param.method))

        @pn.depends(self.param.layer, self.param.method)
        def figures(layer, method):
            abl = self.ablation_figure()
            parts = [pn.pane.Plotly(self.map_figure(), sizing_mode="stretch_width"),
                     pn.Row(pn.pane.Plotly(self.hist_figure()),
                            pn.pane.Plotly(abl) if abl is not None else
                            pn.pane.Markdown("no ablation of the weight baseline in this run"))]
            return pn.Column(*parts, sizing_mode="stretch_width")

        summary = self._table("bricks/summary").round(4)
        return pn.Column(f"## {self.title}", controls, figures,
                         pn.pane.Plotly(top_ablation_figure(self._table("bricks/top_ablation"))),
                         pn.pane.DataFrame(summary, index=False), sizing_mode="stretch_width")
