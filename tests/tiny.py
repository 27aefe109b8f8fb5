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


# -- router families added for the routing analysis (issue 24) --------------------------------

def build_router(family: str):
    """A tiny random MoE of one more router family, float32 eval mode, seeded: "qwen3_moe"
    (norm_topk_prob on), "qwen2_moe_norm" (Qwen2-MoE with norm_topk_prob on), "deepseek_v3"
    (sigmoid scores, a random selection bias, 4 groups of 2 experts, top-2 groups, one dense
    layer first), "gpt_oss" (top-k of biased logits, softmax over the k). Other names: `build`."""
    torch.manual_seed(1234)
    if family == "qwen3_moe":
        m = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **_common(head_dim=8), moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))
    elif family == "qwen2_moe_norm":
        m = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **_common(), moe_intermediate_size=16, shared_expert_intermediate_size=40, num_experts=5,
            num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))
    elif family == "deepseek_v3":
        m = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            **_common(num_hidden_layers=3, num_key_value_heads=4), n_routed_experts=8, num_experts_per_tok=2, n_group=4,
            topk_group=2, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            norm_topk_prob=True, routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
        with torch.no_grad():
            for layer in m.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if hasattr(gate, "e_score_correction_bias"):
                    gate.weight.normal_(0, 0.3)
                    gate.e_score_correction_bias.normal_(0, 0.2)
    elif family == "gpt_oss":
        m = tf.GptOssForCausalLM(tf.GptOssConfig(
            **_common(head_dim=8), num_local_experts=5, num_experts_per_tok=2,
            layer_types=["full_attention", "sliding_attention"], sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.router.weight.normal_(0, 0.3)
                layer.mlp.router.bias.normal_(0, 0.3)
    elif family == "blockffn":
        from workbench.models.blockffn import BlockFFNConfig, BlockFFNForCausalLM

        m = BlockFFNForCausalLM(BlockFFNConfig(
            **_common(head_dim=8, num_key_value_heads=4), n_experts=7, expert_size=8))
    else:
        return build(family)
    return m.eval()


ALL_ROUTER_FAMILIES = ["mixtral", "qwen2_moe", "qwen2_moe_norm", "qwen3_moe", "olmoe", "deepseek_v3",
                       "gpt_oss", "blockffn"]
