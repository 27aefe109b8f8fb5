"""Decode harness: greedy batch-1 decoding with a static KV cache, dense vs accelerated, one run.

    r = wb.decode_benchmark(model, prompt_ids, new_tokens=64, handle=wb.accelerate(model))
    r["summary"]      # tokens/s dense and accelerated, speedup, whether the tokens agree

On CUDA each decode step is one CUDA graph replay (transformers' StaticCache, static input_ids and
cache_position buffers; the greedy argmax and the position increment are inside the graph), so
the per-token time is what the GPU spends, not the Python/launch overhead that dominates eager
decoding (8 eager Llama-7B layers take ~10 ms a token on an H100 whatever the kernels do).
Dense and accelerated are timed alternately on the same model, `reps` times each, and reported
as medians. The accelerated side is the model with `handle.on()`; the dense side with
`handle.off()` (the original modules, weights in their original layout). Switching re-lays the
down weights out (their storage moves), so each side's graph is captured afresh after the switch
and a warm-up (the sparse kernels allocate their workspaces on first call, never inside capture).

Without CUDA (or with cuda_graphs=False) the same loop runs eagerly; on CPU it is the torch
reference path, and the result says so (`reference: True`): its timings are not the kernels'.

compile_non_ffn=True: everything of the model except the FFNs -- each block's children other than
its FFN (Llama: self_attn, input_layernorm, post_attention_layernorm) and the children of the
module holding the block list, other than that list and the embeddings (Llama: the final norm,
rotary_emb; lm_head is left as it is: one GEMV, nothing to fuse) -- runs through
torch.compile for the whole call, on both sides alike (the FFN modules, dense or accelerated, stay
as they are), so the ratio compares FFNs inside a step whose other part is not dominated by small
eager kernels. See `compiled_non_ffn` for how (nothing of the model changes permanently).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
import types
import weakref

import torch
from torch import nn

from workbench._compat import cache_kwargs
from workbench.accel.ffn import call_graphs_disabled, side_stream
from workbench.errors import WorkbenchError

_MISSING = object()
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled modules, inside a block
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes with graphs of their own


def _call_module(module: nn.Module, *args, **kwargs):
    """What a compiled non-FFN module runs: its own (uncompiled) call, traced by dynamo."""
    return module._call_impl(*args, **kwargs)


def non_ffn_modules(model: nn.Module, layout=None, keep_out: list[str] | tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The modules `compiled_non_ffn` compiles, by name: each block's direct children except the
    one that is (or holds) its FFN or router, and the direct children of the module holding the
    block list except that list and the embeddings (Llama: model.layers.i.{self_attn,
    input_layernorm, post_attention_layernorm}, model.norm, model.rotary_emb).

    For a plain (non-gated) FFN the down projection is kept out (with no handle, the up projection
    and the activation compile with the rest; OPT:
    model.decoder.layers.i.{self_attn, self_attn_layer_norm, fc1, activation_fn, final_layer_norm};
    GPT-2: transformer.h.i.{ln_1, attn, ln_2} and transformer.h.i.mlp.{c_fc, act, dropout}).
    `keep_out`: more module names to leave alone (decode_benchmark passes every module its handle
    swaps, e.g. OPT's SparsePlainFFN at fc1). A `FusedAway` pass-through (an accelerated OPT's
    activation_fn and fc2) counts as the module it stands in for, so the same modules compile
    whether the handle is on or off."""
    from workbench.accel.ffn import FusedAway
    from workbench.adapters import PLAIN, locate

    def current(mod: nn.Module) -> nn.Module:
        return mod.original[0] if isinstance(mod, FusedAway) else mod

    layout = layout or locate(model)
    names = {id(current(m)): n for n, m in model.named_modules()}
    sites = [names.get(id(s.down), s.name) if s.kind == PLAIN else s.name for s in layout.ffns]
    keep_out = sites + [r.name for r in layout.routers] + [n for n in keep_out if n not in sites]
    if not keep_out:
        raise WorkbenchError(f"no FFN found in {type(model).__name__}: nothing to keep out of the compile")

    def holds_ffn(name: str) -> bool:
        return any(n == name or n.startswith(name + ".") for n in keep_out)

    def block_of(name: str) -> str:
        """The nearest ancestor that is an element of a ModuleList (a layer)."""
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
                return ".".join(parts[:i + 1])
        raise WorkbenchError(f"{name}: compile_non_ffn needs FFNs inside the model's list of layers")

    blocks: list[str] = []
    for name in sites:
        block = block_of(name)
        if block == name:
            raise WorkbenchError(f"{name}: compile_non_ffn needs FFNs that are children of their blocks")
        if block not in blocks:
            blocks.append(block)
    out: dict[str, nn.Module] = {}

    def add_children(owner: str) -> None:
        for child, mod in model.get_submodule(owner).named_children():
            name = f"{owner}.{child}"
            if not holds_ffn(name):
                out[name] = current(mod)
            elif name not in keep_out:
                add_children(name)  # e.g. GPT-2's mlp, which holds the swapped c_proj

    for block in blocks:
        add_children(block)
    containers = {b.rpartition(".")[0] for b in blocks}  # e.g. model.layers
    for owner in sorted({c.rpartition(".")[0] for c in containers}):  # e.g. model
        for child, mod in model.get_submodule(owner).named_children():
            name = f"{owner}.{child}" if owner else child
            if name not in containers and not isinstance(mod, nn.Embedding) and not holds_ffn(name):
                out[name] = mod
    return out


def _dynamo_limits(entries: int) -> dict:
    """Config overrides that let dynamo keep `entries` cache entries for the one compiled function
    (one per module: the attention modules differ by layer_idx, a constant it specialises on),
    and make a hit limit raise rather than silently run eagerly."""
    cfg = torch._dynamo.config
    out = {}
    per_code = next((n for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n)), None)
    if per_code:
        out[per_code] = max(getattr(cfg, per_code), entries)
    total = next((n for n in ("accumulated_recompile_limit", "accumulated_cache_size_limit") if hasattr(cfg, n)), None)
    if total:
        out[total] = getattr(cfg, total) + entries
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        out["fail_on_recompile_limit_hit"] = True
    return out


@contextlib.contextmanager
def compiled_non_ffn(model: nn.Module, *, layout=None, mode: str | None = None, compiler=None,
                     keep_out: list[str] | tuple[str, ...] = ()):
    """Inside the block, the modules of `non_ffn_modules(model)` run compiled; on exit (also on
    exceptions) each is back to exactly what it was.

    How: like `nn.Module.compile()`, each module's `_compiled_call_impl` is set (so the module tree,
    the state_dict and the FFN swapping of `wb.accelerate` are untouched), here to one function
    compiled for this block (a fresh code object, so dynamo's cache entries are this block's
    alone and are dropped on exit; a `_compiled_call_impl` the module had before is put back).
    Dynamo's recompile limits are raised for the block only (one cache entry per module: the
    attention modules differ by their layer index) and a hit limit raises instead of silently
    running eagerly. Shapes are static (dynamic=False): run the prefill under
    `torch.compiler.set_stance("force_eager")` so only the decode shape compiles (decode_benchmark
    does). `mode`: torch.compile's mode, not one that makes CUDA graphs of its own. `compiler`
    (for tests): a function taking the function to compile, in place of torch.compile.
    Nested blocks on the same model are no-ops.
    """
    if mode in _CUDAGRAPH_MODES:
        raise WorkbenchError(f"compile mode {mode!r} captures CUDA graphs of its own; the decode harness "
                             "captures one graph per step: use the default or 'max-autotune-no-cudagraphs'")
    if model in _COMPILED:  # an enclosing block compiled them already
        yield _COMPILED[model]
        return
    mods = non_ffn_modules(model, layout, keep_out)
    fn = types.FunctionType(_call_module.__code__.replace(), _call_module.__globals__, "_call_module")
    if compiler is None:
        compiled = torch.compile(fn, dynamic=False, **({"mode": mode} if mode else {}))
    else:
        compiled = compiler(fn)
    saved = []
    try:
        with torch._dynamo.config.patch(**_dynamo_limits(len(mods) + 8)):
            for m in mods.values():
                saved.append((m, m.__dict__.get("_compiled_call_impl", _MISSING)))
                m._compiled_call_impl = functools.partial(compiled, m)
            _COMPILED[model] = mods
            yield mods
    finally:
        _COMPILED.pop(model, None)
        for m, prev in saved:
            if prev is _MISSING:
                m.__dict__.pop("_compiled_call_impl", None)
            else:
                m._compiled_call_impl = prev
        reset = getattr(torch._dynamo, "reset_code", None)
        if compiler is None and reset is not None:
            reset(fn.__code__)  # this block's compiled code goes with it


def _eager(compiled: bool):
    """Prefills run eagerly when the non-FFN modules are compiled (only the decode shape compiles)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


# Models whose forward, given no attention mask, derives the token positions from a mask it builds
# from the cache length read on the host (OPT: torch.ones(past + T) and a cumsum): a host read that
# a CUDA graph capture refuses. Their decode steps get a static [1, max_len] mask (1 up to the
# current token) and explicit position_ids, which compute the same positions.
_MASK_POSITION_MODELS = ("opt",)


def _static_mask(model, max_len: int, dev: torch.device) -> torch.Tensor | None:
    if getattr(model.config, "model_type", None) in _MASK_POSITION_MODELS:
        return torch.zeros((1, max_len), dtype=torch.long, device=dev)
    return None


def _mask_kwargs(mask: torch.Tensor | None, positions: torch.Tensor) -> dict:
    """Mark `positions` [T] valid in `mask` (in place) and return the step's extra keywords."""
    if mask is None:
        return {}
    mask.index_fill_(1, positions, 1)
    return {"attention_mask": mask, "position_ids": positions[None]}


def _greedy_eager(model, prompt, new_tokens, max_len, compiled=False) -> tuple[list[int], float]:
    """Prefill + `new_tokens` greedy steps over a fresh StaticCache of `max_len`, eager; returns the
    tokens and the decode seconds."""
    from transformers import StaticCache

    dev = prompt.device
    p = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    mask = _static_mask(model, max_len, dev)
    with _eager(compiled):
        pos = torch.arange(p, device=dev)
        out = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True, cache_position=pos,
                    **_mask_kwargs(mask, pos))
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [tok]
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        pos = torch.tensor([p + i], device=dev)
        out = model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True, cache_position=pos,
                    **_mask_kwargs(mask, pos))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    _sync(dev)
    dt = time.perf_counter() - t0
    return [int(t) for t in torch.cat(toks, 1)[0]], dt


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _GraphDecoder:
    """One decode step of `model` captured as a CUDA graph over a StaticCache."""

    def __init__(self, model, prompt, max_len, warmup, compiled=False):
        from transformers import StaticCache

        self.model, self.prompt, self.compiled = model, prompt, compiled
        dev = prompt.device
        self.p = prompt.shape[1]
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((1,), dtype=torch.long, device=dev)
        self.mask = _static_mask(model, max_len, dev)
        self.prefill()
        s = side_stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):  # warm-up: kernels compiled, workspaces allocated, cache laid out
            for _ in range(max(warmup, 2)):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        # compiled: everything compiled during the warm-up; a recompile inside the capture raises
        no_compile = torch.compiler.set_stance("fail_on_recompile") if compiled else contextlib.nullcontext()
        with no_compile, torch.cuda.graph(self.graph):
            self._step()

    def _step(self):
        out = self.model(input_ids=self.ids, **cache_kwargs(self.model, self.cache), use_cache=True,
                         cache_position=self.pos, **_mask_kwargs(self.mask, self.pos))
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.ids.copy_(self.next)
        self.pos.add_(1)

    def prefill(self):
        """Run the prompt (eager, untimed) and set the static buffers to the first decode step."""
        self.cache.reset()
        pos = torch.arange(self.p, device=self.prompt.device)
        if self.mask is not None:
            self.mask.zero_()
        with _eager(self.compiled):
            out = self.model(input_ids=self.prompt, **cache_kwargs(self.model, self.cache), use_cache=True,
                             cache_position=pos, **_mask_kwargs(self.mask, pos))
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.fill_(self.p)

    def run(self, new_tokens) -> tuple[list[int], float]:
        """Greedy decode; returns the tokens and the decode time (s) of new_tokens - 1 replays."""
        self.prefill()
        toks = [self.ids.clone()]
        dev = self.prompt.device
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(new_tokens - 1):
            self.graph.replay()
            toks.append(self.ids.clone())
        end.record()
        end.synchronize()
        return [int(t) for t in torch.cat(toks, 1)[0]], start.elapsed_time(end) / 1e3


@torch.no_grad()
def decode_benchmark(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, handle=None,
                     cuda_graphs: bool = True, warmup: int = 2, reps: int = 3,
                     compile_non_ffn: bool = False, compile_mode: str | None = None) -> dict:
    """Greedy decoding of `new_tokens` after `prompt_ids` [1, P], dense and (with `handle`)
    accelerated, alternating, `reps` times each; tokens/s are medians over the reps.

    compile_non_ffn: run everything but the FFNs through torch.compile (`compiled_non_ffn`: the
    same compiled modules on both sides, restored on return; `compile_mode` is torch.compile's
    mode); the prefill stays eager, the decode step compiles during the warm-up (the first
    side's setup_s includes the compile time) and is captured in the harness's CUDA graph.

    Returns {"summary": {...}, "runs": [per side and rep], "tokens": {side: greedy tokens}};
    summary holds tokens_per_s_dense, tokens_per_s_accel, speedup, ms_per_token_*, tokens_match
    (greedy tokens identical to the dense ones), first_mismatch, cuda_graphs, compile_non_ffn,
    reference (True when the torch reference path ran, e.g. on CPU: timings are not the
    kernels') and the device. The handle is left as it was.
    """

    ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
    if ids.shape[0] != 1:
        raise WorkbenchError("decode_benchmark decodes one sequence: prompt_ids must be [1, P]")
    if new_tokens < 2:
        raise WorkbenchError("new_tokens must be >= 2 (the first token comes from the prefill)")
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    graphs = bool(cuda_graphs and dev.type == "cuda" and torch.cuda.is_available())
    max_len = ids.shape[1] + new_tokens + max(warmup, 2) + 1
    was_active = handle.active if handle is not None else False
    sides = ["dense"] + (["accel"] if handle is not None else [])
    runs: list[dict] = []
    tokens: dict[str, list[int]] = {}
    compiled = bool(compile_non_ffn)
    ctx = (compiled_non_ffn(model, layout=handle.layout if handle is not None else None, mode=compile_mode,
                            keep_out=list(handle.sparse) + list(getattr(handle, "eager_modules", ()))
                            if handle is not None else ())
           if compiled else contextlib.nullcontext({}))
    with ctx as compiled_mods, call_graphs_disabled():  # the harness captures whole steps itself
        try:
            for rep in range(reps):
                for side in sides:
                    if handle is not None:
                        (handle.on if side == "accel" else handle.off)()
                    t_setup = time.perf_counter()
                    if graphs:
                        dec = _GraphDecoder(model, ids, max_len, warmup, compiled)
                        setup_s = time.perf_counter() - t_setup
                        toks, dt = dec.run(new_tokens)
                        del dec
                    else:
                        for _ in range(warmup if rep == 0 else 0):
                            _greedy_eager(model, ids, min(new_tokens, 3), max_len, compiled)
                        setup_s = time.perf_counter() - t_setup
                        toks, dt = _greedy_eager(model, ids, new_tokens, max_len, compiled)
                    tokens.setdefault(side, toks)
                    steps = new_tokens - 1
                    runs.append({"rep": rep, "side": side, "decode_steps": steps, "s": dt,
                                 "ms_per_token": dt * 1e3 / steps, "tokens_per_s": steps / dt,
                                 "setup_s": setup_s})
        finally:
            if handle is not None:
                (handle.on if was_active else handle.off)()
    med = {s: statistics.median(r["tokens_per_s"] for r in runs if r["side"] == s) for s in sides}
    summary = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cuda_graphs": graphs, "compile_non_ffn": compiled, "compile_mode": compile_mode if compiled else None,
        "compiled_modules": len(compiled_mods), "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens,
        "reps": reps, "tokens_per_s_dense": med["dense"], "ms_per_token_dense": 1e3 / med["dense"],
    }
    if handle is not None:
        backend = handle._backend_used()
        match = [a == b for a, b in zip(tokens["dense"], tokens["accel"], strict=True)]
        summary.update({
            "mode": handle.mode, "backend": backend,
            "tokens_per_s_accel": med["accel"], "ms_per_token_accel": 1e3 / med["accel"],
            "speedup": med["accel"] / med["dense"],
            "tokens_match": all(match), "token_agreement": sum(match) / len(match),
            "first_mismatch": None if all(match) else match.index(False),
        })
        summary["reference"] = backend == "torch" or dev.type != "cuda"
    else:
        summary["reference"] = dev.type != "cuda"
    summary["note"] = ("torch reference path (CPU): timings are not the kernels'" if summary["reference"]
                       else "CUDA graph replays, medians" if graphs else "eager decoding (launch-bound on GPU)")
    if compiled:
        summary["note"] += "; non-FFN modules compiled (torch.compile), FFNs as they are"
    return {"summary": summary, "runs": runs, "tokens": tokens}
