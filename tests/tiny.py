"""Tiny random-weight models of every family the adapters cover (shared by the tests)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return base


def build(family: str, act: str | None = None):
    """A tiny model of `family` in float32 eval mode, seeded."""
    torch.manual_seed(1234)
    if family == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**_common(hidden_act=act or "relu")))
    elif family == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**_common(hidden_act=act or "silu")))
    elif family == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common(hidden_act=act or "silu")))
    elif family == "qwen3":
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(hidden_act=act or "relu", head_dim=8)))
    elif family == "gemma":
        m = tf.GemmaForCausalLM(tf.GemmaConfig(**_common(hidden_act=act or "gelu_pytorch_tanh", head_dim=8,
                                                        hidden_activation=act or "gelu_pytorch_tanh")))
    elif family == "phi3":
        m = tf.Phi3ForCausalLM(tf.Phi3Config(**_common(hidden_act=act or "silu", pad_token_id=0)))
    elif family == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                             n_positions=64, activation_function=act or "gelu_new"))
    elif family == "gpt_neox":
        m = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=64, hidden_act=act or "gelu"))
    elif family == "bert":
        m = tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=64, hidden_act=act or "gelu"))
    elif family == "qwen2_moe":
        m = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **_common(hidden_act=act or "silu", num_hidden_layers=3), moe_intermediate_size=16,
            shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[1]))
    elif family == "mixtral":
        m = tf.MixtralForCausalLM(tf.MixtralConfig(**_common(), num_local_experts=4, num_experts_per_tok=2))
    elif family == "olmoe":
        m = tf.OlmoeForCausalLM(tf.OlmoeConfig(**_common(), num_experts=4, num_experts_per_tok=2))
    elif family == "mamba":
        m = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4,
                                               num_hidden_layers=2, expand=2))
    elif family == "mamba2":
        m = tf.Mamba2ForCausalLM(tf.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8,
                                                 num_hidden_layers=2, expand=2, num_heads=8, head_dim=8,
                                                 n_groups=1, chunk_size=16))
    else:
        raise KeyError(family)
    return m.eval()


DENSE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "bert",
                  "qwen2_moe"]
ROUTER_FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]
MIXER_FAMILIES = ["mamba", "mamba2"]
