"""The served dashboard: `workbench serve [RUN_DIR ...] [--model SOURCE] [--port N] [--host H]`.

    from workbench.widgets.app import serve
    serve(["runs/a"], model=None, port=5006)          # blocks; http://127.0.0.1:5006/

- Binds 127.0.0.1 unless a host is named; a non-loopback host is warned about (anyone who can
  reach it sees the runs and can drive the model).
- Serves only the runs given: the browser picks a run by its name among them; no path from the
  browser reaches the file system (one page route, Panel's own assets, nothing else).
- Each browser session gets its own `Dashboard` (its own RunStore: selections apart); the runs
  themselves are loaded lazily, once per process (`store.load_cached`).
- Events of different sessions run on a thread pool, so a long operation (a measurement) in one
  session shows its progress there without blocking the others.
- A damaged or foreign run shows as an error panel with the loader's message.
- With two or more runs, "compare with" picks a second run: the views that compare (layer
  sparsity, routing, recurrent state) show it beside the first; the others show the first alone.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import panel as pn
import param
from workbench.widgets.store import RunStore
from workbench.widgets.views import all_views, make_view

from workbench.errors import WorkbenchError

TITLE = "Sparsity workbench"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeError(WorkbenchError):
    """`workbench serve` / `report` was given something it cannot serve."""


def _extension() -> None:
    pn.extension("plotly", sizing_mode="stretch_width", notifications=False)


class Dashboard(pn.viewable.Viewer):
    """One session's page: the run selector, one tab per view (an error panel for a run that does
    not load, an alert naming the analysis for a view whose data the run lacks)."""

    store = param.ClassSelector(class_=RunStore)
    model = param.Parameter(default=None, doc="a live model for the acceleration view")
    predictors = param.Parameter(default=None)
    backend = param.String(default="auto", doc="the acceleration view's kernel backend")

    def __init__(self, runs=(), **params):
        if "store" not in params:
            params["store"] = RunStore(runs)
        super().__init__(**params)
        self._body = pn.Column(sizing_mode="stretch_width", min_height=400)
        self._accel = None
        self._tabs = None
        self._pending: dict[int, object] = {}  # tab index -> factory of the view not built yet
        self._built: list = []
        self.store.param.watch(lambda _e: self._show_run(), ["run_name", "compare_name"])
        self._show_run()

    @property
    def views(self) -> list:
        """Every view of the selected run (and the live one), built now if a tab has not been shown."""
        for i in sorted(self._pending):
            self._materialise(i)
        return list(self._built)

    def _accel_view(self):
        if self._accel is None and self.model is not None:
            from workbench.widgets.views.accel import AccelView

            self._accel = AccelView(model=self.model, predictors=self.predictors, backend=self.backend)
        return self._accel

    def _show_run(self) -> None:
        self._body.loading = True
        try:
            self._body.objects = [self._build()]
        finally:
            self._body.loading = False

    def _materialise(self, i: int) -> None:
        factory = self._pending.pop(i, None)
        if factory is None:
            return
        obj = factory()
        if not isinstance(obj, pn.pane.Alert):
            self._built.append(obj)
        title = self._tabs._names[i] if hasattr(self._tabs, "_names") else None
        self._tabs[i] = (title, obj) if title is not None else obj

    def _on_tab(self, event) -> None:
        if event.new in self._pending:
            self._materialise(event.new)

    def _build(self):
        # views are built when their tab is first shown: a session starts with one view's work
        entries = []
        self._built = []
        self._pending = {}
        name = self.store.run_name
        if name is not None:
            try:
                run = self.store.run(name)
            except WorkbenchError as exc:
                entries.append(("Error", lambda exc=exc: pn.pane.Alert(
                    f"### Run `{name}` cannot be shown\n\n{exc}", alert_type="danger", css_classes=["wb-run-error"])))
            else:
                other, names = None, None
                try:
                    other = self.store.other()
                    names = (name, self.store.compare_name)
                except WorkbenchError as exc:
                    entries.append(("Error", lambda exc=exc: pn.pane.Alert(
                        f"### Run `{self.store.compare_name}` cannot be compared\n\n{exc}", alert_type="danger",
                        css_classes=["wb-run-error"])))
                for cls in all_views():
                    if not getattr(cls, "live", False):
                        entries.append((cls.title, lambda cls=cls: make_view(cls, run, self.store, other, names)))
        if self.model is not None:
            entries.append(("Acceleration", self._accel_view))
        if not entries:
            return pn.pane.Alert("Nothing to show: start with `workbench serve RUN_DIR` and/or `--model SOURCE`.",
                                 alert_type="warning")
        self._tabs = pn.Tabs(*[(t, pn.Spacer(height=400)) for t, _ in entries], dynamic=True,
                             sizing_mode="stretch_width")
        self._pending = {i: f for i, (_, f) in enumerate(entries)}
        self._materialise(0)
        self._tabs.param.watch(self._on_tab, ["active"])
        return self._tabs

    def __panel__(self):
        header = pn.Row(pn.pane.Markdown(f"## {TITLE}", margin=(0, 20, 0, 10)))
        if len(self.store.names) > 0:
            header.append(pn.widgets.Select.from_param(self.store.param.run_name, name="run", width=320,
                                                       css_classes=["wb-run"]))
        if len(self.store.names) > 1:
            header.append(pn.widgets.Select.from_param(self.store.param.compare_name, name="compare with", width=320,
                                                       css_classes=["wb-compare"]))
        return pn.Column(header, self._body, sizing_mode="stretch_width")


def show(obj=None, **kwargs):
    """The right views for a Run (or a RunStore, run directories, or a live model for the
    acceleration view) as one Panel object; displays in a notebook cell. (`wb.show`)"""
    import torch.nn as nn

    from workbench.capture.run import Run

    _extension()
    if isinstance(obj, nn.Module):
        from workbench.widgets.views.accel import AccelView

        return AccelView(model=obj, **kwargs)
    if isinstance(obj, Dashboard):
        return obj
    if isinstance(obj, RunStore):
        return Dashboard(store=obj, **kwargs)
    if obj is None or isinstance(obj, (Run, str, Path, list, tuple, dict)):
        return Dashboard(runs=() if obj is None else obj, **kwargs)
    raise WorkbenchError(f"wb.show takes a Run, run directories or a model, not {type(obj).__name__}")


# -- serving ------------------------------------------------------------------------------
def check_runs(paths) -> list[Path]:
    """Each RUN_DIR must exist and be a run directory (have run.json); a damaged one is served
    and shows its error in the page."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ServeError(f"run directory {p} does not exist: pass a directory written by "
                             "`workbench profile --out DIR` (or Run.save)")
        if not path.is_dir() or not (path / "run.json").is_file():
            raise ServeError(f"{p} is not a workbench run (no run.json in it): pass a directory written by "
                             "`workbench profile --out DIR` (or Run.save)")
        out.append(path.resolve())
    return out


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken (before serving, so the CLI can say so cleanly)."""
    if not 0 < port < 65536:
        raise ServeError(f"port {port} is out of range: pass --port between 1 and 65535, or 0 for a free one")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): the port is in use or the "
                             "host is not an address of this machine; pass another --port (e.g. --port 0 picks "
                             "a free one) or stop the other server") from exc


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_live_model(source: str):
    """The model for the acceleration view, in bf16 (the kernels' dtype); a ModelLoadError says why."""
    import torch

    import workbench as wb

    dtype = torch.bfloat16
    try:
        return wb.load_model(source, dtype=dtype)
    except WorkbenchError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ServeError(f"--model {source} does not load ({type(exc).__name__}: {exc}): pass zoo:NAME, a local "
                         "model directory or a hub id already in the cache") from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_warning(host: str, port: int, live_model: bool = False) -> str | None:
    """The warning for a non-loopback host (None for loopback)."""
    if is_loopback(host):
        return None
    return (f"workbench: warning: serving on {host}:{port}, reachable from other machines: anyone who can "
            "reach it sees these runs" + (" and can drive the model" if live_model else "")
            + "; use the default --host 127.0.0.1 unless you mean it")


def _component_route():
    """Panel's /components/ route imports the module named in the URL to find a component's
    listed resources; here it answers only for Panel's and Bokeh's own modules, so a URL cannot make
    the server import anything else."""
    from panel.io.server import ComponentResourceHandler
    from tornado.web import HTTPError

    class WorkbenchComponentHandler(ComponentResourceHandler):
        def parse_url_path(self, path: str) -> str:
            mod = path.split("/", 1)[0]
            if not (mod == "panel" or mod.startswith(("panel.", "bokeh."))):
                raise HTTPError(404)
            return super().parse_url_path(path)

    return (r"/components/(.*)", WorkbenchComponentHandler, {})


def make_server(runs=(), *, model=None, predictors=None, backend: str = "auto", port: int = 5006,
                host: str = "127.0.0.1",
                threads: int = 4, start: bool = True, threaded: bool = False, warn=print):
    """A Panel/Bokeh server of the dashboard (not blocking). `port=0` picks a free port.
    threaded=True: the server runs in its own thread (tests, notebooks), answering when this
    returns; stop it with `.stop()`."""
    paths = check_runs(runs)
    if not paths and model is None:
        raise ServeError("nothing to serve: pass one or more RUN_DIR and/or --model SOURCE")
    if port == 0:
        port = free_port(host)
    check_port(host, port)
    msg = host_warning(host, port, model is not None)
    if msg:
        warn(msg, file=sys.stderr)
    from workbench.widgets.store import _names

    names = _names(paths)
    pn.config.nthreads = threads
    _extension()
    from workbench.widgets import figures, views

    figures._white_figure().to_plotly_json()  # plotly's imports now, not in the first session's page load
    views.all_views()

    def page():
        return pn.Column(Dashboard(runs=names, model=model, predictors=predictors, backend=backend), sizing_mode="stretch_width")

    origins = [f"{h}:{port}" for h in ("127.0.0.1", "localhost")]
    if not is_loopback(host):
        origins.append(f"{host}:{port}" if host not in ("0.0.0.0", "::") else "*")
    server = pn.serve({"/": page}, port=port, address=host, websocket_origin=origins, show=False,
                      start=threaded, title=TITLE, threaded=threaded, autoreload=False, check_unused_sessions=5000,
                      unused_session_lifetime=15000, extra_patterns=[_component_route()])
    server.port_used = port
    if start and not threaded:
        server.start()
    if threaded:
        _wait_answering(host, port)
    return server


def _wait_answering(host: str, port: int, timeout: float = 10.0) -> None:
    """Until the server thread answers HTTP (a threaded server is returned ready to use)."""
    import http.client
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port, timeout=2)
            c.request("HEAD", "/static/js/bokeh.min.js")
            c.getresponse()
            return
        except OSError:
            time.sleep(0.1)


def serve(runs=(), *, model=None, predictors=None, port: int = 5006, host: str = "127.0.0.1") -> None:
    """Serve the dashboard until interrupted."""
    server = make_server(runs, model=model, predictors=predictors, port=port, host=host)
    print(f"workbench: serving {len(list(runs))} run(s){' and a live model' if model is not None else ''} at "
          f"http://{host if ':' not in host else '[' + host + ']'}:{server.port_used}/ (Ctrl-C stops)", flush=True)
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


__all__ = ["Dashboard", "ServeError", "check_port", "check_runs", "make_server", "serve", "show"]
