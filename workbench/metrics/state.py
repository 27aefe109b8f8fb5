"""Recurrent-state usage of Mamba-2 models far past their training length (Stuffed Mamba).

:func:`state_drift` runs a transformers ``Mamba2ForCausalLM`` over long sequences chunk by chunk
with the cache (conv and SSM state) carried over, as in Stuffed Mamba (arXiv 2410.07145), and
records

- per layer, the RMS of the SSM state h (heads x head_dim x d_state, read from the cache's
  recurrent state) at the chunk ends in ``points`` (e.g. 256, 512, ..., 4096), also per head;
- per layer, the cosine similarity of consecutive chunk states;
- per layer, the mean per-token decay dA = exp(dt * A) and the mean dt over all tokens
  (dt = softplus(in_proj's dt + dt_bias), clamped to the config's time_step_limit);
- the mean next-token NLL per position bucket (edges ``buckets``).

State drift / collapse shows as the state RMS growing past the training length and the loss
rising there. All figures are float32 means over the sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench._compat import cache_kwargs, output_cache

DEFAULT_POINTS = (128, 256, 512, 1024, 2048, 4096)
DEFAULT_BUCKETS = (0, 128, 256, 512, 1024, 2048, 4096)


def _layers(model):
    base = getattr(model, "backbone", None) or getattr(model, "model", None)
    return list(base.layers)


@torch.no_grad()
def state_drift(
    model,
    ids: torch.Tensor,
    *,
    chunk: int = 128,
    points=DEFAULT_POINTS,
    buckets=DEFAULT_BUCKETS,
) -> dict:
    """State statistics and loss by position of `model` on `ids` (n_seq, total), run chunk by
    chunk (`chunk` tokens per forward) with the state carried over. Returns a JSON-able dict:
    ``state_rms`` {layer: [rms at each point]}, ``state_rms_heads`` {layer: [[per head] per
    point]}, ``state_cos`` {layer: mean cosine of consecutive chunk states},
    ``decay`` / ``dt`` {layer: mean over tokens}, ``loss`` {"a-b": mean NLL}, plus the setup."""
    from transformers import DynamicCache

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = ids.to(device)
    n_seq, total = ids.shape
    layers = _layers(model)
    points = [p for p in points if p <= total and p % chunk == 0]
    dt_sum = [0.0] * len(layers)
    dec_sum = [0.0] * len(layers)
    n_tok = [0] * len(layers)
    handles = []

    def hook(i, mix):
        def f(mod, args, out):
            dt = out[..., -mix.num_heads :].float() + mix.dt_bias.float()
            dt = F.softplus(dt)
            lo, hi = mix.time_step_limit
            dt = dt.clamp(min=lo, max=hi)
            dec = torch.exp(dt * -torch.exp(mix.A_log.float()))
            dt_sum[i] += float(dt.double().sum())
            dec_sum[i] += float(dec.double().sum())
            n_tok[i] += dt.numel()

        return f

    for i, layer in enumerate(layers):
        handles.append(layer.mixer.in_proj.register_forward_hook(hook(i, layer.mixer)))
    rms = {i: [] for i in range(len(layers))}
    rms_heads = {i: [] for i in range(len(layers))}
    cos_sum = [0.0] * len(layers)
    cos_n = 0
    nll = torch.zeros(total - 1, dtype=torch.float64)
    try:
        cache = DynamicCache(config=model.config)
        prev_last = None
        prev_state = [None] * len(layers)
        for start in range(0, total, chunk):
            x = ids[:, start : start + chunk]
            out = model(input_ids=x, **cache_kwargs(model, cache, old="cache_params"), use_cache=True)
            cache = output_cache(out, old="cache_params")
            lp = F.log_softmax(out.logits.float(), -1)
            if prev_last is not None:  # the previous chunk's last logits predict x[:, 0]
                nll[start - 1] = -prev_last.gather(-1, x[:, :1]).mean()
            n = x.shape[1]
            tok = -lp[:, :-1].gather(-1, x[:, 1:, None])[..., 0].mean(0)
            nll[start : start + n - 1] = tok.double()
            prev_last = lp[:, -1]
            end = start + n
            for i in range(len(layers)):
                h = cache.get_recurrent_state(i).float().clone()  # (b, heads, head_dim, d_state)
                if prev_state[i] is not None:
                    cos_sum[i] += float(F.cosine_similarity(h.flatten(1), prev_state[i].flatten(1), dim=-1).mean())
                prev_state[i] = h
                if end in points:
                    rms[i].append(float(h.pow(2).mean().sqrt()))
                    rms_heads[i].append([float(v) for v in h.pow(2).mean(dim=(0, 2, 3)).sqrt()])
            if start > 0:
                cos_n += 1
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    edges = sorted({min(b, total - 1) for b in buckets})
    loss = {f"{a}-{b}": float(nll[a:b].mean()) for a, b in zip(edges[:-1], edges[1:]) if b > a}
    return {
        "n_seq": n_seq,
        "total": total,
        "chunk": chunk,
        "points": points,
        "state_rms": {str(i): v for i, v in rms.items()},
        "state_rms_heads": {str(i): v for i, v in rms_heads.items()},
        "state_cos": {str(i): (cos_sum[i] / cos_n if cos_n else math.nan) for i in range(len(layers))},
        "decay": {str(i): dec_sum[i] / max(1, n_tok[i]) for i in range(len(layers))},
        "dt": {str(i): dt_sum[i] / max(1, n_tok[i]) for i in range(len(layers))},
        "loss": loss,
    }


def drift_ratio(res: dict, ref: int = 256) -> dict:
    """Per layer: state RMS at the last point / state RMS at position `ref`."""
    j = res["points"].index(ref)
    return {k: v[-1] / v[j] for k, v in res["state_rms"].items()}
