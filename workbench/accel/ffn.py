"""SparseFFN / SparseDown / SparsePredictedUp / SparseMoE: FFN layers computed by the sparse
kernels, swapped in by accelerate().

SparseFFN replaces a gated ReLU/FATReLU FFN (Llama style); SparseDown replaces the down projection
of a plain (non-gated) ReLU FFN (OPT, GPT-2 or BERT style, biases allowed), whose input, the
activation, is already sparse: `kernels.sparse_down` reads only the rows of active neurons; in
predictor mode SparsePredictedUp replaces that FFN's up projection and computes only the rows a
Deja Vu predictor turns on; SparseMoE replaces a ReLU-routed MoE block layer (BlockFFN,
workbench.models.blockffn) and runs `kernels.moe_blocks`, which reads only the experts the router
turned on for the call's tokens. On a GPU their eager calls replay per-call CUDA graphs
(`CallGraphs`).

None holds weights of its own: gate and up are the original modules' weights ([d_ff, d_model],
rows = neurons, already the kernels' layout); the down projection's weight is re-laid out once,
in place, so that its storage is [d_ff, d_model] (W_down^T contiguous) while the original
nn.Linear keeps a transposed *view* of it: no second copy stays on the device.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch import nn

from workbench import kernels
from workbench.adapters import GATED, FFNSite
from workbench.errors import WorkbenchError

MODES = ("exact", "predictor", "chunk")

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_POOLS: dict[torch.device, tuple] = {}  # device -> (graph pool handle, the live graphs using it)


def _graph_pool(dev: torch.device) -> tuple:
    """The per-device memory pool the call graphs share, and the set of live graphs using it. A new
    handle once every graph of the previous one is gone: PyTorch releases a pool when its last graph
    is destroyed, and capturing into a released pool fails an internal assertion."""
    entry = _POOLS.get(dev)
    if entry is None or not len(entry[1]):
        entry = _POOLS[dev] = (torch.cuda.graph_pool_handle(), weakref.WeakSet())
    return entry
_GRAPHS_OFF = [0]  # > 0 inside `call_graphs_disabled`


def side_stream(dev: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up before a capture. A fresh stream per capture
    made cuBLAS allocate a workspace for each new stream (32 MiB on an H100, kept for the
    process's life): up to ~1 GiB across repeated decode_benchmark calls (KERNEL_NOTES v19 item 5)."""
    dev = torch.device(dev)
    if dev not in _SIDE_STREAMS:
        _SIDE_STREAMS[dev] = torch.cuda.Stream(dev)
    return _SIDE_STREAMS[dev]


@contextlib.contextmanager
def call_graphs_disabled():
    """Inside, the swapped modules launch their kernels directly instead of replaying their
    per-call graphs (the decode harness captures whole steps itself)."""
    _GRAPHS_OFF[0] += 1
    try:
        yield
    finally:
        _GRAPHS_OFF[0] -= 1


class CallGraphs:
    """A swapped module's kernel calls replayed from CUDA graphs when run eagerly on a GPU.

    Eager decoding is bound by the host: one FFN call of a 7B-shape Llama costs 256 us of Python
    and Triton launch work with the kernels launched directly against 149 us dense (H100 machine,
    KERNEL_NOTES v20), so flipping the switch made eager decode steps slower. Here each distinct
    call (route, input shape, dtype, device, weight storage; up to MAX_GRAPHS calls of up to
    MAX_TOKENS tokens) is run twice on a side stream (kernels compiled, workspaces allocated) and
    captured once; later calls copy their input into the captured one, replay and return a copy of
    the output (64 us of host time for that FFN). The graphs share one memory pool per device while
    any of them lives (replays run one at a time, in one stream's order) and are dropped whenever
    the handle is switched (the weights' storage changes with the layout). Skipped: on the CPU,
    with the torch backend, inside another capture (the decode harness's) and inside
    `call_graphs_disabled`. A failed capture warns once and the module launches directly from then
    on.
    """

    MAX_TOKENS = 16  # longer calls (prefills, long chunks) launch directly: each length would be a graph
    MAX_GRAPHS = 8  # per module; further distinct calls launch directly

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False
        self._triton: dict[torch.device, bool] = {}  # the backend the kernels pick on a device

    def clear(self) -> None:
        self.graphs.clear()

    def usable(self, x: torch.Tensor, backend: str | None) -> bool:
        if not (self.enabled and not self.failed and _GRAPHS_OFF[0] == 0 and x.is_cuda):
            return False
        if backend == "torch" or x.shape[0] > self.MAX_TOKENS or torch.cuda.is_current_stream_capturing():
            return False
        ok = self._triton.get(x.device)
        if ok is None:
            ok = self._triton[x.device] = kernels.pick_backend(backend, x) == "triton"
        return ok

    @torch.no_grad()
    def run(self, key: tuple, fn, x: torch.Tensor) -> torch.Tensor:
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.MAX_GRAPHS:
                return fn(x)
            # normal tensors even when the first call comes under torch.inference_mode(): later
            # calls outside it could not write into inference tensors
            with torch.inference_mode(False), torch.cuda.device(x.device):
                entry = self._capture(fn, x)
            if entry is None:
                return fn(x)
            self.graphs[key] = entry
        graph, sx, sy = entry
        with torch.cuda.device(x.device):  # a layer on another GPU than the current one (device_map)
            sx.copy_(x)
            graph.replay()
            return sy.clone()

    def _capture(self, fn, x: torch.Tensor):
        dev = x.device
        sx = x.clone(memory_format=torch.contiguous_format)
        try:
            s = side_stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn(sx)
            torch.cuda.current_stream(dev).wait_stream(s)
            pool, users = _graph_pool(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                sy = fn(sx)
            users.add(graph)
        except Exception as e:  # noqa: BLE001 - fall back to direct launches, loudly
            self.failed = True
            warnings.warn(f"CUDA graph capture of a sparse FFN call failed ({type(e).__name__}: {e}); "
                          "its kernels are launched directly from now on", RuntimeWarning, stacklevel=3)
            return None
        return graph, sx, sy


def _launch(module: nn.Module, route: str, x2: torch.Tensor, fn, *weights: torch.Tensor) -> torch.Tensor:
    """fn(x2) through the module's per-call graphs where they apply, else directly."""
    g: CallGraphs = module.call_graphs
    if not g.usable(x2, module.backend):
        return fn(x2)
    key = (route, tuple(x2.shape), x2.dtype, x2.device, *(w.data_ptr() for w in weights))
    return g.run(key, fn, x2)


class BlockInput:
    """The residual stream entering one FFN block, for predictors trained on it (the ProSparse
    recipe, `workbench.metrics.train_predictors` input="residual"): a forward pre-hook on the norm
    before the FFN keeps that norm's input while the handle is on; the swapped module reads the
    rows of its own call from it (the norm runs right before the FFN, on the same tokens)."""

    def __init__(self, norm: nn.Module, name: str):
        self.norm, self.name = norm, name
        self.x: torch.Tensor | None = None
        self.handle = None

    def attach(self) -> None:
        if self.handle is None:
            self.handle = self.norm.register_forward_pre_hook(self._keep)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.x = None

    def _keep(self, module, args) -> None:
        self.x = args[0]

    def rows(self, x2: torch.Tensor) -> torch.Tensor:
        """The kept input as [T, d_model] for an FFN call on x2 [T, d_model]."""
        r = self.x
        if r is None or r.numel() // r.shape[-1] != x2.shape[0]:
            got = "nothing" if r is None else f"{r.numel() // r.shape[-1]} rows"
            raise WorkbenchError(
                f"{self.name}: the predictor reads the residual stream entering the FFN block, but the norm before "
                f"the FFN saw {got} for this call of {x2.shape[0]} tokens (was the FFN called outside the model's "
                "forward?); call the model itself, or use predictors trained with input='ffn_input'")
        return r.reshape(-1, r.shape[-1])


def _pred_rows(m: nn.Module, x2: torch.Tensor) -> torch.Tensor | None:
    """The predictor's input rows for this call: the block input where the module has one, else None (x2)."""
    src = getattr(m, "block_input", None)
    return None if src is None else src.rows(x2)


def _launch_pred(module: nn.Module, route: str, x2: torch.Tensor, xp: torch.Tensor | None, call, *weights):
    """`call(x2, xp)` through `_launch`; with a separate predictor input the two travel as one
    tensor [T, 2 d_model] so that the per-call graphs keep one static input."""
    if xp is None:
        return _launch(module, route, x2, lambda x_: call(x_, None), *weights)
    d = x2.shape[1]
    xc = torch.cat([x2, xp.to(x2.dtype)], dim=1)
    return _launch(module, route + "+block_input", xc,
                   lambda c: call(c[:, :d].contiguous(), c[:, d:].contiguous()), *weights)


def _counters(stats: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The module's device-side counters (tokens, active, used, hit), created zero on first use."""
    if not stats:
        stats.update({k: torch.zeros((), dtype=torch.int64, device=device) for k in ("tokens", "active", "used", "hit")})
    return stats


def _init_ffn_state(m: nn.Module, site: FFNSite, mode: str, backend: str | None, predictor, dense_fraction: float,
                    decode_tokens: int, dtype: torch.dtype) -> None:
    """The settings and counters SparseFFN and SparsePlainFFN share."""
    m.mode = mode
    m.backend = None if backend == "auto" else backend
    m.activation = "fatrelu" if site.activation == "fatrelu" else "relu"
    # the dense FATReLU compares model-dtype values with a Python float, which torch rounds to the
    # model dtype first: use that same threshold so the masks agree on every value
    m.threshold = float(torch.tensor(float(site.threshold or 0.0), dtype=dtype))
    m.dense_fraction = dense_fraction
    m.decode_tokens = decode_tokens
    m.predictor = predictor
    m.block_input = None  # a BlockInput where the predictor reads the residual stream (set by accelerate)
    m.track = False
    m.stats = {}
    m.call_graphs = CallGraphs()


class _DownRelayout:
    """Down weight stored [d_ff, d_model] in place while swapped in (no lasting second copy)."""

    site: FFNSite

    @property
    def w_down_t(self) -> torch.Tensor:
        return self.site.down.weight.t()  # contiguous after relayout()

    def relayout(self) -> None:
        """Store W_down as [d_ff, d_model] in place (one layer at a time: no lasting copy)."""
        w = self.site.down.weight
        if not w.t().is_contiguous():
            w.data = w.data.t().contiguous().t()

    def restore_layout(self) -> None:
        w = self.site.down.weight
        if not w.is_contiguous():
            w.data = w.data.contiguous()


class _PlainDownLayout:
    """A plain FFN's down projection as the kernels read it, [d_ff, d_model]: an nn.Linear's weight
    re-laid out in place while swapped in (as _DownRelayout), transformers' Conv1D's as it is."""

    down_module: nn.Module
    conv1d: bool

    @property
    def w_down_t(self) -> torch.Tensor:
        w = self.down_module.weight
        return w if self.conv1d else w.t()

    def relayout(self) -> None:
        if not self.conv1d:
            w = self.down_module.weight
            if not w.t().is_contiguous():
                w.data = w.data.t().contiguous().t()

    def restore_layout(self) -> None:
        if not self.conv1d:
            w = self.down_module.weight
            if not w.is_contiguous():
                w.data = w.data.contiguous()


class SparseDown(_PlainDownLayout, nn.Module):
    """Drop-in replacement of the down projection of a plain ReLU FFN (down(act(up(x)))); see
    `accelerate`.

    The activation `a` it receives has exact zeros, so the input-sparse kernel
    (`kernels.sparse_down`, P1) reads only the down rows of active neurons; the up projection and
    the activation stay the model's own (dense). Calls of up to `decode_tokens` tokens (exact
    mode) or 64 (chunk mode: the union of the chunk's active neurons is read once, with a dense
    fallback past `dense_fraction`) take the kernel, longer ones the original module. A bias is
    added by the kernel in fp32 before its one rounding (as cuBLAS's epilogue does). Works for
    nn.Linear (weight re-laid out in place, as in SparseFFN) and transformers' Conv1D (GPT-2: its
    weight is [d_ff, d_model] already).
    """

    _wb_accelerated = True  # wb.capture refuses a model holding one (the activations are not where it looks)

    def __init__(self, site: FFNSite, original: nn.Module, mode: str, backend: str | None,
                 dense_fraction: float = 0.6, decode_tokens: int = 8):
        super().__init__()
        if mode not in MODES:
            raise WorkbenchError(f"mode {mode!r}: use one of {MODES}")
        if site.activation not in ("relu", "fatrelu"):
            raise WorkbenchError(
                f"{site.name}: activation {site.activation!r} has no exact zeros for the kernels to skip; "
                "accelerate needs ReLU or FATReLU FFNs (e.g. OPT, or a ReLU-fied model)")
        w = original.weight
        self.conv1d = type(original).__name__ == "Conv1D"  # transformers' Conv1D: y = x @ W + b, W [in, out]
        if not self.conv1d and not isinstance(original, nn.Linear):
            raise WorkbenchError(f"{site.name}: the down projection is a {type(original).__name__}; "
                                 "accelerate takes nn.Linear or transformers' Conv1D")
        d_ff, d_model = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
        if d_ff % 16 or d_model % 16:
            raise WorkbenchError(f"{site.name}: d_model={d_model}, d_ff={d_ff}: the kernels need multiples of 16")
        self.site = site
        self.down_module = original
        self.original = [original]
        self.mode = mode
        self.backend = None if backend == "auto" else backend
        self.dense_fraction = dense_fraction
        self.decode_tokens = decode_tokens
        self.d_ff = d_ff
        self.predictor = None
        self.track = False
        self.stats: dict[str, torch.Tensor] = {}
        self.call_graphs = CallGraphs()

    def _limit(self) -> int:
        return self.decode_tokens if self.mode == "exact" else 64

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        a2 = a.reshape(-1, shape[-1])
        if self.track:
            self._track(a2)
        if a2.shape[0] > self._limit():
            return self.down_module(a)
        cfg = {"dense_fraction": self.dense_fraction} if self.mode != "exact" and a2.shape[0] > 1 else None
        w, b = self.w_down_t, getattr(self.down_module, "bias", None)

        def call(a_):
            return kernels.sparse_down(a_, w, bias=b, backend=self.backend, config=cfg)

        y = _launch(self, "down", a2, call, w)
        return y.reshape(*shape[:-1], y.shape[-1])

    @torch.no_grad()
    def _track(self, a2: torch.Tensor) -> None:
        """Active neurons and the down rows the kernel reads (the union, for a chunk)."""
        on = a2 != 0
        st = _counters(self.stats, a2.device)
        n = a2.shape[0]
        st["tokens"] += n
        st["active"] += on.sum()
        st["hit"] += on.sum()
        if n == 1:
            st["used"] += on.sum()
        elif n <= self._limit():
            st["used"] += on.any(0).sum() * n  # the union is read for every token of the call
        else:
            st["used"] += n * self.d_ff  # dense path

    def extra_repr(self) -> str:
        return f"{self.site.name} (down projection), mode={self.mode}, activation={self.site.activation}"


class SparsePredictedUp(nn.Module):
    """Predictor mode on a plain ReLU FFN: drop-in replacement of its up projection (OPT's fc1)
    that computes only the rows a Deja Vu predictor turns on; see `accelerate`.

    Output: the pre-activation x W_up^T + b on predicted rows and 0 elsewhere, so that the model's
    own activation (ReLU/FATReLU: 0 stays 0) and the down projection swapped for `SparseDown`
    (whose kernel skips the zeros) follow. Calls of up to 64 tokens: the predictor's two layers
    through `kernels.gemv`, then `kernels.gated_up` with a 0/1 gate (only predicted up rows are
    read), the bias added on predicted rows; longer calls take the same function in torch.
    """

    _wb_accelerated = True  # wb.capture refuses a model holding one (the activations are not where it looks)

    def __init__(self, site: FFNSite, original: nn.Module, backend: str | None, predictor: dict[str, torch.Tensor]):
        super().__init__()
        if not isinstance(original, nn.Linear):
            raise WorkbenchError(f"{site.name}: predictor mode on a plain FFN needs an nn.Linear up projection; "
                                 f"this one is a {type(original).__name__} (use mode='exact' or 'chunk')")
        w = original.weight
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise WorkbenchError(f"{site.name}: d_model={w.shape[1]}, d_ff={w.shape[0]}: the kernels need multiples of 16")
        if predictor["w2"].shape[0] != w.shape[0] or predictor["w1"].shape[1] != w.shape[1]:
            raise WorkbenchError(
                f"{site.name}: the predictor maps {predictor['w1'].shape[1]} -> {predictor['w2'].shape[0]} but the up "
                f"projection is {w.shape[1]} -> {w.shape[0]}: train the predictors on this model")
        self.site = site
        self.up_module = original
        self.original = [original]
        self.mode = "predictor"
        self.backend = None if backend == "auto" else backend
        self.predictor = predictor
        self.block_input = None  # a BlockInput where the predictor reads the residual stream (set by accelerate)
        self.threshold = float(site.threshold or 0.0)
        self.track = False
        self.stats: dict[str, torch.Tensor] = {}
        self.call_graphs = CallGraphs()

    @property
    def w_down_t(self) -> torch.Tensor:  # the tensor the backend is picked by (as for the other modules)
        return self.up_module.weight

    def relayout(self) -> None:  # the up weight [d_ff, d_model] is already the kernels' row layout
        pass

    def restore_layout(self) -> None:
        pass

    def _call(self, x2: torch.Tensor, backend: str | None, xp: torch.Tensor | None = None) -> torch.Tensor:
        p, w, b = self.predictor, self.up_module.weight, self.up_module.bias
        h = kernels.gemv(x2 if xp is None else xp, p["w1"], p["b1"], relu=True, backend=backend)
        gate = (kernels.gemv(h, p["w2"], p["b2"], backend=backend) > 0).to(x2.dtype)
        u = kernels.gated_up(x2, gate, w, activation="relu", backend=backend)
        return u if b is None else torch.addcmul(u, gate, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.track:
            self._track(x2)
        xp = _pred_rows(self, x2)
        if x2.shape[0] > 64:
            y = torch.cat([self._call(x2[i:i + 64], "torch", None if xp is None else xp[i:i + 64])
                           for i in range(0, x2.shape[0], 64)])
        else:
            p = self.predictor
            y = _launch_pred(self, "pred_up", x2, xp, lambda x_, r: self._call(x_, self.backend, r),
                             self.up_module.weight, p["w1"], p["w2"])
        return y.reshape(*shape[:-1], y.shape[-1])

    @torch.no_grad()
    def _track(self, x2: torch.Tensor) -> None:
        """True active neurons (act(up(x)) != 0), predicted ones, and the predictor's hits."""
        true = self.up_module(x2).float() > self.threshold
        p = self.predictor
        xp = _pred_rows(self, x2)
        pred = kernels.predictor_logits((x2 if xp is None else xp).float(), p["w1"].float(), p["w2"].float(),
                                        p["b1"].float(), p["b2"].float()) > 0
        st = _counters(self.stats, x2.device)
        st["tokens"] += x2.shape[0]
        st["active"] += true.sum()
        st["used"] += pred.sum()
        st["hit"] += (pred & true).sum()

    def extra_repr(self) -> str:
        return f"{self.site.name} (up projection), mode=predictor, width={self.predictor['w1'].shape[0]}"


class SparsePlainFFN(_PlainDownLayout, nn.Module):
    """A whole plain ReLU FFN (OPT's fc1 -> ReLU -> fc2, nn.Linear up projection, biases allowed)
    computed by the kernels from one module; see `accelerate`.

    It is installed in place of the up projection; the activation and the down projection are
    replaced by `FusedAway` pass-throughs while the handle is on (`companions`), so the model's
    own forward (up, act, down in sequence) hands this module's output through unchanged. One
    module per FFN means one per-call graph replay per FFN in eager decoding (instead of the
    model's three module calls) and lets predictor mode fuse its second layer, the up rows and the
    down rows into one launch:

    - exact: the model's own up projection and activation (dense), then `kernels.sparse_down`
      with the down bias, for calls of up to `decode_tokens` tokens; longer calls run the
      original modules.
    - chunk: the same for 2..64 tokens, the down rows read over the union of the chunk's active
      neurons (dense fallback past `dense_fraction`).
    - predictor: `kernels.plain_ffn_predicted` (Deja Vu): up and down rows only where the
      predictor's logit is > 0; more than 64 tokens the same function in torch, 64 a call.
    """

    _wb_accelerated = True  # wb.capture refuses a model holding one (the activations are not where it looks)

    def __init__(self, site: FFNSite, mode: str, backend: str | None, predictor: dict[str, torch.Tensor] | None = None,
                 dense_fraction: float = 0.6, decode_tokens: int = 8):
        super().__init__()
        if mode not in MODES:
            raise WorkbenchError(f"mode {mode!r}: use one of {MODES}")
        if site.activation not in ("relu", "fatrelu"):
            raise WorkbenchError(
                f"{site.name}: activation {site.activation!r} has no exact zeros for the kernels to skip; "
                "accelerate needs ReLU or FATReLU FFNs (e.g. OPT, or a ReLU-fied model)")
        if not isinstance(site.up, nn.Linear):
            raise WorkbenchError(f"{site.name}: SparsePlainFFN needs an nn.Linear up projection, not "
                                 f"{type(site.up).__name__}")
        self.conv1d = type(site.down).__name__ == "Conv1D"
        if not self.conv1d and not isinstance(site.down, nn.Linear):
            raise WorkbenchError(f"{site.name}: the down projection is a {type(site.down).__name__}; "
                                 "accelerate takes nn.Linear or transformers' Conv1D")
        d_ff, d_model = site.up.weight.shape
        if d_ff % 16 or d_model % 16:
            raise WorkbenchError(f"{site.name}: d_model={d_model}, d_ff={d_ff}: the kernels need multiples of 16")
        if predictor is not None and (predictor["w2"].shape[0] != d_ff or predictor["w1"].shape[1] != d_model):
            raise WorkbenchError(
                f"{site.name}: the predictor maps {predictor['w1'].shape[1]} -> {predictor['w2'].shape[0]} but the "
                f"FFN is {d_model} -> {d_ff}: train the predictors on this model")
        self.site = site
        self.up_module, self.act_module, self.down_module = site.up, site.act, site.down
        self.original = [site.up]  # what this module replaces (a list: not a child)
        self.companions: list[tuple[str, nn.Module, nn.Module]] = []  # (name, pass-through, original), set by accelerate
        _init_ffn_state(self, site, mode, backend, predictor, dense_fraction, decode_tokens, site.up.weight.dtype)
        self.d_ff = d_ff

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN through the model's own modules (what this module computes sparsely)."""
        return self.down_module(self.act_module(self.up_module(x)))

    def _route(self, n: int) -> str:
        if self.mode == "predictor":
            return "predicted" if n <= 64 else "predicted_ref"
        return "sparse" if n <= (self.decode_tokens if self.mode == "exact" else 64) else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        route = self._route(x2.shape[0])
        if self.track:
            self._track(x2, route)
        if route == "dense":
            return self.dense(x)
        xp = _pred_rows(self, x2) if self.predictor is not None else None
        if route == "predicted_ref":  # more than 64 tokens: the reference, 64 tokens a call
            y = torch.cat([self._call(x2[i:i + 64], "torch", None if xp is None else xp[i:i + 64])
                           for i in range(0, x2.shape[0], 64)])
        else:
            ws = [self.up_module.weight, self.w_down_t]
            if self.predictor is not None:
                ws += [self.predictor["w1"], self.predictor["w2"]]
            y = _launch_pred(self, route, x2, xp, lambda x_, r: self._call(x_, self.backend, r), *ws)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _call(self, x2: torch.Tensor, backend: str | None, xp: torch.Tensor | None = None) -> torch.Tensor:
        bu, bd = self.up_module.bias, getattr(self.down_module, "bias", None)
        if self.predictor is not None:
            p = self.predictor
            return kernels.plain_ffn_predicted(
                x2, self.up_module.weight, self.w_down_t, p["w1"], p["w2"], b_up=bu, b_down=bd, b_pred1=p["b1"],
                b_pred2=p["b2"], activation=self.activation, threshold=self.threshold, backend=backend, x_pred=xp)
        # the model's own up projection and activation (cuBLAS: faster than the Triton GEMV at
        # OPT-6.7B's 16384x4096, 50.2 against 54.1 us, KERNEL_NOTES v21), so `a` is the dense model's
        a = self.act_module(self.up_module(x2))
        cfg = {"dense_fraction": self.dense_fraction} if self.mode == "chunk" and x2.shape[0] > 1 else None
        return kernels.sparse_down(a, self.w_down_t, bias=bd, backend=backend, config=cfg)

    @torch.no_grad()
    def _track(self, x2: torch.Tensor, route: str) -> None:
        """True active neurons (act(up(x)) != 0), the up/down rows read, and predictor hits."""
        true = self.up_module(x2).float() > self.threshold
        st = _counters(self.stats, x2.device)
        n = x2.shape[0]
        st["tokens"] += n
        st["active"] += true.sum()
        if self.predictor is not None:
            p = self.predictor
            xp = _pred_rows(self, x2)
            pred = kernels.predictor_logits((x2 if xp is None else xp).float(), p["w1"].float(), p["w2"].float(),
                                            p["b1"].float(), p["b2"].float()) > 0
            st["used"] += pred.sum()
            st["hit"] += (pred & true).sum()
            return
        st["hit"] += true.sum()
        if route == "dense":
            st["used"] += n * self.d_ff
        elif n == 1:
            st["used"] += true.sum()
        else:
            st["used"] += true.any(0).sum() * n  # sparse_down reads the union for every token of the call

    def extra_repr(self) -> str:
        extra = f", width={self.predictor['w1'].shape[0]}" if self.predictor is not None else ""
        return (f"{self.site.name} (up, activation and down), mode={self.mode}, activation={self.activation}, "
                f"threshold={self.threshold}{extra}")


class FusedAway(nn.Module):
    """Stands in for a module whose work a SparsePlainFFN does (the activation, the down
    projection) while the handle is on: hands its input through."""

    _wb_accelerated = True  # wb.capture refuses a model holding one (the activations are not where it looks)

    def __init__(self, name: str, by: str, original: nn.Module):
        super().__init__()
        self.name, self.by = name, by
        self.original = [original]  # the module it stands in for (a list: not a child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.name}: computed by {self.by}"


class SparseFFN(_DownRelayout, nn.Module):
    """Drop-in replacement of one gated FFN module; see `accelerate`."""

    _wb_accelerated = True  # wb.capture refuses a model holding one (the activations are not where it looks)

    def __init__(self, site: FFNSite, original: nn.Module, mode: str, backend: str | None,
                 predictor: dict[str, torch.Tensor] | None = None, dense_fraction: float = 0.6,
                 decode_tokens: int = 8):
        super().__init__()
        if mode not in MODES:
            raise WorkbenchError(f"mode {mode!r}: use one of {MODES}")
        if site.kind != GATED or site.fused_gate_up:
            raise WorkbenchError(
                f"{site.name}: accelerate handles gated FFNs with separate gate/up/down projections "
                f"(Llama, Mistral, Qwen, Gemma style); this one is {site.kind}"
                f"{' with a fused gate_up projection' if site.fused_gate_up else ''}")
        if site.activation not in ("relu", "fatrelu"):
            raise WorkbenchError(
                f"{site.name}: activation {site.activation!r} has no exact zeros for the kernels to skip; "
                "accelerate needs ReLU or FATReLU FFNs (ProSparse-style models, e.g. zoo:relu-llama)")
        for m in (site.gate, site.up, site.down):
            if getattr(m, "bias", None) is not None:
                raise WorkbenchError(f"{site.name}: projections with a bias are not supported by the kernels")
        self.site = site
        self.original = [original]  # a list keeps it out of this module's children / state_dict
        _init_ffn_state(self, site, mode, backend, predictor, dense_fraction, decode_tokens, site.down.weight.dtype)

    # weights, always the live ones of the original modules
    @property
    def w_gate(self) -> torch.Tensor:
        return self.site.gate.weight

    @property
    def w_up(self) -> torch.Tensor:
        return self.site.up.weight

    def _route(self, n: int) -> str:
        if self.mode == "exact":
            return "sparse" if n <= self.decode_tokens else "dense"
        if self.mode == "chunk":
            return "sparse" if n == 1 else ("chunk" if n <= 64 else "dense")
        return "predicted" if n <= 64 else "predicted_ref"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        route = self._route(x2.shape[0])
        if self.track:
            self._track(x2)
        if route == "dense":
            return self.original[0](x)
        xp = _pred_rows(self, x2) if route.startswith("predicted") else None
        if route == "sparse" and x2.shape[0] > 64:  # decode_tokens > 64 (e.g. a whole-sequence check): 64 a call
            y = torch.cat([self._call(x2[i:i + 64], "sparse", self.backend) for i in range(0, x2.shape[0], 64)])
        elif route == "predicted_ref":  # more than 64 tokens: the reference, 64 tokens a call
            y = torch.cat([self._call(x2[i:i + 64], "predicted", "torch", None if xp is None else xp[i:i + 64])
                           for i in range(0, x2.shape[0], 64)])
        else:
            y = _launch_pred(self, route, x2, xp, lambda x_, r: self._call(x_, route, self.backend, r), self.w_gate,
                             self.w_up, self.w_down_t)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _call(self, x2: torch.Tensor, route: str, backend: str | None, xp: torch.Tensor | None = None) -> torch.Tensor:
        if route == "sparse":
            return kernels.sparse_ffn(x2, self.w_gate, self.w_up, self.w_down_t, activation=self.activation,
                                      threshold=self.threshold, backend=backend)
        if route == "chunk":
            return kernels.chunk_ffn(x2, self.w_gate, self.w_up, self.w_down_t, activation=self.activation,
                                     threshold=self.threshold, dense_fraction=self.dense_fraction, backend=backend)
        p = self.predictor
        return kernels.sparse_ffn_predicted(
            x2, self.w_gate, self.w_up, self.w_down_t, p["w1"], p["w2"], b_pred1=p["b1"], b_pred2=p["b2"],
            activation=self.activation, threshold=self.threshold, backend=backend, x_pred=xp)

    @torch.no_grad()
    def _track(self, x2: torch.Tensor) -> None:
        """Realised sparsity (and predictor recall) of this call, accumulated on the device."""
        g = torch.nn.functional.linear(x2, self.w_gate).float()
        true = g > self.threshold
        st = _counters(self.stats, x2.device)
        st["tokens"] += x2.shape[0]
        st["active"] += true.sum()
        if self.mode == "predictor":
            p = self.predictor
            xp = _pred_rows(self, x2)
            logits = kernels.predictor_logits((x2 if xp is None else xp).float(), p["w1"].float(), p["w2"].float(),
                                              p["b1"].float(), p["b2"].float())
            pred = logits > 0
            st["used"] += pred.sum()
            st["hit"] += (pred & true).sum()
        elif self.mode == "chunk" and 1 < x2.shape[0] <= 64:
            # the chunk kernel reads every row in the union of the chunk's active sets
            st["used"] += true.any(0).sum() * x2.shape[0]
            st["hit"] += true.sum()
        else:
            st["used"] += true.sum()
            st["hit"] += true.sum()

    def extra_repr(self) -> str:
        extra = ""
        if self.predictor is not None:
            extra = f", predictor width={self.predictor['w1'].shape[0]} on the " + (
                "residual stream entering the block" if self.block_input is not None else "FFN input")
        return f"{self.site.name}, mode={self.mode}, activation={self.activation}, threshold={self.threshold}{extra}"


def is_moe_blocks(module: nn.Module) -> bool:
    """A BlockFFN-style layer: ReLU+RMSNorm router and stacked non-gated experts."""
    r = getattr(module, "router", None)
    return (r is not None and hasattr(r, "proj") and hasattr(r, "norm") and hasattr(module, "n_experts")
            and hasattr(module, "expert_size") and hasattr(module, "up_proj") and hasattr(module, "down_proj"))


class SparseMoE(_DownRelayout, nn.Module):
    """Drop-in replacement of one BlockFFN layer (ReLU-routed MoE blocks); see `accelerate`.

    Calls of up to `decode_tokens` tokens (exact mode) or 64 tokens (chunk mode) run
    `kernels.moe_blocks`: the union of the active experts over the call's tokens is read once;
    longer calls (prefill) run the original module. The router's scores decide which experts are
    active, so exact and chunk modes compute the dense layer's function.
    """

    _wb_accelerated = True  # wb.capture refuses a model holding one (the activations are not where it looks)

    def __init__(self, site: FFNSite, original: nn.Module, mode: str, backend: str | None,
                 decode_tokens: int = 8):
        super().__init__()
        if mode not in ("exact", "chunk"):
            raise WorkbenchError(
                f"{site.name}: mode {mode!r} on a routed MoE layer: the router already decides which experts "
                "run, so there is no predictor to add; use mode='exact' (decode) or 'chunk' (2..64 tokens)")
        if getattr(original, "expert_act", "silu") != "silu":
            raise WorkbenchError(
                f"{site.name}: expert activation {original.expert_act!r} (DECO's NormSiLU) normalises across all "
                "experts' units, so inactive experts cannot be skipped exactly; the MoE kernel takes "
                "expert_act='silu' (BlockFFN)")
        if getattr(original.router, "scale", None) is not None:
            raise WorkbenchError(f"{site.name}: a per-expert router scale (router_scale=True) is not supported "
                                 "by the MoE kernel")
        for m in (original.router.proj, original.up_proj, original.down_proj):
            if getattr(m, "bias", None) is not None:
                raise WorkbenchError(f"{site.name}: projections with a bias are not supported by the kernels")
        self.site = site
        self.original = [original]
        self.mode = mode
        self.backend = None if backend == "auto" else backend
        self.decode_tokens = decode_tokens
        self.n_experts = int(original.n_experts)
        self.expert_size = int(original.expert_size)
        self.eps = float(original.router.norm.variance_epsilon)
        self.predictor = None
        self.track = False
        self.stats: dict[str, torch.Tensor] = {}
        self.call_graphs = CallGraphs()

    @property
    def w_up(self) -> torch.Tensor:
        return self.original[0].up_proj.weight

    def _limit(self) -> int:
        return self.decode_tokens if self.mode == "exact" else 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.track:
            self._track(x2)
        if x2.shape[0] > self._limit():
            return self.original[0](x)
        r = self.original[0].router
        w_r, w_n, w_up, w_down_t = r.proj.weight, r.norm.weight, self.w_up, self.w_down_t

        def call(x_):
            return kernels.moe_blocks(x_, w_r, w_n, w_up, w_down_t, eps=self.eps, backend=self.backend)

        y = _launch(self, "moe", x2, call, w_r, w_n, w_up, w_down_t)
        return y.reshape(*shape[:-1], y.shape[-1])

    @torch.no_grad()
    def _track(self, x2: torch.Tensor) -> None:
        """Active neurons (expert_size per active expert) and the rows the kernel reads."""
        r = self.original[0].router
        on = kernels.router_scores(x2, r.proj.weight, r.norm.weight, eps=self.eps) != 0  # [T, E]
        st = _counters(self.stats, x2.device)
        n = x2.shape[0]
        st["tokens"] += n
        st["active"] += on.sum() * self.expert_size
        st["hit"] += on.sum() * self.expert_size
        if n <= self._limit():
            st["used"] += on.any(0).sum() * self.expert_size * n  # the union is read for every token
        else:
            st["used"] += n * self.n_experts * self.expert_size  # dense path

    def extra_repr(self) -> str:
        return f"{self.site.name}, mode={self.mode}, experts={self.n_experts}x{self.expert_size}"
