"""Shims over transformers versions (the package supports transformers >= 5.17, < 6)."""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _takes_cache(forward_owner: type) -> bool:
    try:
        params = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False
    return "cache" in params


def cache_kwargs(model, cache, old: str = "past_key_values") -> dict:
    """The keyword that passes a KV (or recurrent-state) cache to ``model.forward``.

    transformers 5.24 renamed ``past_key_values`` (and Mamba's ``cache_params``) to ``cache`` and
    warns on the old names; earlier 5.x versions know only the old ones. ``old`` is the name this
    model's forward took before the rename.
    """
    return {("cache" if _takes_cache(type(model)) else old): cache}


def output_cache(out, old: str = "past_key_values"):
    """The cache a forward returned: ``out.cache`` since transformers 5.24, ``out.<old>`` before."""
    keys = out.keys() if hasattr(out, "keys") else ()
    if "cache" in keys:
        return out["cache"]
    return getattr(out, old)


def recurrent_state(cache, layer_idx: int):
    """The SSM (recurrent) state of layer `layer_idx` in a transformers cache: `get_recurrent_state`
    from transformers 5.2x, `layers[i].recurrent_states[0]` in 5.17 (the GPU machine's)."""
    get = getattr(cache, "get_recurrent_state", None)
    if get is not None:
        return get(layer_idx)
    return cache.layers[layer_idx].recurrent_states[0]
