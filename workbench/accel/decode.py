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
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from workbench.errors import WorkbenchError


def _greedy_eager(model, prompt, new_tokens, cache) -> tuple[list[int], float]:
    """Prefill + `new_tokens` greedy steps, eager; returns the tokens and the decode seconds."""
    dev = prompt.device
    p = prompt.shape[1]
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(p, device=dev))
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [tok]
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True,
                    cache_position=torch.tensor([p + i], device=dev))
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

    def __init__(self, model, prompt, max_len, warmup):
        from transformers import StaticCache

        self.model, self.prompt = model, prompt
        dev = prompt.device
        self.p = prompt.shape[1]
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((1,), dtype=torch.long, device=dev)
        self.prefill()
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):  # warm-up: kernels compiled, workspaces allocated, cache laid out
            for _ in range(max(warmup, 2)):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _step(self):
        out = self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True,
                         cache_position=self.pos)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.ids.copy_(self.next)
        self.pos.add_(1)

    def prefill(self):
        """Run the prompt (eager, untimed) and set the static buffers to the first decode step."""
        self.cache.reset()
        out = self.model(input_ids=self.prompt, past_key_values=self.cache, use_cache=True,
                         cache_position=torch.arange(self.p, device=self.prompt.device))
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
                     cuda_graphs: bool = True, warmup: int = 2, reps: int = 3) -> dict:
    """Greedy decoding of `new_tokens` after `prompt_ids` [1, P], dense and (with `handle`)
    accelerated, alternating, `reps` times each; tokens/s are medians over the reps.

    Returns {"summary": {...}, "runs": [per side and rep]}; summary holds tokens_per_s_dense,
    tokens_per_s_accel, speedup, ms_per_token_*, tokens_match (greedy tokens identical to the
    dense ones), first_mismatch, cuda_graphs, reference (True when the torch reference path ran,
    e.g. on CPU: timings are not the kernels') and the device. The handle is left as it was.
    """
    from transformers import StaticCache

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
    try:
        for rep in range(reps):
            for side in sides:
                if handle is not None:
                    (handle.on if side == "accel" else handle.off)()
                if graphs:
                    dec = _GraphDecoder(model, ids, max_len, warmup)
                    toks, dt = dec.run(new_tokens)
                    del dec
                else:
                    for _ in range(warmup if rep == 0 else 0):
                        _greedy_eager(model, ids, min(new_tokens, 3), StaticCache(config=model.config, max_cache_len=max_len))
                    toks, dt = _greedy_eager(model, ids, new_tokens, StaticCache(config=model.config, max_cache_len=max_len))
                tokens.setdefault(side, toks)
                steps = new_tokens - 1
                runs.append({"rep": rep, "side": side, "decode_steps": steps, "s": dt,
                             "ms_per_token": dt * 1e3 / steps, "tokens_per_s": steps / dt})
    finally:
        if handle is not None:
            (handle.on if was_active else handle.off)()
    med = {s: statistics.median(r["tokens_per_s"] for r in runs if r["side"] == s) for s in sides}
    summary = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cuda_graphs": graphs, "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens,
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
    return {"summary": summary, "runs": runs, "tokens": tokens}
