"""CETT and PPL-p%: CETT against the activation ratio per layer (`wm.cett_curve`), the PPL-p%
outer search and the per-layer thresholds it chose (`wm.ppl_sparsity(...).store(run)`)."""

from __future__ import annotations

import panel as pn
import param
from workbench.widgets import analyses as wa
from workbench.widgets.views import register_view
from workbench.widgets.views._base import FigureView, pick_layers

CURVE, SEARCH, THRESH = "CETT vs activation ratio", "PPL search", "activation ratio per layer"


@register_view
class CETTView(FigureView):
    order = 10
    title = "CETT and PPL-p%"
    needs = "cett_curve or ppl<p>_sparsity"
    controls = ("plot", "result", "layers")
    widgets = {"plot": pn.widgets.RadioButtonGroup}

    plot = param.Selector(default=CURVE, objects=[CURVE, SEARCH, THRESH])
    result = param.Selector(default=None, objects=[], doc="the stored PPL-p% result")
    layers = param.ListSelector(default=[], objects=[], doc="layers shown ([] = all)")

    @classmethod
    def applies(cls, run) -> bool:
        return wa.has(run, wa.CETT) or bool(wa.ppl_names(run))

    @classmethod
    def missing(cls, run) -> str:
        return (f"this run has no CETT curve and no PPL-p% result: run `{wa.HOWTO[wa.CETT]}` and/or "
                f"`{wa.HOWTO['ppl']}`, then run.save(path)")

    def _setup(self) -> None:
        import workbench.metrics as wm

        self._curve = wa.table_or_none(self.run, wa.CETT)
        self._ppl = {n: (wm.table(self.run, f"{n}/per_layer"), wm.table(self.run, f"{n}/curve"),
                         wm.info(self.run, f"{n}/per_layer")) for n in wa.ppl_names(self.run)}
        plots = ([CURVE] if self._curve is not None else []) + ([SEARCH, THRESH] if self._ppl else [])
        self.param.plot.objects = plots
        self.plot = plots[0]
        self.param.result.objects = list(self._ppl) or [None]
        self.result = next(iter(self._ppl), None)
        layers = set()
        for d in [self._curve, *[v[0] for v in self._ppl.values()]]:
            if d is not None:
                layers |= {int(v) for v in d["layer"]}
        self.param.layers.objects = sorted(layers)

    def build(self) -> dict:
        from workbench.widgets.figures import cett_curve_figure, ppl_curve_figure, threshold_figure

        if self.plot == CURVE:
            fig = cett_curve_figure(pick_layers(self._curve, self.layers))
        elif self.plot == SEARCH:
            _, curve, info = self._ppl[self.result]
            fig = ppl_curve_figure(curve, goal=1 + info.get("p", 1.0) / 100,
                                   title=f"PPL ratio along the CETT search ({self.result})")
        else:
            per_layer, _, _ = self._ppl[self.result]
            fig = threshold_figure(pick_layers(per_layer, self.layers))
        return {"main": fig}

    def info(self) -> str:
        lines = []
        if self.result in self._ppl:
            i = self._ppl[self.result][2]
            lines.append(f"**{self.result}**: PPL-{i.get('p', 1):g}% sparsity {i.get('sparsity', float('nan')):.4f} "
                         f"(PPL ratio {i.get('ppl_ratio', float('nan')):.4f}, zero rule activation ratio "
                         f"{i.get('zero_activation_ratio', float('nan')):.4f}, converged {i.get('converged')})")
        else:
            lines.append(f"No PPL-p% result stored: `{wa.HOWTO['ppl']}`")
        if self._curve is None:
            lines.append(f"No CETT curve stored: `{wa.HOWTO[wa.CETT]}`")
        return "  \n".join(lines)
