"""`wb.accelerate(model, mode=...)`: flip a loaded model's FFNs onto the sparse kernels.

    handle = wb.accelerate(model, mode="exact")     # swapped in now
    model.generate(...)                              # runs the kernels
    handle.off()                                     # the original modules are back, weights intact
    with wb.accelerate(model, mode="chunk"):         # or as a context manager
        ...
    handle.measure(ids)                              # timings, realised sparsity, error vs dense

Modes:
- "exact": decode calls (<= 8 tokens) take the exact sparse FFN (gate dense, up rows and down rows
  read only where act(gate) != 0): the same function as the dense model (a ReLU/FATReLU model
  under its own threshold); longer calls (prefill) stay dense.
- "chunk": calls of 2..64 tokens (e.g. speculative verification) take the chunk-union kernel
  (BlockFFN's scheme, dense fallback when the union is too large), 1 token the exact kernel.
- Routed MoE layers (BlockFFN, zoo:blockffn) take `kernels.moe_blocks` in exact and chunk modes:
  only the experts the router turned on (union over the call's tokens) are read.
- Plain (non-gated) ReLU FFNs (OPT, GPT-2/BERT style with a ReLU, biases allowed): where the up
  projection is an nn.Linear and the activation a module of its own (OPT, GPT-NeoX, BERT), the
  whole FFN becomes one `SparsePlainFFN` installed at the up projection, the activation and the
  down projection handing its output through (`FusedAway`) while the handle is on: in exact and
  chunk modes the up projection and activation run densely (the model's own modules) and
  `kernels.sparse_down` reads only the active neurons' down rows; in predictor mode (Deja Vu on
  OPT) `kernels.plain_ffn_predicted` reads up and down rows of the predicted neurons only, in one
  launch for one token. Otherwise (GPT-2's Conv1D up projection, an activation that is not its
  own module) only the down projection is swapped (`SparseDown`), and in predictor mode the up
  projection too (`SparsePredictedUp`).
- "predictor": gate and up both sparse on a Deja Vu predictor's mask (predictor included), for
  every call: this changes the function, and measure() reports the error instead of bounding it.
  `predictors` is a directory written by `workbench.metrics.save_predictors`, a Predictors, or a
  dict {FFN module name: {"w1", "b1", "w2", "b2"}} (logit > 0 = active). The predictors read what
  they were trained on: the residual stream entering the FFN block (the default ProSparse recipe;
  a pre-hook on the norm before the FFN hands it to the swapped module, `BlockInput`) or the FFN
  input (the "plain" recipe, version-1 files, and dicts unless they say "input": "residual").
  Predictors trained on another model or another layer count are refused (`Predictors.check`).

backend: "auto" (Triton on CUDA, else the torch reference, which is what runs on CPU), "triton"
or "torch". The model must be bf16 or fp16 with d_model, d_ff multiples of 16.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from workbench._compat import cache_kwargs
from workbench.accel.ffn import (
    MODES,
    BlockInput,
    FusedAway,
    SparseDown,
    SparseFFN,
    SparseMoE,
    SparsePlainFFN,
    SparsePredictedUp,
    is_moe_blocks,
)
from workbench.adapters import PLAIN, FFNSite, Layout, locate
from workbench.errors import WorkbenchError


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _load_predictor_tensors(predictors, sites, device, dtype, model) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """({layer name: {"w1", "b1", "w2", "b2"}}, the predictors' input: "residual" | "ffn_input")."""
    names = [s.name for s in sites]
    if isinstance(predictors, dict):  # {layer name: {"w1", "b1", "w2", "b2"}} (b2 with the threshold folded in)
        missing = [n for n in names if n not in predictors]
        if missing:
            raise WorkbenchError(f"the predictor dict has no entry for {missing[:3]}...: give one per FFN layer")
        inputs = {predictors[n].get("input", "ffn_input") for n in names}
        if len(inputs) != 1 or not inputs <= {"residual", "ffn_input"}:
            raise WorkbenchError(f"predictor dict inputs {sorted(inputs)}: give every layer the same 'input', "
                                 "'residual' or 'ffn_input' (the default)")
        return ({n: {k: predictors[n][k].to(device=device, dtype=dtype).contiguous() for k in ("w1", "b1", "w2", "b2")}
                 for n in names}, inputs.pop())
    from workbench.metrics.predictor import Predictors, load_predictors

    pred = predictors if isinstance(predictors, Predictors) else load_predictors(predictors)
    pred.check(model)  # another model's or another layer count's predictors: a clear PredictorError
    tensors, cfg = pred._tensors_and_config()
    by_name = {layer["name"]: layer["keys"] for layer in cfg["layers"]}
    out = {}
    for name in names:
        if name not in by_name:
            raise WorkbenchError(f"the predictors have no layer {name!r} (they cover {sorted(by_name)}); "
                                 "train them on this model with workbench.metrics.train_predictors")
        keys = by_name[name]
        out[name] = {k: tensors[keys[k]].to(device=device, dtype=dtype).contiguous() for k in ("w1", "b1", "w2", "b2")}
    return out, pred.input


def _moe_block_sites(model: nn.Module, layout: Layout) -> list[FFNSite]:
    """One FFNSite per ReLU-routed MoE block layer (BlockFFN): the router's parent module."""
    out = []
    for r in layout.routers:
        name = r.name.rpartition(".")[0]
        mod = model.get_submodule(name) if name else model
        if r.kind == "relu" and is_moe_blocks(mod):
            out.append(FFNSite(layer=r.layer, name=name, kind="moe_blocks", activation="silu", module=mod,
                               down=mod.down_proj, act=getattr(mod, "act_fn", None), gate=None, up=mod.up_proj,
                               d_ff=mod.down_proj.in_features, d_model=mod.down_proj.out_features))
    return out


def _blocking_message(model: nn.Module, reasons: list[str]) -> str:
    """One message listing every reason `accelerate` cannot run; per-FFN reasons grouped by text."""
    groups: dict[str, list[str]] = {}
    for r in reasons:
        head, sep, rest = r.partition(": ")
        site = sep and "." in head and " " not in head  # "model.layers.3.mlp: ..."
        groups.setdefault(rest if site else r, []).append(head if site else "")
    lines = []
    for text, sites in groups.items():
        sites = [s for s in dict.fromkeys(sites) if s]
        where = ""
        if sites:
            where = ", ".join(sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "") + ": "
        lines.append(f"  - {where}{text}")
    n = len(lines)
    return (f"cannot accelerate {type(model).__name__} ({n} reason{'s' if n > 1 else ''}):\n" + "\n".join(lines))


class Accelerator:
    """Handle returned by `accelerate`: on(), off(), context manager, measure()."""

    def __init__(self, model: nn.Module, mode: str = "exact", backend: str = "auto", predictors=None,
                 layers: list[int] | None = None, dense_fraction: float = 0.6, decode_tokens: int = 8,
                 layout: Layout | None = None, call_graphs: bool = True):
        if mode not in MODES:
            raise WorkbenchError(f"mode {mode!r}: use one of {MODES}")
        if backend not in ("auto", "triton", "torch"):
            raise WorkbenchError(f"backend {backend!r}: use 'auto', 'triton' or 'torch'")
        swapped = next((n for n, m in model.named_modules()
                        if isinstance(m, (SparseFFN, SparseDown, SparseMoE, SparsePredictedUp, SparsePlainFFN,
                                          FusedAway))), None)
        if swapped is not None:
            raise WorkbenchError(f"{swapped} is already swapped by an active accelerate handle: call that handle's "
                                 ".off() (or leave its `with` block) before accelerating the model again")
        self.model = model
        self.mode = mode
        self.backend = backend
        self.layout = layout or locate(model)
        sites = [s for s in self.layout.ffns if s.role == "dense" and (layers is None or s.layer in layers)]
        sites += [s for s in _moe_block_sites(model, self.layout) if layers is None or s.layer in layers]
        if not sites:
            raise WorkbenchError(f"no dense FFN to accelerate in {type(model).__name__} (layers={layers})")
        # every blocking reason is collected and reported at once (not one per try)
        reasons: list[str] = []
        p0 = sites[0].down.weight
        if p0.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"the model is {p0.dtype}; the sparse kernels run in bf16/fp16: load it with "
                           "dtype=torch.bfloat16 (or call model.to(torch.bfloat16))")
        if backend == "triton" and p0.device.type != "cuda":
            from workbench.kernels import _common

            if not _common.interpreting():
                reasons.append(f"backend='triton' needs the model on a CUDA device (it is on {p0.device}); "
                               "use backend='auto' or 'torch' on CPU")
        for s in sites:
            if is_moe_blocks(s.module) or s.kind == PLAIN:
                continue  # checked by SparseMoE / SparseDown
            for m in (s.gate, s.up, s.down):
                if m is None:
                    reasons.append(f"{s.name}: missing projection; accelerate needs gate, up and down")
                    break
                if m.weight.shape[-1] % 16 or m.weight.shape[0] % 16:
                    reasons.append(f"{s.name}: d_model={s.d_model}, d_ff={s.d_ff}: the kernels need multiples of 16")
                    break
        pred = None
        self.predictor_input = None
        moe = [s for s in sites if is_moe_blocks(s.module)]
        if moe and mode == "predictor":
            reasons.append(
                f"mode='predictor' on a routed MoE model ({moe[0].name} is a BlockFFN layer): its router already "
                "chooses the experts; use mode='exact' or 'chunk', which skip the inactive experts exactly")
        if mode == "predictor":
            if predictors is None:
                reasons.append("mode='predictor' needs predictors=PATH (saved by workbench.metrics."
                               "save_predictors) or a Predictors object")
            else:
                try:
                    pred, self.predictor_input = _load_predictor_tensors(predictors, sites, p0.device, p0.dtype,
                                                                         model)
                except WorkbenchError as exc:  # e.g. a PredictorError: another model's predictors
                    reasons.append(str(exc))
        if pred is None and mode == "predictor":
            pred = {s.name: None for s in sites}
            predictor_missing = True
        else:
            predictor_missing = False
        names = {id(m): n for n, m in model.named_modules()}
        uses: dict[int, int] = {}  # how many places of the model hold each module
        for _, m in model.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1

        def swap(s: FFNSite) -> list[tuple[str, nn.Module]]:
            if is_moe_blocks(s.module):
                return [(s.name, SparseMoE(s, s.module, mode, backend, decode_tokens))]
            if s.kind == PLAIN:
                if s.up is None or id(s.down) not in names or id(s.up) not in names:
                    raise WorkbenchError(f"{s.name}: missing projection; accelerate needs up and down")
                if (isinstance(s.up, nn.Linear) and s.act is not None
                        and all(uses.get(id(m)) == 1 for m in (s.up, s.act, s.down))):
                    # the whole FFN in one module at the up projection; act and down pass through
                    sp = SparsePlainFFN(s, mode, backend, None if pred is None else pred[s.name], dense_fraction,
                                        decode_tokens)
                    up = names[id(s.up)]
                    sp.companions = [(names[id(m)], FusedAway(names[id(m)], up, m), m) for m in (s.act, s.down)]
                    return [(up, sp)]
                # else the down projection is swapped: its input is the sparse activation
                out = [(names[id(s.down)], SparseDown(s, s.down, mode, backend, dense_fraction, decode_tokens))]
                if mode == "predictor":  # and the up projection, computed on the predicted rows only
                    out.insert(0, (names[id(s.up)], SparsePredictedUp(s, s.up, backend, pred[s.name])))
                return out
            return [(s.name, SparseFFN(s, s.module, mode, backend, None if pred is None else pred[s.name],
                                       dense_fraction, decode_tokens))]

        self.sparse = {}
        for s in sites:
            try:
                if (predictor_missing and s.kind == PLAIN) or (is_moe_blocks(s.module) and mode == "predictor"):
                    continue  # reported above (no predictors; predictor mode on a routed MoE layer)
                self.sparse.update(swap(s))
            except WorkbenchError as exc:
                reasons.append(str(exc))
            except Exception:
                if not reasons:
                    raise  # a bug, not a reason the user can act on
        if reasons:
            raise WorkbenchError(_blocking_message(model, reasons))
        for sp in self.sparse.values():
            sp.call_graphs.enabled = bool(call_graphs)
            if self.predictor_input == "residual" and getattr(sp, "predictor", None) is not None:
                # the predictor reads the residual stream entering the FFN block, as it was trained
                from workbench.metrics._data import pre_ffn_norm

                sp.block_input = BlockInput(pre_ffn_norm(model, sp.site), sp.site.name)
        # modules whose hooks hand the block input over: they must run eagerly (dynamo does not guard
        # on hooks, so a norm compiled before the hook was attached would never call it)
        all_names = {id(m): n for n, m in model.named_modules()}
        self.eager_modules = [all_names[id(sp.block_input.norm)] for sp in self.sparse.values()
                              if getattr(sp, "block_input", None) is not None]
        self.active = False

    # -- switching -----------------------------------------------------------------------------
    def on(self) -> Accelerator:
        if self.active:
            return self
        done = []
        try:
            for name, sp in self.sparse.items():
                sp.call_graphs.clear()  # captured with the previous layout's storage
                sp.relayout()
                done.append(name)
                for cname, stand_in, _ in getattr(sp, "companions", ()):
                    setattr(*_parent(self.model, cname), stand_in)
                parent, child = _parent(self.model, name)
                setattr(parent, child, sp)
                if getattr(sp, "block_input", None) is not None:
                    sp.block_input.attach()
        except BaseException:
            self._restore(done)
            raise
        self.active = True
        return self

    def off(self) -> Accelerator:
        """Put the original modules back (the same objects, weights in their original layout)."""
        self._restore(list(self.sparse))
        self.active = False
        return self

    def _restore(self, names) -> None:
        for name in names:
            sp = self.sparse[name]
            sp.call_graphs.clear()
            if getattr(sp, "block_input", None) is not None:
                sp.block_input.detach()
            parent, child = _parent(self.model, name)
            if getattr(parent, child) is sp:
                setattr(parent, child, sp.original[0])
            for cname, stand_in, original in getattr(sp, "companions", ()):
                cparent, cchild = _parent(self.model, cname)
                if getattr(cparent, cchild) is stand_in:
                    setattr(cparent, cchild, original)
            sp.restore_layout()

    def __enter__(self) -> Accelerator:
        return self.on()

    def __exit__(self, *exc) -> None:
        self.off()

    # -- measuring ---------------------------------------------------------------------------
    def measure(self, input_ids: torch.Tensor, *, steps: int | None = None, chunk: int | None = None,
                reps: int = 20, warmup: int = 3) -> Measurement:
        """Dense vs accelerated on the same model, in one run.

        The prompt `input_ids` [1, T] (or [T]) is fed the way decoding feeds it -- one token a step
        (exact, predictor) or `chunk` tokens a step (chunk mode, default 8) with a KV cache --
        and at each step the logits of both paths are compared: relative RMS
        ||acc - dense|| / ||dense|| of the model's logits, and top-1 agreement of the logits
        projected in float32 from the final hidden state (the model-dtype logits' agreement is
        reported too: their rounding makes near-ties flip on any perturbation). Realised sparsity (and, in predictor mode,
        the predictor's recall against the exact mask) is counted per layer on those steps.
        Timings: each FFN on the last step's hidden states, and one whole decode step, dense and
        accelerated, medians of `reps` after `warmup` (CUDA events on GPU, perf_counter on CPU);
        eager calls, so on a GPU the accelerated side replays its per-call graphs unless the
        handle was made with call_graphs=False.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise WorkbenchError(f"measure takes token ids (a LongTensor [1, T]), got {type(input_ids).__name__}"
                                 f"{'' if not isinstance(input_ids, torch.Tensor) else ' ' + str(input_ids.dtype)}: "
                                 "tokenize first, model.tokenizer(text, return_tensors='pt').input_ids")
        from workbench.errors import check_count

        check_count(reps, "reps", WorkbenchError)
        check_count(steps, "steps", WorkbenchError, none_ok=True)
        check_count(chunk, "chunk", WorkbenchError, none_ok=True)
        if not isinstance(warmup, int) or warmup < 0:
            raise WorkbenchError(f"measure: warmup must be a whole number >= 0, got {warmup!r}")
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if ids.shape[0] != 1:
            raise WorkbenchError("measure takes one sequence [1, T] (decoding is batch 1 here)")
        from workbench.data import check_token_ids

        check_token_ids(self.model, ids, WorkbenchError)
        dev = self.sparse[next(iter(self.sparse))].site.down.weight.device
        ids = ids.to(dev)
        step = chunk or (8 if self.mode == "chunk" else 1)
        n = ids.shape[1] if steps is None else min(ids.shape[1], steps * step)
        was_active = self.active
        try:
            self.off()
            dense_logits, ffn_inputs = self._run_steps(ids[:, :n], step, capture_inputs=True)
            self.on()
            for sp in self.sparse.values():
                sp.stats = {}
                sp.track = True
            try:
                acc_logits, _ = self._run_steps(ids[:, :n], step)
            finally:
                for sp in self.sparse.values():
                    sp.track = False
            layer_t = self._time_layers(ffn_inputs, reps, warmup)
            step_t = self._time_step(ids[:, :n], step, reps, warmup)
        finally:
            (self.on if was_active else self.off)()
        (acc_logits, acc32), (dense_logits, dense32) = acc_logits, dense_logits
        diff = (acc_logits.float() - dense_logits.float())
        rel_rms = float(diff.norm() / dense_logits.float().norm())
        top1_model = float((acc_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
        top1 = top1_model if acc32 is None else float((acc32.argmax(-1) == dense32.argmax(-1)).float().mean())
        rows = []
        for name, sp in self.sparse.items():
            st = {k: int(v) for k, v in sp.stats.items()}
            pairs = max(st.get("tokens", 0) * sp.site.d_ff, 1)
            row = {"layer": sp.site.layer, "name": name, "d_ff": sp.site.d_ff,
                   "true_sparsity": 1 - st.get("active", 0) / pairs,
                   "realised_sparsity": 1 - st.get("used", 0) / pairs, **layer_t[name]}
            if self.mode == "predictor" and not isinstance(sp, SparseDown):
                # (a plain FFN's down projection: its row holds the zeros reaching it, no recall)
                row["predictor_recall"] = st.get("hit", 0) / max(st.get("active", 0), 1)
            rows.append(row)
        layers = pd.DataFrame(rows)
        summary = {
            "mode": self.mode, "backend": self._backend_used(), "device": _device_name(dev),
            "reference_path": self._backend_used() == "torch",
            "tokens": int(n), "tokens_per_step": step, "logits_rel_rms": rel_rms, "top1_agreement": top1,
            "top1_agreement_model_dtype_logits": top1_model,
            **step_t,
        }
        if self.mode == "predictor":
            summary["predictor_recall"] = float(layers["predictor_recall"].mean())
        return Measurement(layers=layers, summary=summary)

    def _backend_used(self) -> str:
        from workbench.kernels import _common

        sp = next(iter(self.sparse.values()))
        try:
            return _common.pick_backend(sp.backend, sp.w_down_t)
        except Exception:  # noqa: BLE001
            return "torch"

    @torch.no_grad()
    def _run_steps(self, ids: torch.Tensor, step: int, capture_inputs: bool = False):
        inputs: dict[str, torch.Tensor] = {}
        hooks = []
        if capture_inputs:
            for name, sp in self.sparse.items():
                hooks.append(sp.original[0].register_forward_pre_hook(
                    lambda m, args, name=name: inputs.__setitem__(name, args[0].detach())))
        try:
            return step_logits(self.model, ids, step), inputs
        finally:
            for h in hooks:
                h.remove()

    def _timer(self, dev):
        from workbench._timing import timed_ms

        def run(fn, reps, warmup):
            return statistics.median(timed_ms(fn, reps, dev, warmup))
        return run

    @torch.no_grad()
    def _time_layers(self, ffn_inputs: dict[str, torch.Tensor], reps: int, warmup: int) -> dict[str, dict]:
        out = {}
        for name, sp in self.sparse.items():
            x = ffn_inputs[name]
            run = self._timer(x.device)
            dense = getattr(sp, "dense", sp.original[0])  # a SparsePlainFFN stands for up, act and down
            dense_ms = run(lambda: dense(x), reps, warmup)  # noqa: B023
            sparse_ms = run(lambda: sp(x), reps, warmup)  # noqa: B023
            out[name] = {"dense_ms": dense_ms, "ms": sparse_ms, "speedup": dense_ms / sparse_ms}
        return out

    @torch.no_grad()
    def _time_step(self, ids: torch.Tensor, step: int, reps: int, warmup: int) -> dict:
        from transformers import DynamicCache

        dev = ids.device
        run = self._timer(dev)
        ctx_ids, last = ids[:, :-step] if ids.shape[1] > step else ids[:, :1], ids[:, -step:]

        def timed(active: bool) -> float:
            (self.on if active else self.off)()
            cache = DynamicCache(config=self.model.config)
            self.model(input_ids=ctx_ids, **cache_kwargs(self.model, cache), use_cache=True)
            base_len = cache.get_seq_length()

            def one():
                self.model(input_ids=last, **cache_kwargs(self.model, cache), use_cache=True)
                _crop(cache, base_len)

            return run(one, reps, warmup)

        dense = timed(False)
        acc = timed(True)
        return {"step_dense_ms": dense, "step_ms": acc, "step_speedup": dense / acc,
                "note": "eager decode steps (launch-bound on GPU; see the CUDA-graph decode harness)"}


@torch.no_grad()
def step_logits(model: nn.Module, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed `ids` [1, T] `step` tokens a call with a KV cache (as decoding does); return every
    position's logits [T, V] in the model's dtype and, where the model has an output embedding,
    the same logits projected in float32 from the final hidden state (else None)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    outs, outs32 = [], []
    head = model.get_output_embeddings()
    for i in range(0, ids.shape[1], step):
        out = model(input_ids=ids[:, i:i + step], **cache_kwargs(model, cache), use_cache=True,
                    output_hidden_states=head is not None)
        outs.append(out.logits[0])
        if head is not None:
            # the same logits without the bf16 rounding of the output tensor, whose spacing
            # (0.06 at |logit| ~ 10) turns near-ties into coin flips
            outs32.append(out.hidden_states[-1][0].float() @ head.weight.float().t())
    return torch.cat(outs), (torch.cat(outs32) if outs32 else None)


@dataclass
class Measurement:
    layers: pd.DataFrame
    summary: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        s = self.summary
        return (f"Measurement(mode={s.get('mode')}, backend={s.get('backend')}, rel_rms={s.get('logits_rel_rms'):.2e}, "
                f"top1={s.get('top1_agreement'):.4f}, step {s.get('step_dense_ms'):.3f} -> {s.get('step_ms'):.3f} ms)")


def _crop(cache, length: int) -> None:
    """Cut a DynamicCache back to `length` tokens (transformers 5.x changed crop's argument)."""
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return
    try:
        cache.crop(-extra)  # newer 5.x: a negative count of tokens to remove
    except ValueError:
        cache.crop(length)  # older: the length to keep


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"


def accelerate(model: nn.Module, mode: str = "exact", backend: str = "auto", *, predictors=None,
               layers: list[int] | None = None, dense_fraction: float = 0.6, decode_tokens: int = 8,
               call_graphs: bool = True) -> Accelerator:
    """Swap the model's ReLU/FATReLU FFNs (gated, plain or BlockFFN MoE blocks) for kernel-backed ones;
    returns the handle, already on.

    See the module docstring for the modes. `handle.off()` (or leaving the `with` block) restores
    the original modules exactly. `call_graphs` (GPU, Triton): eager calls of up to 16 tokens replay
    each swapped module's kernels from a CUDA graph captured on first use (`ffn.CallGraphs`), since
    eager decoding is bound by the host's launch work; False launches the kernels directly.
    """
    return Accelerator(model, mode=mode, backend=backend, predictors=predictors, layers=layers,
                       dense_fraction=dense_fraction, decode_tokens=decode_tokens, call_graphs=call_graphs).on()
