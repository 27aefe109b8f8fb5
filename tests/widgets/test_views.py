"""Views with plain pytest (Panel's testing guide): build each view, render it, change a control
and check that the figure changed; the registry, the store, the report and `wb.show`."""

from __future__ import annotations

import pytest

pn = pytest.importorskip("panel", reason="panel is not installed (the viz extra)")

from workbench.widgets.store import RunStore  # noqa: E402
from workbench.widgets.views import View, all_views, make_view, register_view, views_for  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.capture.run import Run  # noqa: E402
from workbench.errors import RunError  # noqa: E402

RUN_VIEWS = ["SparsityView", "CETTView", "ChunkView", "PredictorView"]


@pytest.fixture(scope="module")
def run(tiny_run_dir):
    return Run.load(tiny_run_dir)


def _plotly_panes(viewable):
    return [p for p in viewable.select(pn.pane.Plotly)]


def test_registry_lists_every_view_in_order(run):
    names = [v.__name__ for v in all_views()]
    assert names[: len(RUN_VIEWS)] == RUN_VIEWS and "AccelView" in names
    assert [v.__name__ for v in views_for(run)] == RUN_VIEWS  # the live view never applies to a Run


@pytest.mark.parametrize("name", RUN_VIEWS)
def test_view_renders_and_redraws_on_every_control(run, name):
    cls = next(v for v in all_views() if v.__name__ == name)
    view = cls(run=run)
    pn.panel(view).get_root()  # renders to a Bokeh model as a notebook cell would
    changed = 0
    for control in cls.controls:
        view = cls(run=run)  # each control from the defaults
        panes = _plotly_panes(view.__panel__())
        assert panes and all(p.object is not None for p in panes)
        p = view.param[control]
        before = panes[0].object.to_json() + "".join(q.object.to_json() for q in panes[1:])
        if control == "layers":
            view.layers = p.objects[:1]
        elif getattr(p, "objects", None) and len(p.objects) > 1 and not isinstance(p.default, list):
            setattr(view, control, [o for o in p.objects if o != getattr(view, control)][0])
        elif isinstance(getattr(view, control), bool):
            setattr(view, control, not getattr(view, control))
        elif isinstance(getattr(view, control), list) and p.objects:
            setattr(view, control, p.objects[:1])
        else:
            continue
        after = panes[0].object.to_json() + "".join(q.object.to_json() for q in panes[1:])
        assert after != before, f"{name}.{control} did not change the figure"
        assert view.figure is panes[0].object
        changed += 1
    assert changed >= 2


def test_layers_selection_filters_the_traces(run):
    from workbench.widgets.views.chunk import ChunkView

    v = ChunkView(run=run, pooled=False)
    assert {t.name for t in v.figure.data} == {"layer 0", "layer 1"}
    v.layers = [1]
    assert {t.name for t in v.figure.data} == {"layer 1"}


def test_views_share_the_store_selection_both_ways(tiny_run_dir):
    from workbench.widgets.views.chunk import ChunkView
    from workbench.widgets.views.sparsity import SparsityView

    store = RunStore([tiny_run_dir])
    a, b = SparsityView(run=store.run(), store=store), ChunkView(run=store.run(), store=store)
    a.layers = [1]
    assert store.layers == [1] and b.layers == [1]
    other = RunStore([tiny_run_dir])  # another session: its own selection
    assert other.layers == []


def test_missing_data_names_the_analysis(bare_run_dir):
    bare = Run.load(bare_run_dir)
    assert [v.__name__ for v in views_for(bare)] == ["SparsityView"]
    for cls in all_views():
        if cls.__name__ in RUN_VIEWS[1:]:
            alert = make_view(cls, bare)
            assert isinstance(alert, pn.pane.Alert)
            assert "run `" in alert.object or "serve" in alert.object
    from workbench.widgets.views.cett import CETTView
    from workbench.widgets.views.chunk import ChunkView
    from workbench.widgets.views.predictor import PredictorView

    assert "wm.cett_curve(model, texts)" in CETTView.missing(bare)
    assert "wm.chunk_table(model, texts)" in ChunkView.missing(bare)
    assert "wm.train_predictors(model, texts).store(run)" in PredictorView.missing(bare)
    s = make_view(all_views()[0], bare)  # no rules table: the note says how to add one
    assert "wm.sparsity_table" in s.info()


def test_view_built_directly_on_a_run_it_cannot_show_says_what_to_run(bare_run_dir):
    """`CETTView(run=run)` in a notebook (not through make_view) on a run without its data: the
    view's own message, not an IndexError from inside the view."""
    bare = Run.load(bare_run_dir)
    for cls in all_views():
        if getattr(cls, "live", False) or cls.applies(bare):
            continue
        view = cls(run=bare)
        alert = view.__panel__()
        assert isinstance(alert, pn.pane.Alert), cls.__name__
        assert cls.missing(bare) in alert.object
        pn.panel(view).get_root()  # renders as a notebook cell would


def test_store_loads_lazily_once_and_reports_damage(tiny_run_dir, damaged_run_dir):
    from workbench.widgets import store as st

    s = RunStore([tiny_run_dir, damaged_run_dir])
    assert s.names == ["tiny", "damaged"] and s.run_name == "tiny"
    assert s.run() is RunStore([tiny_run_dir]).run()  # one load per process
    assert s.error("tiny") is None
    msg = s.error("damaged")
    assert "cannot be read" in msg and "re-create it" in msg
    with pytest.raises(RunError, match="no run called 'elsewhere'"):
        s.run("elsewhere")
    assert st.load_cached(tiny_run_dir) is s.run()


def test_dashboard_shows_damaged_run_as_error(tiny_run_dir, damaged_run_dir):
    from workbench.widgets.app import Dashboard

    d = Dashboard(runs=[tiny_run_dir, damaged_run_dir])
    assert len(d.views) == 4
    d.store.run_name = "damaged"
    alerts = list(d.__panel__().select(pn.pane.Alert))
    assert alerts and "cannot be shown" in alerts[0].object and "re-create it" in alerts[0].object
    assert d.views == []


def test_register_view_is_one_class_and_one_line(run):
    import param
    from workbench.widgets import views as V

    @register_view
    class CountView(View):
        title = "Count"
        n = param.Integer(1)

        @classmethod
        def applies(cls, run):
            return True

        def __panel__(self):
            return pn.pane.Markdown(f"{len(self.run.sites)} sites")

    try:
        assert CountView in views_for(run) and CountView in all_views()
        assert CountView(run=run).figures() == []
    finally:
        V.VIEWS.remove(CountView)


def test_accel_view_measures_on_the_reference_path(tiny_bf16_model):
    from workbench.widgets.views.accel import REFERENCE_NOTE, AccelView

    v = AccelView(model=tiny_bf16_model, tokens=6, reps=1, backend="torch")
    layout = v.__panel__()
    assert len(_plotly_panes(layout)) == 2
    assert REFERENCE_NOTE.split(":")[0] in v._status.object  # no GPU here
    before = v.figure.to_json()
    m = v.measure_now()
    assert m is not None and not v._error.visible
    assert m.summary["backend"] == "torch" and m.summary["logits_rel_rms"] == pytest.approx(0.0, abs=1e-2)
    assert v.figure.to_json() != before and len(v.figures()) == 2
    assert "decode step" in v.figure.data[0].x
    v.on = True  # the switch swaps the FFNs in, the mode change re-swaps, off restores
    assert "sparse kernels" in v._status.object
    v.mode = "chunk"
    v.on = False
    assert "dense" in v._status.object
    v.mode = "exact"


def test_accel_view_error_is_shown_not_raised():
    from workbench.widgets.views.accel import AccelView

    from tests.tiny import build

    model = build("llama")
    model.wb_source = "zoo:tiny"  # as wb.load_model sets it: the status names the source, not a local path
    v = AccelView(model=model)  # float32: the kernels need bf16/fp16
    assert "Model `zoo:tiny`" in v._status_text()
    v.on = True
    assert v.on is False and v._error.visible and "bfloat16" in v._error.object


def test_wb_show_picks_the_views(tiny_run_dir, tiny_bf16_model):
    from workbench.widgets.app import Dashboard
    from workbench.widgets.views.accel import AccelView

    d = wb.show(Run.load(tiny_run_dir))
    assert isinstance(d, Dashboard) and len(d.views) == 4
    assert isinstance(wb.show(tiny_bf16_model), AccelView)
    assert len(wb.show([tiny_run_dir], model=tiny_bf16_model).views) == 5


def test_report_is_self_contained(tiny_run_dir, bare_run_dir, tmp_path):
    from workbench.widgets.report import write_report

    out = write_report(tiny_run_dir, tmp_path / "r.html")
    text = out.read_text()
    assert text.count("Plotly.newPlot") >= 5
    assert "<script src=" not in text and "<link " not in text  # plotly.js inlined, nothing fetched
    for title in ("Layer sparsity", "CETT and PPL-p%", "Chunk sparsity", "Predictors"):
        assert f"<h2>{title}</h2>" in text
    bare = write_report(bare_run_dir, tmp_path / "bare.html").read_text()
    assert "wm.chunk_table(model, texts)" in bare


def test_dashboard_compare_with_puts_a_second_run_beside_the_first(tiny_run_dir, bare_run_dir, damaged_run_dir):
    from workbench.widgets.app import Dashboard
    from workbench.widgets.store import NO_COMPARE
    from workbench.widgets.views.cett import CETTView
    from workbench.widgets.views.sparsity import SparsityView

    d = Dashboard(runs=[tiny_run_dir, bare_run_dir, damaged_run_dir])
    assert d.store.param.compare_name.objects == [NO_COMPARE, "tiny", "bare", "damaged"]
    assert any(getattr(w, "name", "") == "compare with" for w in d.__panel__().select(pn.widgets.Select))
    one = {type(v).__name__: v for v in d.views}
    assert one["SparsityView"].other is None
    d.store.compare_name = "bare"
    views = {type(v).__name__: v for v in d.views}
    s = views["SparsityView"]
    assert s.other is d.store.run("bare") and s.names == ("tiny", "bare")
    assert [t.name for t in s.figure.data] == ["tiny", "bare"]  # one line per run
    want = d.store.run("bare").summary().groupby("layer").token_sparsity.mean()
    assert list(s.figure.data[1].y) == pytest.approx(list(want))
    assert "**bare**" in s.info()
    assert isinstance(views["CETTView"], CETTView) and views["CETTView"].other is None  # does not compare
    d.store.compare_name = "tiny"  # the shown run itself: nothing beside it
    assert {type(v).__name__: v for v in d.views}["SparsityView"].other is None
    d.store.compare_name = "damaged"
    assert d.views  # every tab built
    errors = [o for o in d._tabs if isinstance(o, pn.pane.Alert) and "cannot be compared" in o.object]
    assert errors and "re-create it" in errors[0].object
    assert SparsityView.compares and not CETTView.compares
