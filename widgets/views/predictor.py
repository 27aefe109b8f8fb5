"""Predictors: recall against predicted sparsity per layer on held-out tokens, and each layer's
recall, precision and sparsity (`wm.train_predictors(...).store(run)`)."""

from __future__ import annotations

import panel as pn
import param
from workbench.widgets import analyses as wa
from workbench.widgets.views import register_view
from workbench.widgets.views._base import FigureView, pick_layers

SCATTER, BARS = "recall vs sparsity", "per layer"
MEASURES = ("recall", "precision", "predicted_sparsity", "true_sparsity")


def _tables(run) -> list[str]:
    out = []
    for name, entry in run.meta.get("metrics", {}).items():
        if name.startswith(wa.PREDICTOR) and {"layer", "recall", "predicted_sparsity"} <= set(entry.get("columns", [])):
            out.append(name)
    return sorted(out)


@register_view
class PredictorView(FigureView):
    order = 30
    title = "Predictors"
    needs = "predictor"
    controls = ("plot", "table", "layers")
    widgets = {"plot": pn.widgets.RadioButtonGroup}

    plot = param.Selector(default=SCATTER, objects=[SCATTER, BARS])
    table = param.Selector(default=None, objects=[], doc="the stored predictor evaluation")
    layers = param.ListSelector(default=[], objects=[], doc="layers shown ([] = all)")

    @classmethod
    def applies(cls, run) -> bool:
        return bool(_tables(run))

    @classmethod
    def missing(cls, run) -> str:
        return f"this run has no predictor evaluation: run `{wa.HOWTO[wa.PREDICTOR]}`, then run.save(path)"

    def _setup(self) -> None:
        import workbench.metrics as wm

        names = _tables(self.run)
        self._dfs = {n: wm.table(self.run, n) for n in names}
        self.param.table.objects = names
        self.table = names[0]
        self.param.layers.objects = sorted({int(v) for d in self._dfs.values() for v in d["layer"]})

    def build(self) -> dict:
        from workbench.widgets.figures import model_bar_figure, predictor_figure

        d = pick_layers(self._dfs[self.table], self.layers)
        if self.plot == SCATTER:
            fig = predictor_figure(d)
        else:
            cols = [c for c in MEASURES if c in d.columns]
            long = d.melt(id_vars=["layer"], value_vars=cols, var_name="measure", value_name="value")
            long["layer"] = long["layer"].astype(str)
            fig = model_bar_figure(long, x="layer", y="value", color="measure",
                                   title="Predictor recall, precision and sparsity per layer (held-out tokens)")
        return {"main": fig}

    def info(self) -> str:
        d = pick_layers(self._dfs[self.table], self.layers)
        if d.empty:
            return ""
        return (f"**{self.table}**: mean recall {d['recall'].mean():.3f}, mean predicted sparsity "
                f"{d['predicted_sparsity'].mean():.3f} over {len(d)} layers")
