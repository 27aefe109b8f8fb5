"""workbench._compat: the cache keyword and output field across transformers versions."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workbench._compat import cache_kwargs, output_cache


class _Old(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return {"past_key_values": past_key_values}


class _New(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return {"cache": cache}


def test_cache_keyword_follows_the_forward_signature():
    assert cache_kwargs(_Old(), 1) == {"past_key_values": 1}
    assert cache_kwargs(_New(), 1) == {"cache": 1}
    assert cache_kwargs(_Old(), 1, old="cache_params") == {"cache_params": 1}
    assert output_cache({"cache": 2}) == 2


def test_installed_transformers_takes_the_keyword_without_warnings(recwarn):
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), **cache_kwargs(model, cache), use_cache=True)
    assert output_cache(out) is cache
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
