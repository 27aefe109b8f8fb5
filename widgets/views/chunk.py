"""Chunk-level sparsity: CLS_L against the window length L per layer, and each layer's token-level
sparsity and reuse ratio (`wm.chunk_table`, BlockFFN's measures)."""

from __future__ import annotations

import pandas as pd
import panel as pn
import param
from workbench.widgets import analyses as wa
from workbench.widgets.views import register_view
from workbench.widgets.views._base import FigureView, pick_layers

CLS, REUSE = "CLS_L vs L", "TLS and reuse per layer"


@register_view
class ChunkView(FigureView):
    order = 20
    title = "Chunk sparsity"
    needs = "chunk"
    controls = ("plot", "layers", "pooled")
    widgets = {"plot": pn.widgets.RadioButtonGroup, "pooled": pn.widgets.Checkbox}

    plot = param.Selector(default=CLS, objects=[CLS, REUSE])
    layers = param.ListSelector(default=[], objects=[], doc="layers shown ([] = all)")
    pooled = param.Boolean(default=True, doc="also show all layers pooled")

    @classmethod
    def applies(cls, run) -> bool:
        return wa.has(run, wa.CHUNK)

    @classmethod
    def missing(cls, run) -> str:
        return f"this run has no chunk-sparsity table: run `{wa.HOWTO[wa.CHUNK]}`, then run.save(path)"

    def _setup(self) -> None:
        self._df = wa.table_or_none(self.run, wa.CHUNK)
        self.param.layers.objects = sorted(int(v) for v in self._df["layer"].unique() if v >= 0)

    def build(self) -> dict:
        from workbench.widgets.figures import cls_curve_figure, model_bar_figure

        df = self._df
        per = pick_layers(df[df["layer"] >= 0], self.layers)
        units = df["units"].iloc[0] if "units" in df.columns and len(df) else "units"
        if self.plot == CLS:
            d = per.assign(model=[f"layer {int(v)}" for v in per["layer"]])
            if self.pooled:
                pooled = df[df["layer"] < 0].assign(model="all layers")
                d = pd.concat([d, pooled], ignore_index=True)
            fig = cls_curve_figure(d, title=f"Chunk-level sparsity CLS_L over {units}")
        else:
            rows = per.drop_duplicates("layer")
            long = rows.melt(id_vars=["layer"], value_vars=["tls", "reuse"], var_name="measure", value_name="value")
            long["layer"] = long["layer"].astype(str)
            fig = model_bar_figure(long, x="layer", y="value", color="measure",
                                   title=f"Token-level sparsity and reuse ratio per layer ({units})")
        return {"main": fig}

    def info(self) -> str:
        df = self._df
        pooled = df[df["layer"] < 0]
        if pooled.empty:
            return ""
        best = pooled.sort_values("L")
        return ("All layers pooled: " + ", ".join(f"CLS_{int(r.L)} {r.cls:.3f}" for r in best.itertuples())
                + f"; reuse {best['reuse'].iloc[0]:.3f}")
