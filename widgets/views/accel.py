"""Acceleration, live: a switch puts the model's FFNs on the sparse kernels (`wb.accelerate` with the
chosen mode) and back; Measure times dense vs accelerated on the same prompt and shows the
realised sparsity and the logits error (`handle.measure`). Without a GPU the torch reference path
runs: same arithmetic, so the error and sparsity figures hold, but its timings say nothing about
the kernels' speed.

    pn.panel(AccelView(model=wb.load_model("zoo:relu-llama", dtype=torch.bfloat16)))

The model is shared (a served app hands every session the same one): the switch state belongs to
the model, and measurements of different sessions take turns (a lock per model).
"""

from __future__ import annotations

import threading
import weakref

import panel as pn
import param
from workbench.widgets.views import View, register_view
from workbench.widgets.views._base import plot_pane

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> lock
_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Accelerator while on
_GUARD = threading.Lock()

REFERENCE_NOTE = ("**No GPU: the torch reference path runs.** It computes what the kernels compute "
                  "(the same rows skipped, so the logits error and the realised sparsity are the real "
                  "ones), but in plain torch on the CPU: its timings measure the reference, not the "
                  "Triton kernels, and are often slower than dense. Run on a CUDA GPU for the speedups.")


def _lock(model):
    with _GUARD:
        return _LOCKS.setdefault(model, threading.RLock())


def _on_gpu(model) -> bool:
    try:
        return next(model.parameters()).device.type == "cuda"
    except StopIteration:
        return False


def prompt_ids(model, tokens: int):
    """The first `tokens` ids of the zoo's validation text (seeded random ids without a tokenizer)."""
    from workbench.data import validation_tokens

    ids, mask, _ = validation_tokens(model, tokens, seq_len=tokens)
    return ids[:1, : int(mask[0].sum())]


@register_view
class AccelView(View):
    title = "Acceleration"
    needs = "a live model"
    live = True
    order = 90

    model = param.Parameter(doc="the live model (bf16/fp16) to accelerate")
    mode = param.Selector(default="exact", objects=["exact", "chunk", "predictor"])
    on = param.Boolean(default=False, doc="the FFNs run on the sparse kernels (wb.accelerate)")
    tokens = param.Integer(default=16, bounds=(4, 512), doc="prompt tokens fed as decode steps")
    reps = param.Integer(default=3, bounds=(1, 100), doc="timing repetitions (median)")
    predictors = param.Parameter(default=None, doc="Predictors or a directory, for mode='predictor'")
    backend = param.Selector(default="auto", objects=["auto", "torch", "triton"],
                             doc="auto: Triton on CUDA, the torch reference elsewhere")
    measurement = param.Parameter(default=None, doc="the last Measurement")

    @classmethod
    def applies(cls, run) -> bool:
        return False  # it takes a live model, not a Run

    @classmethod
    def missing(cls, run) -> str:
        return ("acceleration runs on a live model: `workbench serve RUN_DIR --model SOURCE`, or in a notebook "
                "AccelView(model=wb.load_model(SOURCE, dtype=torch.bfloat16))")

    def __init__(self, **params):
        super().__init__(**params)
        if self.model is None:
            raise ValueError("AccelView needs model=<a loaded model>")
        if self.predictors is None:
            self.param.mode.objects = ["exact", "chunk"]
        self.on = _HANDLES.get(self.model) is not None
        self._status = pn.pane.Markdown(self._status_text(), sizing_mode="stretch_width")
        self._error = pn.pane.Alert("", alert_type="danger", visible=False)
        self._progress = pn.indicators.Progress(active=False, visible=False, width=200)
        from workbench.widgets.figures_accel import placeholder_figure

        self._figs = {"timing": placeholder_figure("press Measure", title="Dense vs accelerated time (median, ms)"),
                      "sparsity": placeholder_figure("press Measure", title="Sparsity realised by the kernels per layer")}
        self._panes = {k: plot_pane(f) for k, f in self._figs.items()}
        self._rms = pn.indicators.Number(name="logits rel. RMS error", value=0, format="{value:.2e}", font_size="20pt")
        self._top1 = pn.indicators.Number(name="top-1 agreement", value=0, format="{value:.4f}", font_size="20pt")
        self._speed = pn.indicators.Number(name="decode step speedup", value=0, format="{value:.2f}x",
                                           font_size="20pt")
        self.button = pn.widgets.Button(name="Measure", button_type="primary")
        self.button.on_click(lambda _e: self.measure_now())
        self.param.watch(self._toggle, ["on"])
        self.param.watch(self._mode_changed, ["mode"])

    # -- actions ---------------------------------------------------------------------
    def _toggle(self, event) -> None:
        import workbench as wb

        with _lock(self.model):
            h = _HANDLES.pop(self.model, None)
            if h is not None:
                h.off()
            if event.new:
                try:
                    _HANDLES[self.model] = wb.accelerate(self.model, mode=self.mode, backend=self.backend,
                                                      predictors=self.predictors)
                except Exception as exc:  # noqa: BLE001 - shown to the user, switch back off
                    self._show_error(exc)
                    self.param.update(on=False)
        self._status.object = self._status_text()

    def _mode_changed(self, _event) -> None:
        if self.on:  # re-accelerate with the new mode
            self.param.trigger("on")
        else:
            self._status.object = self._status_text()

    def _show_error(self, exc) -> None:
        self._error.object = f"**{type(exc).__name__}**: {exc}"
        self._error.visible = True

    def measure_now(self):
        """Measure dense vs accelerated now (blocking this session only) and redraw."""
        from workbench.widgets.figures_accel import accel_timing_figure, realised_sparsity_figure

        import workbench as wb

        self._error.visible = False
        self.button.disabled = True
        self._progress.visible = self._progress.active = True
        try:
            ids = prompt_ids(self.model, self.tokens)
            with _lock(self.model):
                h = _HANDLES.get(self.model)
                if h is not None and h.mode == self.mode:
                    m = h.measure(ids, reps=self.reps, warmup=1)
                else:
                    if h is not None:
                        h.off()
                    try:
                        with wb.accelerate(self.model, mode=self.mode, backend=self.backend,
                                                      predictors=self.predictors) as h2:
                            m = h2.measure(ids, reps=self.reps, warmup=1)
                    finally:
                        if h is not None:
                            h.on()
            self.measurement = m
            self._figs = {"timing": accel_timing_figure(m.layers, m.summary),
                          "sparsity": realised_sparsity_figure(m.layers)}
            for k, f in self._figs.items():
                self._panes[k].object = f
            self._rms.value = m.summary["logits_rel_rms"]
            self._top1.value = m.summary["top1_agreement"]
            self._speed.value = m.summary["step_speedup"]
            self._status.object = self._status_text()
            return m
        except Exception as exc:  # noqa: BLE001 - shown in the view
            self._show_error(exc)
            return None
        finally:
            self.button.disabled = False
            self._progress.visible = self._progress.active = False

    # -- display -----------------------------------------------------------------------
    def _status_text(self) -> str:
        name = (getattr(self.model, "wb_source", "")  # what the user asked wb.load_model for (zoo:NAME, a hub id)
                or getattr(getattr(self.model, "config", None), "_name_or_path", "") or type(self.model).__name__)
        state = (f"**on the sparse kernels** ({self.mode} mode)" if self.on
                 else f"dense (the switch puts them on the kernels in {self.mode} mode)")
        lines = [f"Model `{name}`: FFNs {state}."]
        if not _on_gpu(self.model):
            lines.append(REFERENCE_NOTE)
        m = self.measurement
        if m is not None:
            s = m.summary
            lines.append(f"Last measurement: mode {s['mode']}, backend {s['backend']} on {s['device']}, "
                         f"{s['tokens']} tokens ({s['tokens_per_step']} a step): decode step "
                         f"{s['step_dense_ms']:.3f} -> {s['step_ms']:.3f} ms, logits rel. RMS {s['logits_rel_rms']:.2e}, "
                         f"top-1 agreement {s['top1_agreement']:.4f}, mean realised sparsity "
                         f"{m.layers['realised_sparsity'].mean():.3f}.")
        return "  \n".join(lines)

    @property
    def figure(self):
        return self._figs["timing"]

    def figures(self) -> list[tuple[str, object]]:
        return [(f.layout.title.text or self.title, f) for f in self._figs.values()]

    def __panel__(self):
        controls = pn.Row(
            pn.widgets.Switch.from_param(self.param.on, name="accelerate"),
            pn.widgets.RadioButtonGroup.from_param(self.param.mode),
            pn.widgets.IntInput.from_param(self.param.tokens, width=120),
            pn.widgets.IntInput.from_param(self.param.reps, width=100),
            self.button, self._progress, sizing_mode="stretch_width")
        return pn.Column(pn.pane.Markdown(f"### {self.title}"), controls, self._error, self._status,
                         pn.Row(self._speed, self._rms, self._top1), *self._panes.values(),
                         sizing_mode="stretch_width")
