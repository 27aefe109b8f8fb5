"""Figures (plotly) and views (Panel) of the workbench, imported as workbench.widgets.

The figure builders live in `workbench.widgets.figures` (pure data -> plotly Figure); they are
also reachable here, imported on first use so that `import workbench.widgets` needs no plotly.
"""

_FIGURES = ("cett_curve_figure", "cls_curve_figure", "layer_sparsity_figure", "model_bar_figure",
            "ppl_curve_figure", "predictor_figure", "rule_sparsity_figure", "threshold_figure")


def __getattr__(name):
    if name in _FIGURES:
        from workbench.widgets import figures

        return getattr(figures, name)
    raise AttributeError(f"module 'workbench.widgets' has no attribute {name!r}")


__all__ = list(_FIGURES)
