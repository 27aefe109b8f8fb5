"""The `serve` and `report` subcommands of `workbench` (parsers here; panel imported only when a
command runs, so `workbench --help` stays quick)."""

from __future__ import annotations

import argparse

VIZ_MISSING = "the dashboard needs the viz extra (panel, plotly): bash scripts/setup.sh viz"


def require_viz() -> None:
    """Stop with one line naming the install command when the viz extra is missing."""
    from workbench.cli import fail

    try:
        import panel  # noqa: F401
        import plotly  # noqa: F401
    except ImportError:
        fail(VIZ_MISSING)


def cmd_serve(args) -> int:
    from workbench.cli import fail

    if args.predictors and not args.model:
        fail("--predictors needs --model SOURCE (the predictors drive the live model's acceleration view); "
             "add --model, or drop --predictors")
    if args.predictors and not args.predictors.startswith("zoo:"):
        from pathlib import Path

        if not Path(args.predictors).is_dir():
            what = "is not a directory" if Path(args.predictors).exists() else "does not exist"
            fail(f"--predictors {args.predictors} {what}; pass a predictor directory written by "
                 "save_predictors (or zoo:NAME for a zoo model's committed one)")
    require_viz()
    from workbench.widgets import app

    paths = app.check_runs(args.runs)
    if not paths and not args.model:
        raise app.ServeError("nothing to serve: pass one or more RUN_DIR and/or --model SOURCE")
    if args.port:
        app.check_port(args.host, args.port)
    model = app.load_live_model(args.model) if args.model else None
    predictors = None
    if args.predictors:
        from workbench.errors import WorkbenchError
        from workbench.metrics.predictor import load_predictors

        try:  # read and checked against the model now, not later inside the UI
            predictors = load_predictors(args.predictors, model)
        except WorkbenchError as exc:
            fail(f"--predictors {args.predictors}: {exc}")
    app.serve(paths, model=model, predictors=predictors, port=args.port, host=args.host)
    return 0


def cmd_report(args) -> int:
    require_viz()
    from workbench.widgets.report import write_report

    out = write_report(args.run, args.out)
    print(f"report written to {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve the dashboard of one or more runs (two or more: compared side by side) and a live model")
    s.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (written by `workbench profile`)")
    s.add_argument("--model", help="a model SOURCE (zoo:NAME, local dir, hub id) for the live acceleration view")
    s.add_argument("--predictors", help="a predictor directory (save_predictors) for the predictor mode")
    s.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; another host is warned about)")
    s.set_defaults(func=cmd_serve)
    r = sub.add_parser("report", help="write a static self-contained HTML report of a run")
    r.add_argument("run", metavar="RUN", help="a run directory")
    r.add_argument("--out", required=True, help="the HTML file to write")
    r.set_defaults(func=cmd_report)
