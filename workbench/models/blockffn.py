"""BlockFFN (arXiv 2507.08771): a MoE whose router is ReLU + RMSNorm, with non-gated experts.

Router: ``A0 = W_r x``, ``A1 = ReLU(A0)``, ``A = RMSNorm(A1)`` (learnable weight over the
expert axis); experts ``E_i(x) = down_i(SiLU(up_i(x)))``; output ``sum_i A_i E_i(x)``. An expert
is active on a token iff ``A_i != 0``, so token-level sparsity (TLS) is
``1 - nonzero(A) / (tokens x experts)``.

The attention, norms and rotary embedding are Llama's (the model is a Llama whose MLP is a
BlockFFN layer), so KV caching and ``generate`` work as for any transformers model. Importing
this module registers ``model_type="blockffn"`` with AutoConfig, AutoModel and
AutoModelForCausalLM, so ``AutoModelForCausalLM.from_pretrained(dir)`` works after
``import workbench`` with no remote code.

DECO option (arXiv 2605.10933): ``expert_act="normsilu"`` (subtract the mean over all
up-projection units, RMS-normalise per expert block, then SiLU) and ``router_scale=True``
(a learnable per-expert scale on the router scores).

Training objectives (used by workbench.models.train, see :func:`locality_loss` and
:func:`chunk_sparsity_loss`): the router records ``(A0, A1)`` while ``router.record`` is True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init


class BlockFFNConfig(LlamaConfig):
    """Llama config plus the BlockFFN layer's fields.

    n_experts: number of experts; expert_size: hidden width of each (non-gated) expert;
    expert_act: "silu" (BlockFFN) or "normsilu" (DECO); router_scale: DECO per-expert scale.
    """

    model_type = "blockffn"

    n_experts: int = 16
    expert_size: int = 64
    expert_act: str = "silu"
    router_scale: bool = False
    router_eps: float = 1e-6


class BlockFFNRouter(nn.Module):
    """``A = RMSNorm(ReLU(W_r x))`` (times a per-expert scale with DECO). Output ``[..., n_experts]``.

    A forward hook on this module sees the routing scores A; an expert is active iff A != 0.
    """

    def __init__(self, config: BlockFFNConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.proj = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.norm = LlamaRMSNorm(config.n_experts, eps=config.router_eps)
        self.scale = nn.Parameter(torch.ones(config.n_experts)) if config.router_scale else None
        #: when True, forward keeps (A0, A1) in `self.last` for the training objectives
        self.record = False
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a0 = self.proj(x)
        a1 = F.relu(a0)
        a = self.norm(a1)
        if self.scale is not None:
            a = a * self.scale
        if self.record:
            self.last = (a0, a1)
        return a


class NormSiLU(nn.Module):
    """DECO's NormSiLU over ``[..., n_experts * expert_size]``: subtract the mean over all units,
    RMS-normalise each expert's block, then SiLU."""

    def __init__(self, n_experts: int, expert_size: int, eps: float = 1e-6):
        super().__init__()
        self.n_experts, self.expert_size, self.eps = n_experts, expert_size, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h - h.mean(-1, keepdim=True)
        h = h.unflatten(-1, (self.n_experts, self.expert_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.silu(h).flatten(-2)


class BlockFFNMLP(nn.Module):
    """The BlockFFN layer: ``down(concat_i A_i * act(up_i x))``, computed densely.

    ``up`` is ``[d, n_experts * expert_size]`` (expert i owns rows i*expert_size ...), ``down``
    the transpose shape; the input of ``down`` is the activation ``a`` of the pinned definition.
    """

    def __init__(self, config: BlockFFNConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.expert_size = config.expert_size
        self.expert_act = config.expert_act
        if self.expert_act not in ("silu", "normsilu"):
            raise ValueError(f"expert_act must be 'silu' or 'normsilu', got {self.expert_act!r}")
        width = config.n_experts * config.expert_size
        self.router = BlockFFNRouter(config)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        # a module (no parameters) so that hooks and the adapters can find the activation
        self.act_fn = (
            NormSiLU(config.n_experts, config.expert_size, config.router_eps)
            if self.expert_act == "normsilu"
            else nn.SiLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.router(x)  # [..., E]
        h = self.act_fn(self.up_proj(x)).unflatten(-1, (self.n_experts, self.expert_size))
        h = h * scores.unsqueeze(-1).to(h.dtype)
        return self.down_proj(h.flatten(-2))


class BlockFFNDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: BlockFFNConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = BlockFFNMLP(config)


class BlockFFNPreTrainedModel(LlamaPreTrainedModel):
    config_class = BlockFFNConfig
    config: BlockFFNConfig
    _no_split_modules = ["BlockFFNDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BlockFFNRouter) and module.scale is not None:
            _init.ones_(module.scale)


class BlockFFNModel(BlockFFNPreTrainedModel, LlamaModel):
    def __init__(self, config: BlockFFNConfig):
        BlockFFNPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BlockFFNDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class BlockFFNForCausalLM(BlockFFNPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: BlockFFNConfig):
        BlockFFNPreTrainedModel.__init__(self, config)
        self.model = BlockFFNModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def routers(self) -> list[BlockFFNRouter]:
        return [layer.mlp.router for layer in self.model.layers]


# ----------------------------------------------------------------------------- objectives


def locality_loss(a0: torch.Tensor, alpha: float = 100.0, mask: torch.Tensor | None = None):
    """Activation locality (BlockFFN): BCE with logits between the previous token's alpha*A0
    and sigmoid(alpha*A0) of the current token. a0 ``[batch, tokens, E]``; mask ``[batch, tokens]``.
    """
    prev = alpha * a0[:, :-1].float()
    cur = torch.sigmoid(alpha * a0[:, 1:].float())
    loss = F.binary_cross_entropy_with_logits(prev, cur, reduction="none").mean(-1)
    if mask is not None:
        m = (mask[:, 1:] * mask[:, :-1]).float()
        return (loss * m).sum() / m.sum().clamp_min(1)
    return loss.mean()


def chunk_sparsity_loss(a1: torch.Tensor, chunk: int = 64, eps: float = 1e-6) -> torch.Tensor:
    """Chunk sparsification (BlockFFN): p_ik = A1_ik / sum_i A1_ik; over a chunk of `chunk`
    tokens P_act,i = 1 - prod_k (1 - p_ik); loss = mean P_act. a1 ``[batch, tokens, E]``
    (tokens a multiple of `chunk`; a shorter tail is dropped).
    """
    b, t, e = a1.shape
    t = (t // chunk) * chunk
    p = a1[:, :t].float()
    p = p / (p.sum(-1, keepdim=True) + eps)
    log_keep = torch.log1p(-p.clamp(max=1 - 1e-6)).unflatten(1, (t // chunk, chunk)).sum(2)
    return (1 - torch.exp(log_keep)).mean()


def _register_adapter() -> None:
    """Tell workbench.adapters where BlockFFN keeps its FFN and router (unless it already knows)."""
    try:
        from workbench.adapters import PLAIN, Adapter, register_adapter, registered_adapters
    except ImportError:  # pragma: no cover - adapters are optional for the layer itself
        return
    if "blockffn" not in registered_adapters():
        register_adapter(
            Adapter(
                name="blockffn",
                model_types=("blockffn",),
                kind=PLAIN,
                gate=None,
                up="up_proj",
                down="down_proj",
                act="act_fn",
                router="mlp.router",
                router_kind="relu",
            )
        )


_register_adapter()

AutoConfig.register("blockffn", BlockFFNConfig, exist_ok=True)
AutoModel.register(BlockFFNConfig, BlockFFNModel, exist_ok=True)
AutoModelForCausalLM.register(BlockFFNConfig, BlockFFNForCausalLM, exist_ok=True)

__all__ = [
    "BlockFFNConfig",
    "BlockFFNRouter",
    "BlockFFNMLP",
    "BlockFFNModel",
    "BlockFFNForCausalLM",
    "locality_loss",
    "chunk_sparsity_loss",
]
