"""The offline zoo: small trained models under data/zoo/NAME.

Each directory is a plain Hugging Face model directory (config.json, model.safetensors,
tokenizer files, README.md model card) plus ``metrics.json`` (the card's numbers, the training
log and the checkpoint's sha256). :data:`SPECS` is the registry: architecture, config and the
training recipe of every zoo model; ``workbench zoo train NAME`` rebuilds one from it
(see workbench.models.train).

`resolve(name)` maps ``zoo:NAME`` to its directory and checks that the checkpoint is present and
intact, raising ModelLoadError naming the file and the rebuild command otherwise.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import ModelLoadError

#: data/ at the repository root (editable install) holds the zoo.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
ZOO_DIR = DATA_DIR / "zoo"

#: The model the demo and the notebooks use by default.
DEFAULT_MODEL = "relu-llama"

CHECKPOINT = "model.safetensors"
METRICS = "metrics.json"

# Shared shape of the zoo: d_model 128, 6 layers, 4 heads of 32, vocab 4096, tied embeddings.
_VOCAB = 4096
_COMMON = {
    "vocab_size": _VOCAB,
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
_ATTN = {
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
}


@dataclass(frozen=True)
class ZooSpec:
    """One zoo model: how to build it (family + config) and how to train it (recipe).

    family: "llama" | "blockffn" | "mixtral" | "mamba2".
    recipe keys (all optional): steps, batch_size, seq_len, lr, warmup, weight_decay,
    l1 (final ProSparse L1 factor), l1_start / l1_end (fractions of training over which the
    factor rises along a sine ramp), activation_threshold (FATReLU T stored in config.json),
    locality_weight, locality_alpha, chunk_weight, chunk_len (BlockFFN objectives), a_init
    ([lo, hi]: Mamba-2 A = -exp(A_log) log-spaced over the heads at initialisation),
    passkey_share (fraction of each batch that is synthetic passkey documents), stage2 (a dict
    seq_len / steps / lr / warmup: after the run, continue training at a longer length from the
    bf16-rounded weights with a fresh optimizer and schedule; see train.stage2_recipe).
    """

    name: str
    family: str
    description: str
    config: dict
    recipe: dict = field(default_factory=dict)
    #: which sparsity figures the card reports: "neuron" (dense FFN), "router" (BlockFFN),
    #: "topk" (softmax top-k MoE), "none"
    sparsity: str = "neuron"


_BASE_RECIPE = {
    "steps": 2000,
    "batch_size": 64,
    "seq_len": 256,
    "lr": 3e-3,
    "warmup": 150,
    "weight_decay": 0.1,
    "min_lr_ratio": 0.1,
}

SPECS: dict[str, ZooSpec] = {
    "relu-llama": ZooSpec(
        "relu-llama",
        "llama",
        "Llama with ReLU FFN activations trained with the ProSparse recipe (progressive L1 on "
        "the FFN activations, sine-ramped factor). The demo's default model.",
        {**_COMMON, **_ATTN, "intermediate_size": 512, "hidden_act": "relu"},
        {**_BASE_RECIPE, "l1": 1.0, "l1_start": 0.1, "l1_end": 0.75},
        "neuron",
    ),
    "silu-llama": ZooSpec(
        "silu-llama",
        "llama",
        "The SiLU twin of relu-llama (same shape, data, seed and steps; no L1): the dense "
        "baseline of the Sparsing Law comparison.",
        {**_COMMON, **_ATTN, "intermediate_size": 512, "hidden_act": "silu"},
        dict(_BASE_RECIPE),
        "neuron",
    ),
    "blockffn": ZooSpec(
        "blockffn",
        "blockffn",
        "BlockFFN MoE (ReLU + RMSNorm router, 16 non-gated SiLU experts of 64) trained with "
        "the activation-locality and chunk-sparsification objectives.",
        {**_COMMON, **_ATTN, "n_experts": 16, "expert_size": 64, "intermediate_size": 1024},
        {
            **_BASE_RECIPE,
            "locality_weight": 2e-3,
            "locality_alpha": 100.0,
            "chunk_weight": 0.2,
            "chunk_len": 64,
        },
        "router",
    ),
    "blockffn-null": ZooSpec(
        "blockffn-null",
        "blockffn",
        "blockffn without the locality and chunk-sparsification objectives (the control).",
        {**_COMMON, **_ATTN, "n_experts": 16, "expert_size": 64, "intermediate_size": 1024},
        dict(_BASE_RECIPE),
        "router",
    ),
    "topk-moe": ZooSpec(
        "topk-moe",
        "mixtral",
        "Mixtral-architecture MoE (native transformers class): 8 gated experts of 64, top-2 "
        "softmax routing, load-balancing loss 0.02.",
        {
            **_COMMON,
            **_ATTN,
            "intermediate_size": 64,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02,
            "output_router_logits": False,
        },
        dict(_BASE_RECIPE),
        "topk",
    ),
    "mamba2": ZooSpec(
        "mamba2",
        "mamba2",
        "Mamba-2 (native transformers class) trained at 256 tokens of context, so that running "
        "it far past that length shows the state drift studied in Stuffed Mamba.",
        {
            **_COMMON,
            "expand": 2,
            "head_dim": 32,
            "num_heads": 8,
            "state_size": 128,
            "n_groups": 1,
            "conv_kernel": 4,
            "chunk_size": 64,
            # slow-decay init (Stuffed Mamba): dt = softplus(dt_bias) log-uniform in [5e-4, 5e-3]
            # and A in [0.1, 1] (recipe a_init), so the per-token decay exp(dt * A) starts in
            # [0.99995, 0.995]: a state that barely forgets over the 256 training tokens
            "time_step_min": 5e-4,
            "time_step_max": 5e-3,
            "time_step_floor": 1e-4,
        },
        {
            **_BASE_RECIPE,
            "steps": 900,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup": 60,
            "a_init": [0.1, 1.0],
        },
        "none",
    ),
}

# The state-capacity pair (issue 25; Stuffed Mamba, StateX): two Mamba-2 models identical but for
# the SSM state size d_state, trained at 128 tokens with three quarters of every batch synthetic passkey
# documents (workbench.metrics.passkey.training_documents), so that the passkey grid past the
# training length shows what a larger state recalls and the state statistics show the drift.
_STATE_PAIR_CONFIG = {
    **_COMMON,
    "num_hidden_layers": 4,
    "expand": 2,
    "head_dim": 32,
    "num_heads": 8,
    "n_groups": 1,
    "conv_kernel": 4,
    "chunk_size": 64,
    "time_step_min": 5e-4,
    "time_step_max": 5e-3,
    "time_step_floor": 1e-4,
}
_STATE_PAIR_RECIPE = {
    **_BASE_RECIPE,
    "steps": 900,
    "batch_size": 16,
    "seq_len": 128,
    "lr": 3e-3,
    "warmup": 60,
    "a_init": [0.1, 1.0],
    "passkey_share": 0.75,
    # Stuffed Mamba's remedy for state collapse: continue at a longer length (issue 25; a stage 2
    # of 450 steps at 512 tokens was tried too: the d_state-16 model then recalled further)
    "stage2": {"seq_len": 1024, "steps": 225, "lr": 1e-3, "warmup": 20},
}
for _n in (16, 64):
    SPECS[f"mamba2-s{_n}"] = ZooSpec(
        f"mamba2-s{_n}",
        "mamba2",
        f"State-capacity pair, d_state {_n}: Mamba-2 (native transformers class, 4 layers) "
        "trained at 128 tokens, then continued at 1024 tokens (stage 2), with 3/4 of each batch "
        "synthetic passkey documents (the Stuffed Mamba format); its twin differs only in d_state "
        "(mamba2-s16 / mamba2-s64).",
        {**_STATE_PAIR_CONFIG, "state_size": _n},
        dict(_STATE_PAIR_RECIPE),
        "none",
    )


def spec(name: str) -> ZooSpec:
    """The registry entry of zoo model `name`."""
    if name not in SPECS:
        raise ModelLoadError(
            f"unknown zoo model {name!r}; the zoo has: {', '.join(SPECS)}. "
            "List them with `workbench zoo list`."
        )
    return SPECS[name]


def train_command(name: str) -> str:
    # --overwrite: the rebuild replaces what is left of the model in data/zoo/NAME (its card, ...)
    return f"workbench zoo train {name} --overwrite  (or: python -m workbench.models.zoo_cli train {name} --overwrite)"


def available() -> list[str]:
    """Names of the zoo models present on disk."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_checkpoint(path: Path, name: str | None = None) -> None:
    """Raise ModelLoadError if `path`/model.safetensors is missing, truncated or altered."""
    name = name or path.name
    ckpt = path / CHECKPOINT
    fix = f"Restore it with `git checkout -- {ckpt}` or rebuild it with `{train_command(name)}`."
    if not ckpt.is_file():
        raise ModelLoadError(f"zoo model {name!r}: checkpoint file {ckpt} is missing. {fix}")
    size = ckpt.stat().st_size
    try:
        with open(ckpt, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if 8 + n + end != size:
            raise ValueError(f"file is {size} bytes, header says {8 + n + end}")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"zoo model {name!r}: checkpoint file {ckpt} is corrupted (not a valid safetensors "
            f"file: {e}). {fix}"
        ) from e
    metrics = path / METRICS
    if metrics.is_file():
        try:
            want = json.loads(metrics.read_text()).get("checkpoint_sha256")
        except json.JSONDecodeError:
            want = None
        if want and _sha256(ckpt) != want:
            raise ModelLoadError(
                f"zoo model {name!r}: checkpoint file {ckpt} is corrupted (its sha256 differs "
                f"from the one recorded in {metrics}). {fix}"
            )


def resolve(name: str) -> Path:
    """Directory of zoo model `name`, checked; or a clear error naming the file and the fix."""
    path = ZOO_DIR / name
    if not (path / "config.json").is_file():
        spec(name)  # not a registered name: the error lists the zoo (once)
        raise ModelLoadError(
            f"zoo model {name!r} is not built under {ZOO_DIR} ({path / 'config.json'} missing): "
            f"rebuild it with `{train_command(name)}`."
        )
    check_checkpoint(path, name)
    return path


def card_metrics(name: str) -> dict:
    """The numbers of zoo model `name`'s card (its metrics.json)."""
    path = resolve(name) / METRICS
    return json.loads(path.read_text())
