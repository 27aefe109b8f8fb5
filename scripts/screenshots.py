"""The screenshots of docs/images: every dashboard view, served and drawn in Chromium.

    python scripts/screenshots.py                    # builds the runs in /tmp/wb_shots, writes docs/images
    python scripts/screenshots.py --only state,routing

Builds (once; reused while their folders exist) the runs the views read, all on the offline zoo:
the zoo:relu-llama profile with every stored analysis (`demo_run`), a zoo:silu-llama profile with the same rules table
(compared with it), zoo:topk-moe and zoo:blockffn routing profiles on the same documents (compared
with each other), the state scans of the state-capacity pair zoo:mamba2-s64 / -s16 with their
cards' passkey grids stored (compared), and a bricks analysis of zoo:relu-llama. Then serves them
with a live zoo:relu-llama (`workbench.widgets.app.make_server`, loopback, a free port) and drives
Debian's chromium with Playwright (scripts/setup_browser.sh; never `playwright install`): for each
shot, choose the run, the run to compare with and the tab, wait for the plots, save the full page.
CPU only, a few minutes, most of it building the runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

# file name -> (run, run to compare with or None, tab)
SHOTS = {
    "sparsity": ("relu-llama", None, "Layer sparsity"),
    "compare": ("relu-llama", "silu-llama", "Layer sparsity"),
    "cett": ("relu-llama", None, "CETT and PPL-p%"),
    "chunk": ("relu-llama", None, "Chunk sparsity"),
    "predictor": ("relu-llama", None, "Predictors"),
    "accel": ("relu-llama", None, "Acceleration"),
    "routing": ("topk-moe", "blockffn", "Routing"),
    "state": ("mamba2-s64", "mamba2-s16", "Recurrent state"),
    "bricks": ("bricks", None, "Bricks"),
}


def log(*a) -> None:
    print("[screenshots]", *a, file=sys.stderr, flush=True)


def _routing_runs(work: Path) -> None:
    import torch

    import workbench as wb
    from workbench.models.corpus import load_split

    docs = load_split("validation")
    by_domain = {d: [x for x in docs if x.domain == d][:10] for d in ("prose", "code", "math", "records")}
    data = [by_domain[d][i] for i in range(10) for d in by_domain]
    for name in ("topk-moe", "blockffn"):
        model = wb.load_model(f"zoo:{name}", dtype=torch.float32)
        wb.profile(model, data, probes=[wb.RoutingProbe(budget=1024)], max_length=128, batch_size=8,
                   progress=False).save(work / name)


def _state_runs(work: Path) -> None:
    import pandas as pd

    from workbench.metrics import state as ms
    from workbench.metrics.store import store
    from workbench.models import zoo
    from workbench.models.ssd import fast_scan
    from workbench.models.train import load_zoo_model, long_sequences

    for name in ("mamba2-s64", "mamba2-s16"):
        model, _ = load_zoo_model(name)
        recipe = zoo.spec(name).recipe
        T = recipe["seq_len"]  # the stage-1 length: the card's multiples
        final = recipe.get("stage2", {}).get("seq_len", T)  # the length the model was trained at last
        ids = long_sequences(64 * T, 2)
        with fast_scan():
            run = ms.state_scan(model, ids, bucket=T // 2, chunk=4 * T, hist_positions=(final, 64 * T),
                                data={"train_len": final, "source": f"zoo:{name}"})
        p = zoo.card_metrics(name)["passkey"]
        store(run, "passkey", pd.DataFrame([{"length": L, "depth": d, "accuracy": a}
                                            for L, row in zip(p["lengths"], p["accuracy"])
                                            for d, a in zip(p["depths"], row)]))
        run.save(work / name)


def _bricks_run(work: Path) -> None:
    import workbench as wb
    import workbench.metrics as wm
    from workbench.metrics.bricks import zoo_documents

    train, val = zoo_documents()
    res = wm.brick_analysis(wb.load_model("zoo:relu-llama"), train, eval_data=val, k=8, seeds=3, max_length=128,
                            eval_max_length=64, baseline_ablation=False)
    res.run.save(work / "bricks")


def build_runs(work: Path, names: set) -> None:
    from workbench.widgets.analyses import demo_run

    builders = [("relu-llama", lambda: demo_run(work / "relu-llama", "zoo:relu-llama", tokens=4096)),
                ("silu-llama", lambda: demo_run(work / "silu-llama", "zoo:silu-llama", tokens=4096,
                                                analyses=("rules",))),
                ("topk-moe", lambda: _routing_runs(work)), ("mamba2-s64", lambda: _state_runs(work)),
                ("bricks", lambda: _bricks_run(work))]
    for name, build in builders:
        if name in names and not (work / name / "run.json").is_file():
            log("building", work / name)
            t0 = time.perf_counter()
            build()
            log(f"  {time.perf_counter() - t0:.0f} s")


def _wait_plots(page, timeout: float = 60.0) -> None:
    """Until a plot is visible and every visible plot has data (the figures replace placeholders)."""
    plots = page.locator(".js-plotly-plot >> visible=true")
    plots.first.wait_for(timeout=timeout * 1000)
    end = time.time() + timeout
    while time.time() < end:
        try:
            if all(plots.nth(i).evaluate("el => (el.data || []).length > 0") for i in range(plots.count())):
                break
        except Exception:  # noqa: BLE001 - a plot is being replaced
            pass
        time.sleep(0.2)
    time.sleep(1.0)  # the last relayout


def _choose(page, css: str, value: str) -> None:
    sel = page.locator(css)
    if sel.input_value() != value:
        sel.select_option(value)
        time.sleep(1.5)  # the tabs are rebuilt for the new selection


def shoot(url: str, out: Path, shots: dict) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for name, (run, other, tab) in shots.items():
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            errors: list = []
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            page.goto(url)
            _wait_plots(page)
            _choose(page, ".wb-run select", run)
            _choose(page, ".wb-compare select", other or "(none)")
            page.locator(".bk-tab", has_text=tab).first.click()
            if tab == "Acceleration":
                page.get_by_role("button", name="Measure").click()
                end = time.time() + 300
                while time.time() < end and page.locator(".js-plotly-plot >> visible=true").first.evaluate(
                        "el => (el.data || []).length") < 2:
                    time.sleep(0.5)
            _wait_plots(page)
            if errors:
                raise RuntimeError(f"{name}: page errors {errors}")
            page.screenshot(path=str(out / f"view_{name}.png"), full_page=True)
            log("wrote", out / f"view_{name}.png")
            page.context.close()
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/wb_shots", help="where the runs are built (kept for the next call)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    ap.add_argument("--only", help=f"comma-separated shots among {', '.join(SHOTS)} (default: all)")
    args = ap.parse_args()
    shots = {k: v for k, v in SHOTS.items() if not args.only or k in args.only.split(",")}
    if unknown := set((args.only or "").split(",")) - set(SHOTS) - {""}:
        raise SystemExit(f"unknown shots {sorted(unknown)}; choose among {', '.join(SHOTS)}")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = {r for r, o, _ in shots.values()} | {o for _, o, _ in shots.values() if o} | {"relu-llama"}
    build_runs(work, names)
    from workbench.widgets.app import make_server

    import workbench as wb

    runs = [work / n for n in ("relu-llama", "silu-llama", "topk-moe", "blockffn", "mamba2-s64", "mamba2-s16",
                               "bricks") if (work / n / "run.json").is_file()]
    srv = make_server(runs, model=wb.load_model("zoo:relu-llama"), port=0, threaded=True)
    try:
        shoot(f"http://127.0.0.1:{srv.port_used}/", out, shots)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
