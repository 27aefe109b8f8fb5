"""Layer sparsity: the run's per-layer summary (any column) and, when stored, the sparsity of each
layer under several rules (`wm.sparsity_table`)."""

from __future__ import annotations

import pandas as pd
import panel as pn
import param
from workbench.widgets import analyses as wa
from workbench.widgets.views import register_view
from workbench.widgets.views._base import FigureView, pick_layers

FRACTIONS = ("token_sparsity", "activation_ratio", "nonzero_sparsity")
COLUMNS = ("token_sparsity", "activation_ratio", "nonzero_sparsity", "dead_neurons", "mean_abs", "max_abs",
           "abs_p50", "abs_p90", "abs_p99")


@register_view
class SparsityView(FigureView):
    order = 0
    compares = True
    title = "Layer sparsity"
    needs = "neuron_stats"
    controls = ("metric", "layers", "rules")
    widgets = {"metric": pn.widgets.Select, "rules": pn.widgets.CheckButtonGroup}

    metric = param.Selector(default="token_sparsity", objects=list(COLUMNS), doc="summary column per layer")
    layers = param.ListSelector(default=[], objects=[], doc="layers shown ([] = all)")
    rules = param.ListSelector(default=[], objects=[], doc="rules compared (from the stored sparsity table)")

    @classmethod
    def applies(cls, run) -> bool:
        return any(k.startswith("neuron_stats/") for k in run.tensors)

    @classmethod
    def missing(cls, run) -> str:
        return ("this run holds no FFN neuron statistics: profile the model with the neuron_stats probe "
                "(`workbench profile SOURCE --out DIR`, or wb.profile(model, texts))")

    def _setup(self) -> None:
        self._summary = self.run.summary()
        self._other = self.other.summary() if self.other is not None else None
        cols = [c for c in COLUMNS if c in self._summary.columns
                and (self._other is None or c in self._other.columns)]
        self.param.metric.objects = cols
        self.param.layers.objects = sorted(int(v) for v in self._summary["layer"].unique())
        self._rules = wa.table_or_none(self.run, wa.RULES)
        other_rules = wa.table_or_none(self.other, wa.RULES) if self.other is not None else None
        if self._rules is not None and other_rules is not None:  # both runs' rules, one line per run and rule
            self._rules = pd.concat([self._rules.assign(model=self.names[0]), other_rules.assign(model=self.names[1])],
                                    ignore_index=True)
        if self._rules is not None:
            names = list(dict.fromkeys(self._rules["rule"]))
            self.param.rules.objects = names
            self.rules = names

    def build(self) -> dict:
        from workbench.widgets.figures import layer_sparsity_figure, rule_sparsity_figure

        s = pick_layers(self._summary, self.layers)
        if self._other is not None:
            from workbench.widgets.figures import layer_compare_figure

            fig = layer_compare_figure({self.names[0]: s, self.names[1]: pick_layers(self._other, self.layers)},
                                       column=self.metric, title=f"{self.metric.replace('_', ' ')} per layer "
                                       f"(rules {self.run.rule} / {self.other.rule})")
        else:
            fig = layer_sparsity_figure(s, column=self.metric, title=f"{self.metric.replace('_', ' ')} per layer "
                                        f"(rule {self.run.rule})")
        if self.metric not in FRACTIONS:
            fig.update_yaxes(range=None, autorange=True)
        figs = {"layers": fig}
        if self._rules is not None:
            d = pick_layers(self._rules, self.layers)
            d = d[d["rule"].isin(self.rules)]
            figs["rules"] = rule_sparsity_figure(d)
        return figs

    def info(self) -> str:
        s = pick_layers(self._summary, self.layers)
        tokens = self.run.meta.get("data", {}).get("n_tokens")
        msg = (f"{len(s)} FFN layers, {tokens} tokens, rule `{self.run.rule}`: mean token sparsity "
               f"{s['token_sparsity'].mean():.4f}")
        if self._other is not None:
            o = pick_layers(self._other, self.layers)
            msg = (f"**{self.names[0]}**: {msg}  \n**{self.names[1]}**: {len(o)} FFN layers, "
                   f"{self.other.meta.get('data', {}).get('n_tokens')} tokens, rule `{self.other.rule}`: "
                   f"mean token sparsity {o['token_sparsity'].mean():.4f}")
        if self._rules is None:
            msg += f"  \nCompare rules: `{wa.HOWTO[wa.RULES]}`"
        return msg
