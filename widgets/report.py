"""`workbench report RUN --out FILE.html`: a static, self-contained report of a run's views.

One HTML file: the views' figures as they first show (plotly.js inlined once; no server, no
network), each view's notes, the run's per-layer summary, and for every view the run lacks data
for, the analysis to run.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from workbench.errors import WorkbenchError

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.missing{background:#fff6e0;border:1px solid #f0d080;padding:.6em 1em;border-radius:4px}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
code{background:#f3f3f3;padding:0 .2em}"""


def _md(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt().render(text or "")


def build_report(run, *, title: str | None = None) -> str:
    """The report of `run` (a Run) as one HTML string."""
    from workbench.widgets.views import all_views

    parts: list[str] = []
    first = True

    def fig_html(fig) -> str:
        nonlocal first
        out = fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                          config={"displaylogo": False, "responsive": True})
        first = False
        return out

    model = run.meta.get("model", {})
    data = run.meta.get("data", {})
    title = title or f"Sparsity report: {model.get('source') or model.get('class')}"
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(f"<p>{html.escape(repr(run))}<br>model {html.escape(str(model.get('class')))}, "
                 f"{model.get('n_params', 0):,} parameters; {data.get('n_tokens')} tokens; rule "
                 f"<code>{html.escape(str(run.rule))}</code>; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                 "</p>")
    for cls in all_views():
        if getattr(cls, "live", False):
            continue
        parts.append(f"<h2>{html.escape(cls.title)}</h2>")
        if not cls.applies(run):
            parts.append(f"<div class='missing'>{_md(cls.missing(run))}</div>")
            continue
        view = cls(run=run)
        info = view.info() if hasattr(view, "info") else ""
        if info:
            parts.append(_md(info))
        for _title, fig in view.figures():
            parts.append(fig_html(fig))
    summary = run.summary()
    if len(summary):
        parts.append("<h2>Per-layer summary</h2>")
        parts.append(summary.to_html(index=False, float_format=lambda x: f"{x:.4f}", border=0))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(run_dir, out) -> Path:
    """Load the run at `run_dir` and write its report to `out` (an .html file)."""
    from workbench.capture.run import Run

    out = Path(out)
    if out.exists() and out.is_dir():
        raise WorkbenchError(f"--out {out} is a directory: pass a file name such as report.html")
    if not out.parent.exists():
        raise WorkbenchError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    run = Run.load(run_dir)
    text = build_report(run)
    out.write_text(text, encoding="utf-8")
    return out


__all__ = ["build_report", "write_report"]
