"""The served dashboard in a real browser: Playwright driving Debian's chromium (headless, the
flags below; scripts/setup_browser.sh installs both; never `playwright install`). One server and
one browser for the whole module."""

from __future__ import annotations

import http.client
import os
import sys
import time

import pytest

pytest.importorskip("panel", reason="panel is not installed (the viz extra)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: bash scripts/setup_browser.sh")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWS = {"Layer sparsity": "per layer", "CETT and PPL-p%": "CETT", "Chunk sparsity": "CLS_L",
         "Predictors": "recall", "Acceleration": "Dense vs accelerated"}

if not os.path.exists(CHROMIUM):
    pytest.skip("no /usr/bin/chromium: bash scripts/setup_browser.sh", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tiny_run_dir, damaged_run_dir, bare_run_dir, tiny_bf16_model, analysis_run_dirs):
    from workbench.widgets.app import make_server

    srv = make_server([tiny_run_dir, damaged_run_dir, *analysis_run_dirs.values(), bare_run_dir], model=tiny_bf16_model,
                      backend="torch", port=0, threaded=True)
    yield f"http://127.0.0.1:{srv.port_used}/"  # a threaded server answers once make_server returns
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def open_page(browser, url):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.goto(url)
    page.locator(".js-plotly-plot >> visible=true").first.wait_for(timeout=30000)
    return page


def plot_title(page, index: int = 0) -> str:
    loc = page.locator(".js-plotly-plot >> visible=true").nth(index)
    return loc.evaluate("el => (el.layout && el.layout.title && (el.layout.title.text || el.layout.title)) || ''")


def wait_title(page, text: str, index: int = 0, timeout: float = 15.0) -> str:
    end = time.time() + timeout
    title = ""
    while time.time() < end:
        try:
            title = plot_title(page, index)
        except Exception:  # noqa: BLE001 - the plot is being replaced
            title = ""
        if text in title:
            return title
        time.sleep(0.05)
    raise AssertionError(f"plot title {title!r} never contained {text!r}")


def select(page, option: str, value: str) -> None:
    """Choose `value` in the first select offering `option` (the run select before "compare with")."""
    page.locator(f"select:has(option[value='{option}'])").first.select_option(value)


def trace_names(page, index: int = 0) -> list:
    try:
        return page.locator(".js-plotly-plot >> visible=true").nth(index).evaluate(
            "el => (el.data || []).map(t => t.name)")
    except Exception:  # noqa: BLE001 - the plot is being replaced
        return []


def test_every_view_renders_a_plot_without_console_errors(server, browser):
    page = open_page(browser, server)
    for tab, text in VIEWS.items():
        page.locator(".bk-tab", has_text=tab).first.click()
        wait_title(page, text)
    page.locator(".bk-tab", has_text="Acceleration").first.click()
    page.get_by_role("button", name="Measure").click()
    wait_title(page, "Dense vs accelerated time")
    end = time.time() + 20
    while time.time() < end:  # the measurement replaces the placeholder
        n = page.locator(".js-plotly-plot >> visible=true").first.evaluate("el => el.data.length")
        if n >= 2:
            break
        time.sleep(0.1)
    assert n >= 2
    assert page.get_by_text("torch reference path runs").first.is_visible()
    assert page.console_errors == []
    page.context.close()


def test_analysis_views_render_their_runs(server, browser, analysis_run_dirs):
    """The routing, recurrent-state and bricks views draw real (tiny) runs of their analyses."""
    page = open_page(browser, server)
    for tab, path in analysis_run_dirs.items():
        select(page, path.name, path.name)
        plot = page.locator(".js-plotly-plot >> visible=true").first
        for attempt in range(4):  # the tabs are rebuilt for the new run: click once they are
            time.sleep(0.5)
            page.locator(".bk-tab", has_text=tab).first.click()
            try:
                plot.wait_for(timeout=10000)
                break
            except sync_api.TimeoutError:
                if attempt == 3:
                    raise
        assert tab in page.locator(".bk-tab.bk-active").first.inner_text(), tab
        end = time.time() + 20
        n = 0
        while time.time() < end and not n:
            try:
                n = plot.evaluate("el => (el.data || []).length")
            except Exception:  # noqa: BLE001 - the plot is being replaced
                n = 0
            time.sleep(0.1)
        assert n > 0, tab
    assert page.console_errors == []
    page.context.close()


def test_control_change_updates_figure_and_sessions_stay_apart(server, browser):
    a, b = open_page(browser, server), open_page(browser, server)
    assert "token sparsity" in plot_title(a) and "token sparsity" in plot_title(b)
    select(a, "dead_neurons", "dead_neurons")
    wait_title(a, "dead neurons")
    select(b, "mean_abs", "mean_abs")
    wait_title(b, "mean abs")
    time.sleep(0.3)
    assert "dead neurons" in plot_title(a) and "mean abs" in plot_title(b)
    assert a.console_errors == [] and b.console_errors == []
    a.context.close()
    b.context.close()


def test_damaged_run_shows_its_error(server, browser):
    page = open_page(browser, server)
    select(page, "damaged", "damaged")
    err = page.get_by_text("cannot be shown").first
    err.wait_for(timeout=15000)
    assert page.get_by_text("re-create it").first.is_visible()
    page.context.close()


def test_server_refuses_files_outside_the_runs(server, tiny_run_dir):
    port = int(server.rsplit(":", 1)[1].strip("/"))
    paths = ["/static/../../../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
             "/static/extensions/panel/../../../../../../../../etc/passwd", "//etc/passwd",
             f"/{tiny_run_dir}/run.json", f"/static/{tiny_run_dir}/run.json", "/run.json", "/tiny/run.json",
             "/components/os/path/__file__/etc/passwd", "/components/antigravity/x/__css__/y",
             f"/?path={tiny_run_dir}/run.json"]
    for path in paths:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        assert b"root:" not in body and b'"format"' not in body, path
        assert "antigravity" not in sys.modules  # the URL made the server import nothing
        if not path.startswith("/?"):
            assert r.status in (400, 403, 404), (path, r.status)


def test_report_renders_without_network(browser, tiny_run_dir, tmp_path):
    from workbench.widgets.report import write_report

    out = write_report(tiny_run_dir, tmp_path / "report.html")
    ctx = browser.new_context()
    requested = []

    def block(route):
        requested.append(route.request.url)
        route.abort()

    ctx.route("http*://**/*", block)  # no network: anything fetched would fail (and be listed)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(out.as_uri())
    page.locator(".js-plotly-plot").first.wait_for(timeout=20000)
    assert page.locator(".js-plotly-plot").count() >= 5
    assert requested == [] and errors == []
    ctx.close()


def test_long_operation_shows_progress_without_blocking_other_sessions(server, browser, monkeypatch):
    from workbench.accel.core import Accelerator

    real = Accelerator.measure

    def slow_measure(self, *a, **kw):  # a measurement that takes a while, as on a real model
        time.sleep(4)
        return real(self, *a, **kw)

    monkeypatch.setattr(Accelerator, "measure", slow_measure)
    a, b = open_page(browser, server), open_page(browser, server)
    a.locator(".bk-tab", has_text="Acceleration").first.click()
    a.get_by_role("button", name="Measure").click()
    a.locator("progress >> visible=true").first.wait_for(timeout=5000)  # A shows its progress
    t0 = time.time()
    select(b, "dead_neurons", "dead_neurons")  # B is served meanwhile
    wait_title(b, "dead neurons", timeout=3)
    assert time.time() - t0 < 3
    assert a.locator("progress >> visible=true").count() == 1  # A still measuring
    end = time.time() + 30
    while time.time() < end and a.locator("progress >> visible=true").count():
        time.sleep(0.1)
    assert a.locator("progress >> visible=true").count() == 0
    assert a.console_errors == [] and b.console_errors == []
    a.context.close()
    b.context.close()


def test_compare_with_draws_both_runs(server, browser):
    page = open_page(browser, server)
    assert len(trace_names(page)) == 1  # one run: one line
    page.locator(".wb-compare select").select_option("bare")
    end = time.time() + 20
    while time.time() < end and trace_names(page) != ["tiny", "bare"]:
        time.sleep(0.1)
    assert trace_names(page) == ["tiny", "bare"]
    assert page.get_by_text("mean token sparsity").first.is_visible()
    page.locator(".wb-compare select").select_option("damaged")
    page.get_by_text("cannot be compared").first.wait_for(timeout=20000)
    assert page.console_errors == []
    page.context.close()
