"""Activation predictors (Deja Vu arXiv 2310.17157 / ProSparse arXiv 2402.13516 style).

Per FFN layer, a small MLP maps a hidden state x [tokens, d_model] to logits [tokens, d_ff]:
``logits = W2 relu(W1 x + b1) + b2`` with W1 [width, d_model], W2 [d_ff, width]. Labels are
``Rule.active(a, ...)`` (default rule `zero`: 1[a_i != 0]) captured from the model on valid
(non-padding) tokens; evaluation on held-out sequences: recall (true actives predicted active),
precision, predicted sparsity and true sparsity per layer.

Recipes (`recipe=`):

``"prosparse"`` (default) -- the public predictor trainer of the ProSparse authors:
    - loss: positive-weighted BCE. Per layer w = (mean training label) + 0.005; each positive
      label is weighted (1 - w), each negative w, and the loss is the mean over (token, neuron)
      of ``-[(1 - w) y log s(z) + w (1 - y) log(1 - s(z))]`` (`weighted_bce`). w is computed once
      per layer over all its training tokens (the public trainer takes it from its data too);
      without it a 90 %-sparse layer learns "always off" at threshold 0.5;
    - no biases (b1 = 0, b2 = 0 before the threshold is folded in);
    - input: the residual stream entering the FFN block (the input of the norm before the FFN,
      e.g. Llama's `post_attention_layernorm`), not the normalised FFN input;
    - width: the published 1024, capped at d_model for smaller models (``min(1024, d_model)``;
      a hidden layer wider than its input adds bytes faster than it adds recall; zoo:relu-llama:
      128). For a Llama-2-7B shape it is the published 1024.
``"plain"`` -- the workbench's earlier recipe: unweighted BCE, biases, the FFN input (after the
    norm), width ``min(1024, d_model // 4)``. Kept for comparison; on zoo:relu-llama it mostly
    says "off" (recall 0.3).

`loss`, `bias`, `input` and `width` override single parts of a recipe.

A neuron is predicted active when sigmoid(logit) >= threshold (ProSparse: 0.5). With
`target_recall` set, each layer's threshold is instead the largest one whose recall on that
layer's training tokens is >= target_recall (calibration; no held-out token is used).

File format (what `workbench.accel`'s predictor mode loads) -- a directory with two files:

``predictor.safetensors``
    per layer, with ``<name>`` the FFN's module path (e.g. ``model.layers.3.mlp``):
    ``<name>.w1`` [width, d_model], ``<name>.b1`` [width], ``<name>.w2`` [d_ff, width],
    ``<name>.b2`` [d_ff], float32 (zero biases for the bias-free recipe). The decision threshold
    is FOLDED into b2 (b2 = b2_trained - logit(threshold)), so a neuron is predicted active iff
    ``logits > 0``, exactly `kernels/predictor/reference.predictor_logits(x, w1, w2, b1, b2) > 0`
    with x the layer's predictor input (see "input").
``predictor.json``
    ``{"format": "workbench-predictor", "version": 2, "width": int|null (requested width),
    "threshold": float, "decision": "logits > 0", "threshold_folded": true,
    "input": "residual" | "ffn_input" (what x is: the residual stream entering the FFN block, or
    the FFN input after the norm), "recipe": str, "loss": "weighted_bce" | "bce", "bias": bool,
    "rule": Rule.to_json() of the labels, "model": {"source", "class", "model_type",
    "n_layers" (FFN layers of the model), "fingerprint" (sum |W_down| of each trained layer,
    float64, to refuse another model's file)}, "layers": [{"layer": int, "name": str,
    "d_model": int, "d_ff": int, "width": int, "threshold": float (this layer's sigmoid threshold,
    folded into b2), "recall", "precision", "predicted_sparsity", "true_sparsity": float,
    "keys": {"w1": "<name>.w1", "b1": ..., "w2": ..., "b2": ...}}]}``. Version 1 files (no
    "input") are read as ``"ffn_input"``.

`save_predictors(pred, path)` writes it, `load_predictors(path)` reads it back (also from a Run
directory where `Predictors.store(run)` put the same tensors under
``metrics/predictor/<name>.w1`` and the JSON under ``run.meta["metrics"]["predictor"]["info"]``).
`Predictors.check(model)` refuses a file trained on another model or another layer count;
`predictor_report(model, pred, data)` is the end-to-end check (per-layer table + perplexity with
the predicted masks vs the exact sparse mode vs dense).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.adapters import GATED
from workbench.capture.rules import Rule
from workbench.capture.run import Run
from workbench.errors import AdapterError, CaptureError, RunError, WorkbenchError
from workbench.metrics._data import (
    collect,
    ffn_sites,
    model_device,
    pre_ffn_norm,
    split_batches,
    token_batches,
)
from workbench.metrics.store import store

FORMAT = "workbench-predictor"
VERSION = 2
WEIGHTS = "predictor.safetensors"
CONFIG = "predictor.json"
INPUTS = ("residual", "ffn_input")
LOSSES = ("weighted_bce", "bce")
#: recipe name -> (loss, bias, input); the width rule is `default_width`
RECIPES = {"prosparse": ("weighted_bce", False, "residual"), "plain": ("bce", True, "ffn_input")}
#: added to the mean label to get the weight w of the weighted BCE (the public trainer's value)
WEIGHT_EPS = 0.005


class PredictorError(WorkbenchError):
    """A predictor that does not fit the model it is used with, or cannot be trained."""


def default_width(d_model: int, recipe: str = "prosparse") -> int:
    """Hidden width: "prosparse" min(1024, d_model) (the published 1024, capped at d_model for
    small models); "plain" min(1024, d_model // 4). At least 1."""
    if recipe == "plain":
        return max(1, min(1024, d_model // 4))
    return max(1, min(1024, d_model))


def weighted_bce(logits: torch.Tensor, y: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Positive-weighted BCE (ProSparse's predictor trainer): mean over elements of
    ``-[(1 - w) y log sigmoid(z) + w (1 - y) log(1 - sigmoid(z))]``; w = mean label + 0.005."""
    y = y.to(logits.dtype)
    weight = y * (1 - w) + (1 - y) * w
    return F.binary_cross_entropy_with_logits(logits, y, weight=weight)


class LayerPredictor(nn.Module):
    """Linear(d_model, width) - ReLU - Linear(width, d_ff); `threshold` is the sigmoid cut."""

    def __init__(self, d_model: int, d_ff: int, width: int, threshold: float = 0.5, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, width, bias=bias)
        self.fc2 = nn.Linear(width, d_ff, bias=bias)
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """logits [..., d_ff] (before the threshold)."""
        return self.fc2(F.relu(self.fc1(x)))

    @property
    def logit_threshold(self) -> float:
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return math.log(t / (1 - t))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask [..., d_ff] of neurons predicted active."""
        return self(x) >= self.logit_threshold

    def biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1, b2) as tensors, zeros where the layer has no bias."""
        b1 = self.fc1.bias if self.fc1.bias is not None else torch.zeros(self.fc1.out_features)
        b2 = self.fc2.bias if self.fc2.bias is not None else torch.zeros(self.fc2.out_features)
        return b1.detach(), b2.detach()


def prediction_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """recall, precision, predicted_sparsity, true_sparsity of boolean masks [tokens, d_ff]."""
    tp = int((pred & true).sum())
    n_true, n_pred, n = int(true.sum()), int(pred.sum()), true.numel()
    return {"recall": tp / n_true if n_true else float("nan"),
            "precision": tp / n_pred if n_pred else float("nan"),
            "predicted_sparsity": 1 - n_pred / n if n else float("nan"),
            "true_sparsity": 1 - n_true / n if n else float("nan")}


def model_fingerprint(sites) -> dict[str, float]:
    """{FFN name: sum |W_down|} in float64: survives dtype casts of the same weights (relative
    change < 1e-2), tells different checkpoints of one architecture apart."""
    return {s.name: float(s.down_weight().detach().double().abs().sum()) for s in sites}


@dataclass
class Predictors:
    """Trained predictors of one model: `layers[name]`, their layer indices and the eval table."""

    layers: dict[str, LayerPredictor]
    layer_index: dict[str, int]
    rule: Rule = field(default_factory=Rule)
    width: int | None = None
    threshold: float = 0.5
    metrics: pd.DataFrame | None = None
    model_info: dict = field(default_factory=dict)
    input: str = "residual"
    recipe: str = "prosparse"
    loss: str = "weighted_bce"
    bias: bool = False

    def predict(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.layers[name].predict(x)

    def check(self, model: nn.Module, sites=None) -> None:
        """Refuse (PredictorError) predictors trained on another model: another FFN layer count,
        layers this model lacks, other shapes, or other weights (fingerprint)."""
        sites = sites if sites is not None else ffn_sites(model)
        src = self.model_info.get("source") or "an unnamed model"
        here = getattr(model, "wb_source", None) or type(model).__name__
        fix = "train predictors on this model: workbench.metrics.train_predictors(model, texts)"
        n = self.model_info.get("n_layers")
        if n is not None and int(n) != len(sites):
            raise PredictorError(f"these predictors were trained on {src} with {n} FFN layers; {here} has "
                                 f"{len(sites)}: {fix}")
        by_name = {s.name: s for s in sites}
        missing = [name for name in self.layers if name not in by_name]
        if missing:
            raise PredictorError(f"these predictors (trained on {src}) cover {missing[:3]}, which {here} does not "
                                 f"have (its FFNs: {list(by_name)[:3]}...): {fix}")
        for name, p in self.layers.items():
            s = by_name[name]
            if (p.fc1.in_features, p.fc2.out_features) != (s.d_model, s.d_ff):
                raise PredictorError(f"{name}: the predictor maps {p.fc1.in_features} -> {p.fc2.out_features} but "
                                     f"the FFN of {here} is {s.d_model} -> {s.d_ff}: {fix}")
        fp = self.model_info.get("fingerprint") or {}
        now = model_fingerprint([by_name[k] for k in fp if k in by_name])
        for name, v in fp.items():
            if name in now and abs(now[name] - v) > 1e-2 * max(abs(v), 1e-12):
                raise PredictorError(f"these predictors were trained on {src}, whose weights differ from {here}'s "
                                     f"({name}: sum |W_down| {v:.6g} there, {now[name]:.6g} here): {fix}")

    # -- format ----------------------------------------------------------------------------
    def _tensors_and_config(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, layers = {}, []
        by_name = {}
        if self.metrics is not None:
            by_name = {r["name"]: r for r in self.metrics.to_dict("records")}
        for name, p in self.layers.items():
            keys = {k: f"{name}.{k}" for k in ("w1", "b1", "w2", "b2")}
            b1, b2 = p.biases()
            tensors[keys["w1"]] = p.fc1.weight.detach().float().cpu().contiguous()
            tensors[keys["b1"]] = b1.float().cpu().contiguous()
            tensors[keys["w2"]] = p.fc2.weight.detach().float().cpu().contiguous()
            tensors[keys["b2"]] = (b2.double() - p.logit_threshold).float().cpu().contiguous()
            m = by_name.get(name, {})
            layers.append({"layer": self.layer_index[name], "name": name, "d_model": p.fc1.in_features,
                           "d_ff": p.fc2.out_features, "width": p.fc1.out_features, "threshold": p.threshold,
                           **{k: _f(m.get(k)) for k in ("recall", "precision", "predicted_sparsity", "true_sparsity")},
                           "keys": keys})
        cfg = {"format": FORMAT, "version": VERSION, "width": self.width, "threshold": self.threshold,
               "decision": "logits > 0", "threshold_folded": True, "input": self.input, "recipe": self.recipe,
               "loss": self.loss, "bias": self.bias, "rule": self.rule.to_json(), "model": self.model_info,
               "layers": layers}
        return tensors, cfg

    def save(self, path: str | os.PathLike) -> Path:
        return save_predictors(self, path)

    def store(self, run: Run, name: str = "predictor") -> None:
        """Put the predictor (tensors + config) and its evaluation table into `run`."""
        tensors, cfg = self._tensors_and_config()
        df = self.metrics if self.metrics is not None else pd.DataFrame()
        store(run, name, df, tensors=tensors, info={"config": cfg})


def _f(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def save_predictors(pred: Predictors, path: str | os.PathLike) -> Path:
    """Write `pred` to directory `path` (predictor.safetensors + predictor.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, cfg = pred._tensors_and_config()
    save_file(tensors, str(path / WEIGHTS), metadata={"format": FORMAT})
    (path / CONFIG).write_text(json.dumps(cfg, indent=2))
    return path


def _from(tensors: dict[str, torch.Tensor], cfg: dict, where: str) -> Predictors:
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("version"), int) or cfg["version"] > VERSION:
        raise RunError(f"{where}: not a {FORMAT} v<={VERSION} config (format {cfg.get('format')!r}, "
                       f"version {cfg.get('version')!r})")
    inp = cfg.get("input", "ffn_input")  # version 1 predictors read the FFN input
    if inp not in INPUTS:
        raise RunError(f"{where}: unknown predictor input {inp!r} (expected one of {INPUTS})")
    layers, index, rows = {}, {}, []
    for L in cfg["layers"]:
        k = L["keys"]
        missing = [v for v in k.values() if v not in tensors]
        if missing:
            raise RunError(f"{where}: layer {L['layer']} ({L['name']}) lacks tensors {missing}; the file is damaged")
        p = LayerPredictor(L["d_model"], L["d_ff"], L["width"], threshold=0.5)
        with torch.no_grad():
            p.fc1.weight.copy_(tensors[k["w1"]])
            p.fc1.bias.copy_(tensors[k["b1"]])
            p.fc2.weight.copy_(tensors[k["w2"]])
            p.fc2.bias.copy_(tensors[k["b2"]])  # threshold folded: predict() at 0.5 == logits >= 0
        layers[L["name"]] = p
        index[L["name"]] = int(L["layer"])
        rows.append({kk: L.get(kk) for kk in ("layer", "name", "width", "threshold", "recall", "precision",
                                               "predicted_sparsity", "true_sparsity")})
    return Predictors(layers, index, rule=Rule.from_json(cfg["rule"]), width=cfg.get("width"),
                      threshold=float(cfg.get("threshold", 0.5)), metrics=pd.DataFrame(rows),
                      model_info=cfg.get("model", {}), input=inp, recipe=cfg.get("recipe", "plain"),
                      loss=cfg.get("loss", "bce"), bias=bool(cfg.get("bias", True)))


def load_predictors(path: str | os.PathLike, model: nn.Module | None = None) -> Predictors:
    """Read a predictor directory (or a saved Run that stored one) written by this module; with
    `model`, refuse one trained on another model (`Predictors.check`). "zoo:NAME" is the zoo
    model's committed predictor directory, data/zoo/NAME/predictor."""
    if str(path).startswith("zoo:"):
        from workbench.models.zoo import ZOO_DIR

        path = ZOO_DIR / str(path)[4:] / "predictor"
        if not (path / CONFIG).is_file():
            raise RunError(f"{path} holds no committed predictor; train one with "
                           f"`python -m workbench.metrics.predictor {path.parent.name} --out {path}`")
    path = Path(path)
    if (path / CONFIG).is_file():
        try:
            cfg = json.loads((path / CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{path / CONFIG} is not valid JSON ({exc})") from exc
        if not (path / WEIGHTS).is_file():
            raise RunError(f"{path / WEIGHTS} is missing; re-save the predictor")
        pred = _from(load_file(str(path / WEIGHTS)), cfg, str(path))
    elif (path / "run.json").is_file():
        run = Run.load(path)
        entry = run.meta.get("metrics", {}).get("predictor")
        if entry is None:
            raise RunError(f"run {path} holds no predictor; train one and call .store(run) before saving")
        prefix = "metrics/predictor/"
        tensors = {k[len(prefix):]: v for k, v in run.tensors.items() if k.startswith(prefix)}
        pred = _from(tensors, entry["info"]["config"], str(path))
    else:
        raise RunError(f"{path} holds neither {CONFIG} nor a run.json; save predictors with save_predictors")
    if model is not None:
        pred.check(model)
    return pred


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_train_args(*, epochs, batch_tokens, lr, weight_decay, threshold, target_recall, width, holdout,
                      max_tokens, eval_data):
    if not _is_int(epochs) or epochs < 1:
        raise PredictorError(f"epochs={epochs!r}: give a whole number of passes >= 1 (default 30)")
    if not _is_int(batch_tokens) or batch_tokens < 1:
        raise PredictorError(f"batch_tokens={batch_tokens!r}: give a whole number of tokens per step >= 1 "
                             "(default 512)")
    if not _is_real(lr) or lr <= 0:
        raise PredictorError(f"lr={lr!r}: the learning rate must be a finite number > 0 (default 3e-3)")
    if not _is_real(weight_decay) or weight_decay < 0:
        raise PredictorError(f"weight_decay={weight_decay!r}: give a finite number >= 0 (default 0.0)")
    if not _is_real(threshold) or not 0 < threshold < 1:
        raise PredictorError(f"threshold={threshold!r}: the predicted probability above which a neuron counts "
                             "as active must be strictly between 0 and 1 (default 0.5)")
    if target_recall is not None and (not _is_real(target_recall) or not 0 < target_recall <= 1):
        raise PredictorError(f"target_recall={target_recall!r}: give a recall in (0, 1], e.g. 0.99, or None to "
                             "keep `threshold`")
    if width is not None and (not _is_int(width) or width < 1):
        raise PredictorError(f"width={width!r}: the predictor's hidden width must be a whole number >= 1, or None "
                             "for the recipe's default")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise PredictorError(f"max_tokens={max_tokens!r}: give a whole number of tokens >= 1 per split, or None "
                             "for all of them")
    if eval_data is None and (not _is_real(holdout) or not 0 < holdout < 1):
        raise PredictorError(f"holdout={holdout!r}: without eval_data, the held-out fraction of the sequences "
                             "must be strictly between 0 and 1 (default 0.25); or pass eval_data=...")


def _check_layers(layers, all_sites) -> list[int] | None:
    if layers is None:
        return None
    if _is_int(layers):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise PredictorError(f"layers={layers!r}: give a list of FFN layer indices, or None for all of them")
    layers = list(layers)
    have = sorted(s.layer for s in all_sites)
    if not layers:
        raise PredictorError(f"layers=[]: no layer to train a predictor for; give some of the model's FFN layers "
                             f"{have}, or None for all of them")
    if not all(_is_int(la) for la in layers):
        raise PredictorError(f"layers={layers!r}: layer indices must be whole numbers; the model's FFN layers "
                             f"are {have}")
    bad = [la for la in layers if la not in have]
    if bad:
        raise PredictorError(f"layer(s) {bad} do not exist: the model's FFN layers are {have}")
    return layers


def train_predictors(model: nn.Module, data, *, eval_data=None, rule="zero", recipe: str = "prosparse",
                     width: int | None = None, input: str | None = None, loss: str | None = None,
                     bias: bool | None = None, threshold: float = 0.5, target_recall: float | None = None,
                     holdout: float = 0.25, max_tokens: int | None = 8192, epochs: int = 30, lr: float = 3e-3,
                     batch_tokens: int = 512, weight_decay: float = 0.0, seed: int = 0,
                     tokenizer=None, batch_size: int = 8, max_length: int | None = 256,
                     layers: list[int] | None = None, device=None) -> Predictors:
    """Train one predictor per FFN layer on captured activations and evaluate it on held-out tokens.

    data: training texts/Documents/ids (+ `eval_data` for the held-out set; if None the last
    `holdout` fraction of the sequences of `data` is held out). rule: what "active" means for the
    labels (any pinned rule, e.g. the CETT `Rule.magnitude(thresholds)` for SiLU models).
    recipe: "prosparse" (default: weighted BCE, no biases, the residual stream entering the FFN
    block, width min(1024, d_model)) or "plain" (BCE, biases, FFN input, min(1024, d_model // 4));
    `width`, `input` ("residual" | "ffn_input"), `loss` ("weighted_bce" | "bce") and `bias`
    override parts of it. Returns Predictors with `.metrics`: layer, name, width, threshold,
    recall, precision, predicted_sparsity, true_sparsity, pos_weight_w, train_tokens, eval_tokens.
    Raises PredictorError naming the layer when its training tokens hold no active neuron, or no
    inactive one (rule 'zero' on SiLU/GELU: use 'fat(T)' or a CETT rule), and naming the argument for
    layers that do not exist, epochs / batch_tokens / width / max_tokens < 1, lr <= 0, threshold outside
    (0, 1), target_recall outside (0, 1] or holdout outside (0, 1) without eval_data.
    """
    if recipe not in RECIPES:
        raise PredictorError(f"recipe {recipe!r}: use one of {sorted(RECIPES)}")
    r_loss, r_bias, r_input = RECIPES[recipe]
    loss = loss or r_loss
    bias = r_bias if bias is None else bool(bias)
    input = input or r_input
    if loss not in LOSSES:
        raise PredictorError(f"loss {loss!r}: use one of {LOSSES}")
    if input not in INPUTS:
        raise PredictorError(f"input {input!r}: use 'residual' (the residual stream entering the FFN block) or "
                             "'ffn_input' (the FFN's input after its norm)")
    _check_train_args(epochs=epochs, batch_tokens=batch_tokens, lr=lr, weight_decay=weight_decay,
                      threshold=threshold, target_recall=target_recall, width=width, holdout=holdout,
                      max_tokens=max_tokens, eval_data=eval_data)
    rule = Rule.parse(rule)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    all_sites = ffn_sites(model)
    layers = _check_layers(layers, all_sites)
    sites = all_sites if layers is None else [s for s in all_sites if s.layer in set(layers)]
    batches = token_batches(data, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    if eval_data is None:
        train_b, eval_b = split_batches(batches, holdout)
    else:
        train_b = batches
        eval_b = token_batches(eval_data, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    dev = torch.device(device) if device is not None else model_device(model)
    want_g = any(rule.needs_gate_act(s.kind == GATED) for s in sites)
    if input == "residual":
        try:
            for s in sites:
                pre_ffn_norm(model, s)
        except AdapterError as exc:
            # post-norm models (BERT) have no norm before the FFN: their FFN input is the residual stream
            warnings.warn(f"{exc}; these predictors read the FFN input (input='ffn_input')", RuntimeWarning,
                          stacklevel=2)
            input = "ffn_input"
    xkey = "r" if input == "residual" else "x"
    kw = dict(sites=sites, want_x=input == "ffn_input", want_r=input == "residual", want_g=want_g,
              max_tokens=max_tokens, store_device=dev)
    tr = collect(model, train_b, **kw)
    ev = collect(model, eval_b, **kw)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    preds, index, rows = {}, {}, []
    for s in sites:
        w = width or default_width(s.d_model, recipe)
        norms = s.down_column_norms().to(dev) if rule.needs_down_norms() else None
        where = f"layer {s.layer} ({s.name})"

        def labels(d, s=s, norms=norms):
            return rule.active(d["a"], d.get("g"), layer=s.layer, gated=s.kind == GATED, down_norms=norms)

        y_tr, y_ev = labels(tr[s.name]), labels(ev[s.name])
        if not bool(y_tr.any()):
            raise PredictorError(
                f"{where}: no neuron is active on any of the {y_tr.shape[0]} training tokens under rule "
                f"{rule.kind!r}, so there is nothing to predict (recall would be undefined, the loss weight "
                "degenerate); train on more or other data, use another rule, or leave the layer out with "
                "layers=[...]")
        if bool(y_tr.all()):
            hint = ("the activation has no exact zeros (SiLU/GELU), so under 'zero' every neuron counts as active; "
                    if rule.kind == "zero" else "")
            raise PredictorError(
                f"{where}: every neuron is active on every one of the {y_tr.shape[0]} training tokens under rule "
                f"'{rule}': {hint}there is no inactive neuron to "
                "predict; use a rule that leaves some neurons inactive, e.g. rule='fat(0.01)' or a CETT rule "
                "(Rule.magnitude(thresholds) from cett_thresholds)")
        x_tr, x_ev = tr[s.name][xkey].float(), ev[s.name][xkey].float()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        p = LayerPredictor(s.d_model, s.d_ff, w, threshold, bias=bias).to(dev)
        pos_w = float(y_tr.float().mean()) + WEIGHT_EPS if loss == "weighted_bce" else None
        _fit(p, x_tr, y_tr.float(), epochs=epochs, lr=lr, batch_tokens=batch_tokens,
             weight_decay=weight_decay, gen=gen, where=where, pos_w=pos_w)
        if target_recall is not None:
            p.threshold = _threshold_for_recall(p, x_tr, y_tr, target_recall)
        with torch.no_grad():
            m = prediction_metrics(p.predict(x_ev), y_ev)
        note = ""
        if not bool(y_ev.any()):
            note = "no active neuron in the held-out tokens: recall undefined"
            warnings.warn(f"{where}: {note}", RuntimeWarning, stacklevel=2)
        preds[s.name], index[s.name] = p.cpu().eval(), s.layer
        rows.append({"layer": s.layer, "name": s.name, "width": w, "threshold": p.threshold, **m,
                     "pos_weight_w": pos_w, "train_tokens": int(x_tr.shape[0]), "eval_tokens": int(x_ev.shape[0]),
                     "note": note})
    info = {"source": getattr(model, "wb_source", None), "class": type(model).__name__,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "n_layers": len(all_sites), "fingerprint": model_fingerprint(sites)}
    return Predictors(preds, index, rule=rule, width=width, threshold=threshold, metrics=pd.DataFrame(rows),
                      model_info=info, input=input, recipe=recipe, loss=loss, bias=bias)


def _fit(p: LayerPredictor, x: torch.Tensor, y: torch.Tensor, *, epochs, lr, batch_tokens, weight_decay, gen, where,
         pos_w: float | None = None):
    if x.shape[0] == 0:
        raise CaptureError(f"{where}: no training tokens for the predictor (empty dataset?)")
    opt = torch.optim.AdamW(p.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    steps = epochs * max(1, math.ceil(n / batch_tokens))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    p.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for i in range(0, n, batch_tokens):
            idx = perm[i:i + batch_tokens]
            z = p(x[idx])
            if pos_w is None:
                loss = F.binary_cross_entropy_with_logits(z, y[idx])
            else:
                loss = weighted_bce(z, y[idx], pos_w)
            if not torch.isfinite(loss):
                raise WorkbenchError(f"{where}: predictor loss became NaN/Inf; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    p.eval()


def _threshold_for_recall(p: LayerPredictor, x: torch.Tensor, y: torch.Tensor, target: float) -> float:
    """Largest sigmoid threshold with training recall >= target."""
    with torch.no_grad():
        prob = torch.sigmoid(p(x).double())[y]
    if prob.numel() == 0:
        return p.threshold
    # recall(th) = mean(prob >= th); the (1 - target) quantile of the positives' probabilities
    n = prob.numel()
    k = min(n, max(1, int(math.floor((1 - target) * n)) + 1))
    return float(prob.reshape(-1).kthvalue(k).values)


@dataclass
class PredictorReport:
    """Is a predictor good enough? `layers`: one row per FFN layer (layer, name, recall,
    precision, predicted_sparsity, true_sparsity, tokens, note) over the report's tokens;
    `summary`: their means, and the perplexity of the same tokens dense, in the exact sparse mode
    and with the predicted masks (`accelerate` handle, `backend`; "torch" is the reference path
    that runs on CPU), with the tokens counted and what the predictors read."""

    layers: pd.DataFrame
    summary: dict

    def __repr__(self) -> str:
        s = self.summary
        return (f"PredictorReport({s['tokens']} tokens, input={s['input']}, recipe={s['recipe']}: mean recall "
                f"{s['mean_recall']:.3f}, precision {s['mean_precision']:.3f}, predicted sparsity "
                f"{s['predicted_sparsity']:.3f} vs true {s['true_sparsity']:.3f}; perplexity dense "
                f"{s['ppl_dense']:.4f}, exact {s['ppl_exact']:.4f}, predicted masks {s['ppl_predictor']:.4f} "
                f"({s['ppl_predictor_increase']:+.2%}))\n{self.layers.round(4).to_string(index=False)}")


def predictor_report(model: nn.Module, predictors, data, *, tokenizer=None, batch_size: int = 8,
                     max_length: int | None = 256, backend: str = "torch", max_tokens: int | None = None
                     ) -> PredictorReport:
    """Per-layer recall / precision / predicted vs true sparsity of `predictors` (a Predictors, or
    a directory saved by `save_predictors`) on `data` (use held-out texts: not those it was trained
    on), and the end-to-end effect: perplexity on the same tokens with the predicted masks
    (`workbench.accelerate(model, mode="predictor")`) against the exact sparse mode (every call
    through the exact sparse FFN, not only decode calls) and the dense model.

    The model must be bf16/fp16 (the kernels' dtypes). Refuses predictors of another model
    (PredictorError). A layer whose tokens hold no active neuron has recall NaN and says so in
    its `note`.
    """
    from workbench.accel import accelerate
    from workbench.metrics.ppl import nll

    pred = predictors if isinstance(predictors, Predictors) else load_predictors(predictors)
    sites = ffn_sites(model)
    pred.check(model, sites)
    sites = [s for s in sites if s.name in pred.layers]
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    batches = token_batches(data, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    rule = pred.rule
    want_g = any(rule.needs_gate_act(s.kind == GATED) for s in sites)
    rows_ = collect(model, batches, sites=sites, want_x=pred.input == "ffn_input", want_r=pred.input == "residual",
                    want_g=want_g, max_tokens=max_tokens)
    xkey = "r" if pred.input == "residual" else "x"
    rows = []
    for s in sites:
        d = rows_[s.name]
        norms = s.down_column_norms().to(d["a"].device) if rule.needs_down_norms() else None
        y = rule.active(d["a"], d.get("g"), layer=s.layer, gated=s.kind == GATED, down_norms=norms)
        p = pred.layers[s.name].to(d[xkey].device)
        with torch.no_grad():
            m = prediction_metrics(p.predict(d[xkey].float()), y)
        note = "" if bool(y.any()) else "no active neuron in these tokens: recall undefined"
        rows.append({"layer": s.layer, "name": s.name, **m, "tokens": int(y.shape[0]), "note": note})
    layers = pd.DataFrame(rows)
    dense = nll(model, batches)
    with accelerate(model, mode="exact", backend=backend, decode_tokens=1 << 30):
        exact = nll(model, batches)
    with accelerate(model, mode="predictor", backend=backend, predictors=pred):
        predicted = nll(model, batches)
    summary = {"tokens": int(layers.tokens.iloc[0]) if len(layers) else 0, "input": pred.input,
               "recipe": pred.recipe, "backend": backend,
               "mean_recall": float(layers.recall.mean()), "mean_precision": float(layers.precision.mean()),
               "predicted_sparsity": float(layers.predicted_sparsity.mean()),
               "true_sparsity": float(layers.true_sparsity.mean()),
               "max_sparsity_gap": float((layers.true_sparsity - layers.predicted_sparsity).abs().max()),
               "ppl_tokens": dense.tokens, "ppl_dense": dense.ppl, "ppl_exact": exact.ppl,
               "ppl_predictor": predicted.ppl, "ppl_predictor_increase": predicted.ppl / dense.ppl - 1}
    return PredictorReport(layers, summary)


def main(argv=None) -> PredictorReport:
    """Train a zoo model's predictors at the defaults and check them on held-out tokens:

        python -m workbench.metrics.predictor relu-llama --out data/zoo/relu-llama/predictor

    trains on the zoo's train-split documents (`zoo_report.predictor_result`), saves the
    predictors to --out and writes report.json there (`predictor_report` on the held-out
    validation documents: per-layer table, perplexity dense / exact / predicted masks)."""
    import argparse
    import time

    from workbench.metrics.zoo_report import SETTINGS, load, predictor_result, zoo_batches

    ap = argparse.ArgumentParser(prog="python -m workbench.metrics.predictor", description=main.__doc__.split("\n")[0])
    ap.add_argument("model", help="zoo model name, e.g. relu-llama")
    ap.add_argument("--out", required=True, help="directory for predictor.safetensors, predictor.json, report.json")
    ap.add_argument("--recipe", default="prosparse", choices=sorted(RECIPES))
    args = ap.parse_args(argv)
    t0 = time.time()
    pred = predictor_result(args.model, recipe=args.recipe)
    train_s = time.time() - t0
    out = save_predictors(pred, args.out)
    model = load(args.model)
    held_out = zoo_batches(model, n_docs=SETTINGS["predictor_eval_docs"])
    rep = predictor_report(model, pred, held_out)
    cmd = f"python -m workbench.metrics.predictor {args.model} --out {args.out}" + (
        f" --recipe {args.recipe}" if args.recipe != "prosparse" else "")
    doc = {"command": cmd, "train_seconds": round(train_s, 1), "torch": torch.__version__,
           "held_out": f"the first {SETTINGS['predictor_eval_docs']} validation documents of the zoo corpus, "
                       f"{SETTINGS['max_length']} tokens each at most",
           "train": f"{SETTINGS['predictor_train_docs']} train-split documents (evenly spaced); the first "
                    f"{int(pred.metrics.train_tokens.iloc[0])} tokens",
           "summary": rep.summary, "layers": rep.layers.to_dict("records")}
    (out / "report.json").write_text(json.dumps(doc, indent=2))
    print(rep)
    return rep


if __name__ == "__main__":  # run the package's module, not this __main__ copy (one Predictors class)
    from workbench.metrics.predictor import main as _main

    _main()
