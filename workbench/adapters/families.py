"""Built-in adapters, one small declarative record per model family."""

from __future__ import annotations

from workbench.adapters.base import GATED, PLAIN, Adapter

LLAMA_LIKE = Adapter(
    name="llama-like",
    model_types=(
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
        "granite", "cohere", "stablelm", "starcoder2_gated", "smollm3",
    ),
)

PHI3 = Adapter(name="phi3", model_types=("phi3",), fused_gate_up="gate_up_proj", act="activation_fn",
               gate=None, up=None)

GPT2 = Adapter(name="gpt2", model_types=("gpt2",), blocks=("transformer.h", "h"), kind=PLAIN,
               gate=None, up="c_fc", act="act", down="c_proj")

GPT_NEOX = Adapter(name="gpt_neox", model_types=("gpt_neox",), blocks=("gpt_neox.layers", "layers"),
                   kind=PLAIN, gate=None, up="dense_h_to_4h", act="act", down="dense_4h_to_h")

BERT = Adapter(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
    blocks=("bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer",
            "encoder.layer"),
    ffn="", kind=PLAIN, gate=None, up="intermediate.dense", act="intermediate.intermediate_act_fn",
    down="output.dense",
)

MIXTRAL = Adapter(name="mixtral", model_types=("mixtral",), router="mlp.gate", experts="mlp.experts")

QWEN2_MOE = Adapter(name="qwen2_moe", model_types=("qwen2_moe", "qwen3_moe"), router="mlp.gate",
                    experts="mlp.experts", shared_ffn="mlp.shared_expert",
                    shared_gate="mlp.shared_expert_gate")

OLMOE = Adapter(name="olmoe", model_types=("olmoe",), router="mlp.gate", experts="mlp.experts")

# DeepSeek-V3 style: sigmoid scores, e_score_correction_bias for the selection only, grouped
# top-k; the first `first_k_dense_replace` layers are dense MLPs (found through `ffn`)
DEEPSEEK_V3 = Adapter(name="deepseek_v3", model_types=("deepseek_v3",), router="mlp.gate",
                      router_kind="sigmoid_topk", experts="mlp.experts", shared_ffn="mlp.shared_experts")

# GPT-OSS: top-k of the (biased) logits, softmax over the k; no dense FFN, no shared expert
GPT_OSS = Adapter(name="gpt_oss", model_types=("gpt_oss",), router="mlp.router",
                  router_kind="topk_logits", experts="mlp.experts")

MAMBA = Adapter(name="mamba", model_types=("mamba",), blocks=("backbone.layers", "layers"), ffn=None,
                mixer="mixer", mixer_kind="mamba")

MAMBA2 = Adapter(name="mamba2", model_types=("mamba2",), blocks=("backbone.layers", "layers"),
                 ffn=None, mixer="mixer", mixer_kind="mamba2")

BUILTIN: tuple[Adapter, ...] = (LLAMA_LIKE, PHI3, GPT2, GPT_NEOX, BERT, MIXTRAL, QWEN2_MOE, OLMOE,
                                DEEPSEEK_V3, GPT_OSS, MAMBA, MAMBA2)

__all__ = ["BUILTIN", "GATED", "PLAIN"]
