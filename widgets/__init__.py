"""Figures (plotly) and views (Panel) of the workbench, imported as workbench.widgets."""
