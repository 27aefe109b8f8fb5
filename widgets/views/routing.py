"""The routing view: one run's routing, or two runs side by side / as a difference.

    pn.panel(RoutingView(run=run))                                # in a notebook cell
    pn.panel(RoutingView(run=a, other=b, mode="difference"))      # two models on the same tokens

Controls: the figure (tokens x experts heatmap, layer x expert load, co-selection lift, domain
and vocabulary specialisation, a per-layer metric over depth), the layer, the heatmap's value,
and with a second run the comparison mode. Every figure comes from widgets/figures_routing.py.
"""

from __future__ import annotations

import panel as pn
import param
from workbench.widgets import figures_routing as fr
from workbench.widgets.views import View, register_view

from workbench.errors import WorkbenchError

FIGURES = ["heatmap", "load", "lift", "domain", "vocabulary", "layers"]
METRICS = ["load_cv", "entropy", "entropy_norm", "margin", "reuse", "mean_active", "tls", "cls_8"]


@register_view
class RoutingView(View):
    title = "Routing"
    needs = "routing"

    figure = param.Selector(objects=FIGURES, default="heatmap", doc="what to show")
    layer = param.Selector(objects=[0], default=0, doc="router layer (of the first run)")
    value = param.Selector(objects=["weights", "selected"], default="weights", doc="heatmap cell value")
    metric = param.Selector(objects=METRICS, default="reuse", doc="per-layer metric of the 'layers' figure")
    compares = True
    other = param.Parameter(default=None, doc="a second Run to compare with (two models on the same tokens, "
                                               "or one model on two datasets)")
    mode = param.Selector(objects=["single", "side", "difference"], default="single",
                          doc="with `other`: side by side, or other - run at matched tokens")
    max_columns = param.Integer(default=fr.MAX_COLUMNS, bounds=(8, 4096), doc="token columns before pooling")

    def __init__(self, **params):
        layer = params.pop("layer", None)  # its choices come from the run: set them first
        super().__init__(**params)
        if self.run is not None and self.applies(self.run):
            layers = [int(r["layer"]) for r in self.run.meta.get("routers", [])]
            self.param.layer.objects = layers
            self.layer = layers[0] if layer is None else layer
        if self.other is not None and self.mode == "single":
            self.mode = "side"

    @classmethod
    def applies(cls, run) -> bool:
        return any(k.startswith("routing/") for k in run.tensors)

    @classmethod
    def missing(cls, run) -> str:
        return ("this run has no routing statistics: profile a model with routers using "
                "probes=[wb.RoutingProbe()] (e.g. wb.profile(model, texts, probes=[wb.RoutingProbe()]))")

    # -- figures -------------------------------------------------------------------------
    def _other_layer(self) -> int:
        from workbench.metrics.routing import align_layers

        m = align_layers(self.run, self.other)
        return int(m.set_index("layer_a").loc[self.layer, "layer_b"])

    def _one(self, run, layer):
        import workbench.metrics.routing as wr

        if self.figure == "heatmap":
            return fr.routing_heatmap_figure(wr.sample(run, layer), value=self.value, max_columns=self.max_columns)
        if self.figure == "load":
            return fr.load_figure(wr.routing_load(run))
        if self.figure == "lift":
            return fr.lift_figure(wr.coselection(run, layer), layer)
        if self.figure == "domain":
            return fr.domain_figure(wr.domain_specialisation(run), layer)
        if self.figure == "vocabulary":
            return fr.vocab_figure(wr.vocab_specialisation(run, tokenizer=None), layer)
        return fr.layer_metric_figure({"run": wr.routing_layers(run)}, self.metric)

    def figures(self) -> list:
        """The plotly figures for the current controls (one, or one per run side by side)."""
        import workbench.metrics.routing as wr

        if self.other is None or self.mode == "single":
            return [self._one(self.run, self.layer)]
        lb = self._other_layer()
        if self.figure == "layers":
            return [fr.layer_metric_figure({self.names[0]: wr.routing_layers(self.run),
                                            self.names[1]: wr.routing_layers(self.other)}, self.metric)]
        if self.figure == "heatmap":
            al = None
            sa, sb = wr.sample(self.run, self.layer), wr.sample(self.other, lb)
            if sa.weights.shape[1] != sb.weights.shape[1]:
                al = wr.align_experts(self.run, self.other, self.layer, lb)
            if self.mode == "difference":
                xa, xb, toks = wr.token_difference(self.run, self.other, self.layer, lb, alignment=al, value=self.value)
            else:
                ia, ib = wr.matched_tokens(self.run, self.other, self.layer, lb)
                xa = (sa.weights if self.value == "weights" else sa.selected.astype("float32"))[ia]
                xb_raw = (sb.weights if self.value == "weights" else sb.selected.astype("float32"))[ib]
                toks = sa.tokens.iloc[ia].reset_index(drop=True)
                if al is None:
                    xb = xb_raw
                else:
                    import numpy as np

                    xb = np.zeros_like(xa)
                    xb[:, al.table.expert_a.to_numpy()] = xb_raw[:, al.table.expert_b.to_numpy()]
            figs = [fr.compare_heatmap_figure(xa, xb, toks, mode=self.mode, names=self.names, alignment=al,
                                              max_columns=self.max_columns)]
            if al is not None:
                figs.append(fr.alignment_figure(al, names=self.names))
            return figs
        return [self._one(self.run, self.layer), self._one(self.other, lb)]

    @param.depends("figure", "layer", "value", "metric", "other", "mode", "max_columns")
    def _panes(self):
        try:
            figs = self.figures()
        except WorkbenchError as exc:  # an analysis the runs cannot answer: say why, in the view
            return pn.pane.Alert(str(exc), alert_type="warning")
        panes = [pn.pane.Plotly(f, sizing_mode="stretch_width") for f in figs]
        if self.figure == "heatmap":  # token heatmaps need the width: the alignment goes below
            return pn.Column(*panes, sizing_mode="stretch_width")
        return pn.Row(*panes, sizing_mode="stretch_width")

    def __panel__(self):
        if (lack := self.missing_pane()) is not None:
            return lack
        controls = pn.Param(self.param, parameters=["figure", "layer", "value", "metric", "mode", "max_columns"],
                            show_name=False, default_layout=pn.Row)
        return pn.Column(controls, pn.panel(self._panes, sizing_mode="stretch_width"), sizing_mode="stretch_width")


__all__ = ["RoutingView"]
