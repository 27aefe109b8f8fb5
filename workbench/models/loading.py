"""`load_model(source)`: a hub id, a local directory or `zoo:NAME`, with its tokenizer.

- hub ids resolve through the normal Hugging Face cache (`huggingface_hub.snapshot_download`),
  so they work online and, with HF_HUB_OFFLINE=1, from a populated cache;
- local directories need config.json and weights; safetensors are used, pickle checkpoints
  (*.bin, *.pt) are refused unless `allow_pickle=True`;
- `zoo:NAME` loads a model of the offline zoo (data/zoo/NAME);
- `trust_remote_code` is off unless asked for; `device`, `dtype` and `device_map` pass through;
- a config.json `activation_threshold` T turns the ReLU FFN activations into FATReLU(T).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from workbench.errors import ModelLoadError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

#: dtype names `load_model` (and the CLI's --dtype) accept, with their aliases.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
               "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float64": "float64", "fp64": "float64", "double": "float64"}
DTYPE_CHOICES = "float32, bfloat16, float16, float64"


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a torch.dtype or a name/alias (bf16, "torch.float16", ...); a
    ModelLoadError naming the choices for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return getattr(torch, DTYPE_NAMES[key])
    raise ModelLoadError(f"dtype {dtype!r} is not a dtype; use one of {DTYPE_CHOICES} "
                         "(or their aliases fp32, bf16, fp16, half) or a torch.dtype")


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this machine lacks, before loading (a ModelLoadError naming the fix)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"device {device!r} is not a device ({exc}); use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("CUDA is not available here: use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ModelLoadError(f"device {str(dev)!r}: this machine has {n} CUDA device(s); "
                                 f"use cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("MPS is not available here: use device='cpu'")


class FATReLU(nn.Module):
    """FATReLU(T): x where x > T, else 0 (ProSparse's threshold shift of ReLU)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


#: Small models built from a config with seeded random weights: the demo's fallback while the zoo
#: is not on disk, and a quick way to try the tooling without any download.
BUILTIN_CONFIGS = {
    "tiny-relu-llama": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=512,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                            hidden_act="relu", max_position_embeddings=1024),
}


def _build_builtin(name: str, dtype=None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in BUILTIN_CONFIGS:
        raise ModelLoadError(f"unknown builtin model {name!r}; available: {sorted(BUILTIN_CONFIGS)}")
    spec = dict(BUILTIN_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    if dtype is not None:
        model = model.to(dtype)
    return model


def _resolve_source(source: str | os.PathLike, *, revision=None, cache_dir=None, allow_pickle=False) -> tuple[Path, str]:
    s = str(source)
    if s.startswith("zoo:"):
        from workbench.models import zoo

        return zoo.resolve(s[4:]), s
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; pass the model's directory (with config.json)")
        return p, str(p.resolve())
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise ModelLoadError(f"local model directory {s!r} does not exist")
    # a hub id: go through the Hugging Face cache (honours HF_HUB_OFFLINE / HF_HOME)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    allow = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
    if allow_pickle:
        allow += ["*.bin", "*.pt"]
    try:
        local = snapshot_download(repo_id=s, revision=revision, cache_dir=cache_dir, allow_patterns=allow)
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{s!r} is not in the Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it once online "
            "(hf download ID) or pass a local directory.") from exc
    except HFValidationError as exc:
        raise ModelLoadError(f"{s!r} is neither an existing directory, zoo:NAME, nor a valid hub id ({exc})") from exc
    except Exception as exc:  # network errors, gated repos, missing repos
        raise ModelLoadError(f"could not fetch {s!r} from the hub: {exc}") from exc
    return Path(local), s


def _check_weights(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; a model directory needs config.json and weights")
    files = [f.name for f in path.iterdir()]
    has_st = any(f.endswith(".safetensors") for f in files)
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if not has_st and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle checkpoints ({', '.join(sorted(pickles))}); loading a pickle can "
            "run arbitrary code. Convert them to safetensors, or pass allow_pickle=True if you trust "
            "the source.")
    if not has_st and not pickles:
        raise ModelLoadError(f"{path} has no weights (*.safetensors): a model directory needs config.json "
                             "and its weights as *.safetensors; write one with model.save_pretrained(DIR) "
                             "(and the tokenizer with tokenizer.save_pretrained(DIR))")


def _check_safetensors(file: Path) -> None:
    """Refuse a damaged or truncated safetensors file from its header alone (no tensor is read)."""
    size = file.stat().st_size
    hint = "download the model again (or re-save it)"
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if 8 + n > size:
                raise ModelLoadError(f"{file} is truncated ({size:,} bytes, shorter than its own header); {hint}")
            header = json.loads(fh.read(n))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is not a safetensors file ({exc}); {hint}") from exc
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ModelLoadError(f"{file} is truncated: {size:,} bytes, its header describes {need:,}; {hint}")


def _read_config_json(path: Path) -> dict:
    cfg = path / "config.json"
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{cfg} is not UTF-8 text ({exc.reason}); repair it or download the model again") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); "
                             "repair it or download the model again") from exc
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{cfg} holds a JSON {type(doc).__name__}, not an object of config fields; "
                             "repair it or download the model again")
    return doc


def _model_classes(config) -> list:
    """Classes to try, in order: the transformers class the checkpoint names in `architectures`
    (a base model such as BertModel loads as itself: no head with newly initialised weights), then
    the Auto classes."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    named = []
    for a in archs[:1]:
        try:
            named.append(getattr(transformers, a))
        except (AttributeError, ImportError):
            pass  # not a transformers class (remote code, own architecture): the Auto classes find it
    auto = [transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM, transformers.AutoModel]
    if any(a.endswith("ForMaskedLM") for a in archs):
        auto = auto[1:]
    return named + auto


def apply_activation_threshold(model: nn.Module, threshold: float) -> int:
    """Swap every ReLU activation module of the FFNs for FATReLU(threshold); returns the count."""
    from workbench.adapters import locate

    n = 0
    for site in locate(model).ffns:
        act = site.act
        if act is None or not isinstance(act, nn.ReLU):
            continue
        parent_name, _, child = _module_path(model, act).rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FATReLU(threshold))
        n += 1
    return n


def _module_path(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ModelLoadError("activation module not found in the model")


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None


def load_model(source: str | os.PathLike, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, device_map=None, trust_remote_code: bool = False,
               allow_pickle: bool = False, revision: str | None = None, cache_dir: str | None = None,
               apply_threshold: bool = True, **kwargs) -> nn.Module:
    """Load a causal LM (or any AutoModel) for the workbench, tokenizer attached as `.tokenizer`.

    source: "zoo:NAME", a local directory, a hub id ("org/name"), or "builtin:NAME" (a small
    seeded random-weight model from `BUILTIN_CONFIGS`, no tokenizer). Extra keyword arguments go
    to `from_pretrained`.
    """
    from transformers import AutoConfig

    import workbench.models.blockffn  # noqa: F401  (registers the workbench's own architectures)

    dtype = resolve_dtype(dtype)
    check_device(device)
    if str(source).startswith("builtin:"):
        model = _build_builtin(str(source)[8:], dtype).eval()
        if device is not None:
            model = model.to(device)
        model.tokenizer = None
        model.wb_source = str(source)
        return model
    path, label = _resolve_source(source, revision=revision, cache_dir=cache_dir, allow_pickle=allow_pickle)
    _check_weights(path, allow_pickle)
    doc = _read_config_json(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:
        if "model_type" not in doc:
            raise ModelLoadError(f"{path / 'config.json'} has no model_type; it is not a transformers config "
                                 "(repair it or download the model again)") from exc
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}. If the model needs its own "
                             "code, pass trust_remote_code=True only if you trust it.") from exc
    for f in sorted(path.glob("*.safetensors")):
        _check_safetensors(f)
    load_kwargs = dict(kwargs, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle or None)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    model, last = None, None
    for cls in _model_classes(config):
        try:
            model = cls.from_pretrained(str(path), config=config, **load_kwargs)
            break
        except ValueError as exc:  # unrecognized configuration class for this auto class
            last = exc
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load weights from {path}: {exc}") from exc
    if model is None:
        raise ModelLoadError(f"no transformers model class for {path} (model_type "
                             f"{config.model_type!r}): {last}")
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    threshold = getattr(config, "activation_threshold", None)
    if threshold is not None and apply_threshold:
        apply_activation_threshold(model, float(threshold))
    model.tokenizer = load_tokenizer(path)
    model.wb_source = label
    return model
