"""Training and measurement of the zoo models (CPU or CUDA).

``train(name, device=..., seed=..., out=...)`` builds the model of ``zoo.SPECS[name]``, trains it
on the committed corpus (workbench.models.corpus) with the zoo tokenizer, measures it on the
validation split (per-domain loss / perplexity, unigram perplexity of the same tokens, sparsity
figures) and writes an HF directory: config.json, model.safetensors (bf16), tokenizer files,
metrics.json and the README.md model card.

Recipes (see zoo.ZooSpec):

- ProSparse (arXiv 2402.13516) for relu-llama: ReLU FFN + L1 penalty on the FFN activations
  (the ReLU outputs, whose zeros are what rule `zero` counts) with a factor rising along a
  sine ramp from ``l1_start`` to ``l1_end`` (fractions of training), then held.
- BlockFFN (arXiv 2507.08771): activation locality (BCE with logits between the previous
  token's alpha*A0 and sigmoid(alpha*A0) of the current one) and chunk sparsification
  (mean over chunks of L tokens of P_act,i = 1 - prod_k (1 - p_ik)), both averaged over layers.
- Mixtral: the model's own load-balancing loss; Mamba-2 and the SiLU twin: plain LM loss.

Measurement conventions (also stated on every card): weights are saved in bf16 and evaluated
after an upcast to float32; the validation split is tokenized per document and cut into
non-overlapping windows of ``seq_len`` tokens (a tail of >= 16 tokens is kept, right-padded);
loss is the mean next-token NLL over all predicted tokens; unigram perplexity uses add-one
smoothed token frequencies of the train split, on the same predicted tokens. The "quick"
figures use the first QUICK_WINDOWS windows of each domain; tests recompute them on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.metrics.chunk import ChunkSparsityMeter
from workbench.models import zoo
from workbench.models.corpus import DOMAINS, load_split

QUICK_WINDOWS = 4
#: stated reproducibility tolerance of the validation loss for a rerun (same corpus and seed)
REPRO_TOLERANCE_NATS = 0.05
CLS_LENGTHS = (1, 2, 4, 8, 16, 32, 64)
MIN_TAIL = 16


# ----------------------------------------------------------------------------- data


def _tokenizer():
    from workbench.models.tokenizer import load

    return load()


def _cache_dir() -> Path:
    d = Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _corpus_key() -> str:
    from workbench.models.corpus import manifest
    from workbench.models.tokenizer import TOKENIZER_DIR

    h = hashlib.sha256()
    for s in manifest()["shards"]:
        h.update(s["sha256"].encode())
    h.update((TOKENIZER_DIR / "tokenizer.json").read_bytes())
    return h.hexdigest()[:16]


def train_tokens() -> np.ndarray:
    """The train split as one uint16 token stream (documents separated by EOS), cached."""
    path = _cache_dir() / f"zoo-train-{_corpus_key()}.npy"
    if path.is_file():
        return np.load(path)
    tok = _tokenizer()
    docs = load_split("train")
    ids = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    arr = np.fromiter(
        (t for seq in ids for t in (*seq, eos)), dtype=np.uint16, count=sum(len(s) + 1 for s in ids)
    )
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def validation_windows(seq_len: int = 256) -> list[tuple[str, list[int]]]:
    """(domain, token ids) windows of the validation split, in a fixed order (by document id)."""
    tok = _tokenizer()
    docs = sorted(load_split("validation"), key=lambda d: d.id)
    ids = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
    out = []
    for d, seq in zip(docs, ids):
        for i in range(0, len(seq), seq_len):
            w = seq[i : i + seq_len]
            if len(w) >= MIN_TAIL:
                out.append((d.domain, w))
    return out


def long_sequences(total: int = 4096, n_seq: int = 4) -> torch.Tensor:
    """(n_seq, total) token ids: the validation documents (by id) joined with EOS as in
    training, cut into consecutive slices of `total`, `n_seq` of them evenly spaced."""
    tok = _tokenizer()
    docs = sorted(load_split("validation"), key=lambda d: d.id)
    ids = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
    stream = [t for seq in ids for t in (*seq, tok.eos_token_id)]
    have = len(stream) // total
    n_seq = min(n_seq, have)
    pick = [int(i * have / n_seq) for i in range(n_seq)]
    return torch.tensor([stream[i * total : (i + 1) * total] for i in pick], dtype=torch.long)


def mamba2_drift(model, total: int = 4096, n_seq: int = 8, chunk: int = 128) -> dict:
    """Stuffed-Mamba state drift of a Mamba-2 zoo model (workbench.metrics.state.state_drift)
    on `n_seq` validation sequences of `total` tokens, chunk by chunk with the state carried."""
    from workbench.metrics.state import state_drift

    return state_drift(model, long_sequences(total, n_seq), chunk=chunk)


PASSKEY_LENGTHS = (1, 2, 3, 4, 8, 16, 64)  # x the training length
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def passkey_eval(model, tok, seq_len: int, n_keys: int = 16, seed: int = 0) -> dict:
    """The state-capacity card's passkey grid (workbench.metrics.passkey.passkey_grid) at
    PASSKEY_LENGTHS x the training length and PASSKEY_DEPTHS, `n_keys` seeded keys per cell."""
    from workbench.metrics.passkey import passkey_grid

    lengths = [f * seq_len for f in PASSKEY_LENGTHS]
    df = passkey_grid(model, tok, lengths, PASSKEY_DEPTHS, n_keys=n_keys, seed=seed)
    return {"lengths": lengths, "depths": list(PASSKEY_DEPTHS), "n_keys": n_keys, "seed": seed,
            "rule": df.attrs["setup"]["rule"],
            "accuracy": [[float(df[(df.length == L) & (df.depth == d)].accuracy.iloc[0])
                          for d in PASSKEY_DEPTHS] for L in lengths]}


def state_figures(model, seq_len: int, *, n_seq: int = 4, mults=(16, 64), bucket: int = 128,
                  chunk: int = 512, tol: float = 0.5, train_len: int | None = None) -> dict:
    """Stuffed-Mamba state statistics of a Mamba-2 zoo model past its training length `seq_len`
    (workbench.metrics.state.state_scan on `n_seq` validation sequences of max(mults) x seq_len
    tokens, `bucket`-token buckets, `chunk` tokens per forward): per layer, the head-mean of rms,
    cos, usage and erank at seq_len and at each multiple, the loss per position range, and the
    collapse flags (metrics.state.collapse, rule stated) counted per statistic, past `train_len`
    (default seq_len; a two-stage model passes its final training length, and then the flags past
    seq_len are kept too, as ``collapse_at_seq_len``)."""
    from workbench.metrics import state as ms

    total = max(mults) * seq_len
    run = ms.state_scan(model, long_sequences(total, n_seq), bucket=bucket, chunk=chunk)
    heads = ms.head_stats(run)
    layers = ms.layer_stats(run)
    at = [seq_len] + [m * seq_len for m in mults]
    per = heads.groupby(["layer", "position"])[["rms", "cos", "usage", "erank", "decay"]].mean()
    out = {"n_seq": int(run.meta["data"]["n_seq"]), "total": total, "bucket": bucket, "chunk": chunk,
           "positions": at, "layers": {}}
    for lay in sorted(heads.layer.unique()):
        lrms = layers[layers.layer == lay].set_index("position").rms
        out["layers"][str(lay)] = {
            "rms": [float(lrms[p]) for p in at],
            **{k: [float(per.loc[(lay, p), k]) for p in at] for k in ("cos", "usage", "erank", "decay")}}
    lo = layers[layers.layer == layers.layer.min()].set_index("position").loss
    edges = [0, seq_len] + [m * seq_len for m in (2, 4, 16, 64) if m * seq_len <= total]
    out["loss"] = {f"{a}-{b}": float(lo[(lo.index > a) & (lo.index <= b)].mean()) for a, b in zip(edges[:-1], edges[1:])}
    def flags_at(ref):
        flags = ms.collapse(run, ref, tol=tol)
        return {"rule": flags.attrs["rule"], "train_len": ref,
                "n_heads": int(heads.groupby(["layer", "head"]).ngroups),
                "by_stat": {s: {"heads": int(len(g)), "first": int(g.position.min()),
                                "median_position": float(g.position.median())}
                            for s, g in flags.groupby("stat")}}

    out["collapse"] = flags_at(train_len or seq_len)
    if train_len and train_len != seq_len:
        out["collapse_at_seq_len"] = flags_at(seq_len)
    return out


def finish_from_checkpoint(name: str, log_path: str, *, seed: int = 0, n_keys: int = 2) -> dict:
    """Measure and card a zoo model whose training process saved its checkpoint but was stopped
    before its own measurements (the state-capacity pair, for time): the same validation figures
    as `train`, the passkey grid (`n_keys` per cell) and the state figures; steps, curve and
    training time come from the training log `log_path` (the lines `train` printed)."""
    out = zoo.ZOO_DIR / name
    spec = zoo.spec(name)
    recipe = dict(spec.recipe)
    lines = [ln for ln in Path(log_path).read_text().splitlines() if ln.startswith(f"[{name}] ")]
    recs = []
    for ln in lines:
        body = ln[len(name) + 3:]
        if body.startswith("{"):
            js, _, rest = body.partition("} val_quick ")
            r = json.loads(js + "}")
            r["val_loss_quick"] = float(rest)
            recs.append(r)
    steps = recs[-1]["step"]
    B, T = recipe["batch_size"], recipe["seq_len"]
    model, tok = load_zoo_model(name)
    uni = unigram_logprobs(model.config.vocab_size)
    windows = validation_windows(T)
    from workbench.models.ssd import fast_scan

    with fast_scan():
        ev = evaluate(model, windows, spec.sparsity, unigram=uni)
        evq = evaluate(model, quick_windows(windows), spec.sparsity, unigram=uni)
        pk = passkey_eval(model, tok, T, n_keys=n_keys)
        sf = state_figures(model, T, n_seq=2)
    import transformers

    metrics = {
        "name": name, "family": spec.family, "description": spec.description, "params": n_params(model),
        "seed": seed, "recipe": recipe, "steps": steps, "tokens_seen": steps * B * T, "device": "cpu",
        "train_time_s": recs[-1]["elapsed_s"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "validation": ev, "validation_quick": evq, "quick_windows_per_domain": QUICK_WINDOWS,
        "passkey": pk, "state_figures": sf,
        "curve": [{"step": r["step"], "tokens": r["step"] * B * T, "train_loss": r["loss"],
                   "val_loss_quick": r["val_loss_quick"]} for r in recs],
        "history": [{k: r[k] for k in ("step", "loss", "lr", "elapsed_s")} for r in recs],
        "checkpoint_sha256": zoo._sha256(out / zoo.CHECKPOINT),
        "train_command": f"workbench zoo train {name} --overwrite --seed {seed} --steps {steps} --device cpu",
        "notes": [
            "Trained on a shared 2-core machine (nice 10, 1 thread, ~12 % of a core at times); the "
            "training process saved the checkpoint and was then stopped before its own measurements "
            "to save time; the figures on this card were measured from the saved checkpoint with "
            f"`python -m workbench.models.train finish {name} LOG` (history: the logged steps only).",
        ],
    }
    (out / zoo.METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
    write_card(out, metrics)
    return metrics


def _recard(name: str, update) -> dict:
    """Load zoo model `name`, let update(metrics, model, tok) change its metrics, save them and
    re-render its card."""
    d = zoo.ZOO_DIR / name
    m = json.loads((d / zoo.METRICS).read_text())
    model, tok = load_zoo_model(name)
    update(m, model, tok)
    (d / zoo.METRICS).write_text(json.dumps(m, indent=1) + "\n")
    write_card(d, m)
    return m


def state_card(name: str) -> dict:
    """Add the state figures (and the passkey grid if missing) of zoo model `name` to its
    metrics.json and re-render its card."""
    def update(m, model, tok):
        from workbench.models.ssd import fast_scan

        with fast_scan():
            m["state_figures"] = state_figures(model, m["recipe"]["seq_len"])
            if m["recipe"].get("passkey_share") and "passkey" not in m:
                m["passkey"] = passkey_eval(model, tok, m["recipe"]["seq_len"])

    return _recard(name, update)


def passkey_card(name: str, n_keys: int = 16, seed: int = 0) -> dict:
    """Re-measure the passkey grid of zoo model `name` (passkey_eval) into its metrics.json and
    re-render its card."""
    def update(m, model, tok):
        from workbench.models.ssd import fast_scan

        with fast_scan():  # the same math as transformers' reference scan, faster on the CPU
            m["passkey"] = passkey_eval(model, tok, m["recipe"]["seq_len"], n_keys=n_keys, seed=seed)

    return _recard(name, update)


def quick_windows(windows, n: int = QUICK_WINDOWS):
    out = []
    for dom in DOMAINS:
        out.extend([w for w in windows if w[0] == dom][:n])
    return out


def unigram_logprobs(vocab_size: int) -> torch.Tensor:
    counts = np.bincount(train_tokens(), minlength=vocab_size).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


# ----------------------------------------------------------------------------- models


def build_model(spec: zoo.ZooSpec):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Mamba2Config,
        Mamba2ForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    from workbench.models.blockffn import BlockFFNConfig, BlockFFNForCausalLM

    cfg = dict(spec.config)
    if spec.family == "llama":
        return LlamaForCausalLM(LlamaConfig(**cfg))
    if spec.family == "blockffn":
        return BlockFFNForCausalLM(BlockFFNConfig(**cfg))
    if spec.family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**cfg))
    if spec.family == "mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(**cfg))
        init_mamba2_decay(model, spec.recipe.get("a_init"))
        return model
    raise ValueError(f"unknown family {spec.family!r}")


@torch.no_grad()
def init_mamba2_decay(model, a_init) -> None:
    """Slow-decay initialisation of a Mamba-2: A = -exp(A_log) log-spaced over the heads in
    [lo, hi] (transformers' default is A = 1..num_heads) in every layer. With the dt range of
    the config (time_step_min/max, softplus(dt_bias)) this sets the per-token decay
    dA = exp(dt * A) at initialisation; None keeps the transformers init."""
    if not a_init:
        return
    lo, hi = float(a_init[0]), float(a_init[1])
    for layer in model.backbone.layers:
        mix = layer.mixer
        a = torch.logspace(math.log10(lo), math.log10(hi), mix.num_heads, dtype=torch.float32)
        mix.A_log.copy_(torch.log(a).to(mix.A_log.dtype))


def n_params(model) -> int:
    # tied embeddings are counted once
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- measurement


class _Probe:
    """Collects per-layer activity masks and the ReLU outputs during a forward pass."""

    def __init__(self, model, kind: str):
        self.kind = kind
        self.handles = []
        self.masks: dict[int, torch.Tensor] = {}
        self.acts: list[torch.Tensor] = []
        self.keep_acts = False
        if kind == "neuron":
            for i, layer in enumerate(model.model.layers):
                self.handles.append(
                    layer.mlp.down_proj.register_forward_pre_hook(self._pre(i))
                )
        elif kind == "router":
            for i, layer in enumerate(model.model.layers):
                self.handles.append(layer.mlp.router.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(mod, args):
            self.masks[i] = args[0].detach() != 0

        return hook

    def _post(self, i):
        def hook(mod, args, out):
            self.masks[i] = out.detach() != 0

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _batches(windows, batch_size: int, pad_id: int):
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        t = max(len(w) for _, w in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for j, (_, w) in enumerate(chunk):
            ids[j, : len(w)] = torch.tensor(w)
            mask[j, : len(w)] = 1
        yield [d for d, _ in chunk], ids, mask


@torch.no_grad()
def evaluate(model, windows, kind: str, *, batch_size: int = 32, unigram: torch.Tensor | None = None):
    """Per-domain loss/ppl, unigram ppl and sparsity figures of `model` on `windows`.

    kind: "neuron" (activity = FFN down-projection input != 0, rule `zero`), "router"
    (BlockFFN router score != 0), "topk" (the top-k experts chosen per token), "none".
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = model.config.pad_token_id
    probe = _Probe(model, kind)
    nll = dict.fromkeys(DOMAINS, 0.0)
    cnt = dict.fromkeys(DOMAINS, 0)
    uni = dict.fromkeys(DOMAINS, 0.0)
    n_layers = model.config.num_hidden_layers
    meters = [ChunkSparsityMeter(CLS_LENGTHS) for _ in range(n_layers)]
    try:
        for doms, ids, mask in _batches(windows, batch_size, pad):
            ids, mask = ids.to(device), mask.to(device)
            kw = {"output_router_logits": True} if kind == "topk" else {}
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
            logits = out.logits.float()
            lp = F.log_softmax(logits[:, :-1], -1)
            tgt = ids[:, 1:]
            tok_nll = -lp.gather(-1, tgt[..., None])[..., 0]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            for j, d in enumerate(doms):
                v = valid[j]
                nll[d] += float(tok_nll[j][v].double().sum())
                cnt[d] += int(v.sum())
                if unigram is not None:
                    uni[d] += float(-unigram.to(device)[tgt[j][v]].sum())
            if kind == "topk":
                k = model.config.num_experts_per_tok
                for i, rl in enumerate(out.router_logits):
                    rl = rl.reshape(ids.shape[0], ids.shape[1], -1)
                    top = rl.float().topk(k, dim=-1).indices
                    act = torch.zeros_like(rl, dtype=torch.bool).scatter_(-1, top, True)
                    meters[i].update(act, mask)
            elif kind in ("neuron", "router"):
                for i in range(n_layers):
                    m = probe.masks[i]
                    meters[i].update(m.reshape(ids.shape[0], ids.shape[1], -1), mask)
    finally:
        probe.remove()
        model.train(was_training)
    res: dict = {"tokens": sum(cnt.values()), "domains": {}}
    for d in DOMAINS:
        if cnt[d]:
            res["domains"][d] = {
                "tokens": cnt[d],
                "loss": nll[d] / cnt[d],
                "ppl": math.exp(nll[d] / cnt[d]),
            }
            if unigram is not None:
                res["domains"][d]["unigram_ppl"] = math.exp(uni[d] / cnt[d])
    tot = sum(cnt.values())
    res["loss"] = sum(nll.values()) / tot
    res["ppl"] = math.exp(res["loss"])
    if unigram is not None:
        res["unigram_ppl"] = math.exp(sum(uni.values()) / tot)
    if kind != "none":
        per_layer = [m.result() for m in meters]
        total = ChunkSparsityMeter(CLS_LENGTHS)
        for m in meters:
            total.merge(m)
        r = total.result()
        res["sparsity"] = {
            "rule": {"neuron": "zero", "router": "zero (router score == 0)", "topk": "top-k"}[kind],
            "tls": r["tls"],
            **{f"cls_{L}": r[f"cls_{L}"] for L in CLS_LENGTHS},
            "reuse": r["reuse"],
            "per_layer_tls": [p["tls"] for p in per_layer],
            "per_layer_cls_8": [p["cls_8"] for p in per_layer],
        }
    return res


@torch.no_grad()
def position_loss(model, windows, seq_len: int, total: int = 4096, n_seq: int = 4):
    """Mean NLL by position bucket on long sequences (validation documents concatenated)."""
    device = next(model.parameters()).device
    stream = [t for _, w in windows for t in w]
    n_seq = min(n_seq, len(stream) // total)
    if n_seq == 0:
        return {}
    ids = torch.tensor(stream[: n_seq * total]).view(n_seq, total).to(device)
    model.eval()
    out = model(input_ids=ids, use_cache=False)
    lp = F.log_softmax(out.logits.float()[:, :-1], -1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0].mean(0)
    edges = [0, seq_len // 2, seq_len, 2 * seq_len, 4 * seq_len, 8 * seq_len, total - 1]
    edges = sorted({e for e in edges if e <= total - 1})
    return {
        f"{a}-{b}": float(nll[a:b].mean()) for a, b in zip(edges[:-1], edges[1:]) if b > a
    }


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, steps: int, r: dict) -> float:
    warm = r["warmup"]
    if step < warm:
        return r["lr"] * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, steps - warm))
    lo = r["min_lr_ratio"]
    return r["lr"] * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p)))


def l1_factor(step: int, steps: int, r: dict) -> float:
    """ProSparse-style progressive L1 factor: 0, then a sine ramp to r['l1'], then held."""
    lam = r.get("l1", 0.0)
    if not lam:
        return 0.0
    a, b = r.get("l1_start", 0.1) * steps, r.get("l1_end", 0.75) * steps
    if step < a:
        return 0.0
    if step >= b:
        return lam
    return lam * math.sin(0.5 * math.pi * (step - a) / max(1.0, b - a))


def _optimizer(model, r):
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters()}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": r["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=r["lr"], betas=(0.9, 0.95), eps=1e-8)


def train(
    name: str,
    *,
    device: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    overrides: dict | None = None,
    steps: int | None = None,
    time_budget: float | None = None,
    max_eval_windows: int | None = None,
    log=print,
) -> dict:
    """Train zoo model `name`, measure it, write its directory; returns its metrics dict.

    overrides: recipe keys to change (e.g. {"l1": 0.05}); steps: override the step count;
    time_budget: seconds; after 30 steps the step count is capped to what fits in it (the
    schedule is set from then on, and the card records the steps actually run).
    """
    base = zoo.spec(name)
    recipe = {**base.recipe, **(overrides or {})}
    if steps is not None:
        recipe["steps"] = int(steps)
    spec = zoo.ZooSpec(base.name, base.family, base.description, base.config, recipe, base.sparsity)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out is not None else zoo.ZOO_DIR / name
    torch.manual_seed(seed)
    np.random.seed(seed)
    t_start = time.time()
    tok = _tokenizer()
    data = torch.from_numpy(train_tokens().astype(np.int64))
    windows = validation_windows(recipe["seq_len"])
    quick = quick_windows(windows)
    if max_eval_windows:  # smoke tests only: the card then covers part of the split
        windows = quick_windows(windows, max_eval_windows // len(DOMAINS))
    model = build_model(spec).to(device)
    model.train()
    scan = contextlib.nullcontext()
    if spec.family == "mamba2" and not device.startswith("cuda"):
        from workbench.models.ssd import fast_scan

        scan = fast_scan()  # same math as transformers' reference scan, much faster on CPU
    with scan:
        return _train_loop(name, spec, recipe, model, device, seed, out, tok, data, windows,
                           quick, total_time_budget=time_budget, t_start=t_start, log=log)


def _train_loop(name, spec, recipe, model, device, seed, out, tok, data, windows, quick, *,
                total_time_budget, t_start, log):
    time_budget = total_time_budget
    log(f"[{name}] params {n_params(model):,} device {device} train tokens {len(data):,}")
    opt = _optimizer(model, recipe)
    gen = torch.Generator().manual_seed(seed)
    T, B = recipe["seq_len"], recipe["batch_size"]
    total_steps = recipe["steps"]
    use_amp = device.startswith("cuda")
    l1_acts: list[torch.Tensor] = []
    handles = []
    if recipe.get("l1"):
        for layer in model.model.layers:
            handles.append(
                layer.mlp.act_fn.register_forward_hook(lambda m, a, o: l1_acts.append(o))
            )
    routers = []
    if spec.family == "blockffn" and (recipe.get("locality_weight") or recipe.get("chunk_weight")):
        routers = [layer.mlp.router for layer in model.model.layers]
        for rt in routers:
            rt.record = True
    from workbench.models.blockffn import chunk_sparsity_loss, locality_loss

    n_pk = int(round(recipe.get("passkey_share", 0.0) * B))
    pk_rng = np.random.default_rng([seed, 25])
    history = []
    curve = []
    t0 = time.time()
    step = 0
    while step < total_steps:
        lr = _lr_at(step, total_steps, recipe)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = _sample_batch(data, T, B, gen, device, tok, n_pk, pk_rng)
        l1_acts.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            kw = {"output_router_logits": True} if spec.family == "mixtral" else {}
            outp = model(input_ids=batch, labels=batch, use_cache=False, **kw)
            loss = outp.loss
            ce = loss
            if spec.family == "mixtral" and getattr(outp, "aux_loss", None) is not None:
                ce = loss - model.config.router_aux_loss_coef * outp.aux_loss
            extra = {}
            lam = l1_factor(step, total_steps, recipe)
            if l1_acts:
                l1 = torch.stack([a.float().abs().mean() for a in l1_acts]).mean()
                extra["l1"] = float(l1.detach())
                if lam:
                    loss = loss + lam * l1
            if routers:
                loc = torch.stack(
                    [locality_loss(rt.last[0], recipe.get("locality_alpha", 100.0)) for rt in routers]
                ).mean()
                cs = torch.stack(
                    [chunk_sparsity_loss(rt.last[1], recipe.get("chunk_len", 64)) for rt in routers]
                ).mean()
                extra["locality"], extra["chunk"] = float(loc.detach()), float(cs.detach())
                loss = loss + recipe.get("locality_weight", 0.0) * loc
                loss = loss + recipe.get("chunk_weight", 0.0) * cs
        _optimizer_step(opt, model, loss)
        step += 1
        if step == 30 and time_budget:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            per = (time.time() - t0) / 30
            fit = int((time_budget - (time.time() - t_start)) / per) + 30
            if fit < total_steps:
                log(f"[{name}] {per * 1000:.1f} ms/step: capping steps {total_steps} -> {fit}")
                total_steps = max(fit, 200)
        if step % 50 == 0 or step == total_steps:
            rec = {
                "step": step,
                "loss": float(ce.detach()),
                "lr": lr,
                "l1_factor": lam,
                "elapsed_s": round(time.time() - t0, 1),
                **extra,
            }
            history.append(rec)
            if step % 250 == 0 or step == total_steps:
                v = evaluate(model, quick, "none", batch_size=16)
                curve.append({"step": step, "tokens": step * B * T, "train_loss": float(ce.detach()), "val_loss_quick": v["loss"]})
                log(f"[{name}] {json.dumps(rec)} val_quick {v['loss']:.4f}")
    train_time = time.time() - t0
    for h in handles:
        h.remove()
    for rt in routers:
        rt.record = False
        rt.last = None
    stage2 = None
    if recipe.get("stage2"):  # continue from the stage-1 weights as they would be saved (bf16)
        model = model.to(torch.bfloat16).float()
        stage2 = _stage2_loop(name, spec, recipe, model, device, seed, tok, data, log=log)
    # save in bf16; measure the saved weights upcast to float32
    out.mkdir(parents=True, exist_ok=True)
    if spec.family == "mixtral":
        model.config.output_router_logits = False
    threshold = recipe.get("activation_threshold")
    if threshold:
        model.config.activation_threshold = float(threshold)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    from workbench.models.tokenizer import save as save_tokenizer

    save_tokenizer(tok, out)
    model = model.float()
    uni = unigram_logprobs(model.config.vocab_size)
    ev = evaluate(model, windows, spec.sparsity, unigram=uni)
    evq = evaluate(model, quick, spec.sparsity, unigram=uni)
    extra_eval = {}
    if spec.family == "llama" and model.config.hidden_act == "relu":
        extra_eval["fatrelu"] = fatrelu_sweep(model, windows, (0.005, 0.01, 0.02, 0.05), uni)
    if spec.family == "mamba2":
        extra_eval["position_loss"] = position_loss(model, windows, T)
        extra_eval["state_drift"] = mamba2_drift(model)
        extra_eval["state_drift_quick"] = mamba2_drift(model, total=2048, n_seq=2)  # the tests' set-up
    if recipe.get("passkey_share"):
        extra_eval["passkey"] = passkey_eval(model, tok, T)
    if stage2 is not None:  # lengths stay multiples of the stage-1 length T; flags past stage 2's
        T2 = stage2["recipe"]["seq_len"]
        stage2["validation"] = evaluate(model, validation_windows(T2), "none", unigram=uni)
        if spec.family == "mamba2":
            extra_eval["state_figures"] = state_figures(model, T, train_len=T2)
        extra_eval["stage1"] = {"steps": step, "tokens_seen": step * B * T, "train_time_s": round(train_time, 1)}
        extra_eval["stage2"] = stage2
    import transformers

    metrics = {
        "name": name,
        "family": spec.family,
        "description": spec.description,
        "params": n_params(model),
        "seed": seed,
        "recipe": recipe,
        "steps": step,
        "tokens_seen": step * B * T + (stage2["tokens_seen"] if stage2 else 0),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "train_time_s": round(train_time + (stage2["train_time_s"] if stage2 else 0), 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "validation": ev,
        "validation_quick": evq,
        "quick_windows_per_domain": QUICK_WINDOWS,
        **extra_eval,
        "curve": curve,
        "history": history,
        "checkpoint_sha256": zoo._sha256(out / zoo.CHECKPOINT),
        "train_command": f"workbench zoo train {name} --overwrite --seed {seed} --steps {step}"
        + (" --device cpu" if device == "cpu" else ""),
    }
    (out / zoo.METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
    write_card(out, metrics)
    log(f"[{name}] done: val ppl {ev['ppl']:.3f} unigram {ev['unigram_ppl']:.1f} "
        f"sparsity {json.dumps({k: v for k, v in ev.get('sparsity', {}).items() if not k.startswith('per_')})}")
    return metrics


def _sample_batch(data, T: int, B: int, gen, device, tok, n_pk: int, pk_rng) -> torch.Tensor:
    """B random windows of T training tokens; the first n_pk replaced by synthetic passkey
    documents (the state-capacity recipe)."""
    from workbench.metrics.passkey import training_documents

    idx = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
    batch = torch.stack([data[i : i + T] for i in idx.tolist()])
    if n_pk:
        batch[:n_pk] = training_documents(tok, n_pk, T, pk_rng)
    return batch.to(device)


def _optimizer_step(opt, model, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


# ----------------------------------------------------------------------------- stage 2


def stage2_recipe(recipe: dict) -> dict | None:
    """The full recipe of the second training stage (recipe["stage2"] over the stage-1 recipe:
    seq_len, steps, lr, warmup; batch_size, min_lr_ratio, weight_decay and passkey_share are
    inherited unless given), or None without a stage 2."""
    s2 = recipe.get("stage2")
    if not s2:
        return None
    for k in ("l1", "locality_weight", "chunk_weight"):
        if recipe.get(k):
            raise ValueError(f"stage2 supports the plain LM (+ passkey) loss only, not {k!r}")
    r = {k: v for k, v in recipe.items() if k != "stage2"}
    r.update(s2)
    return r


def _stage2_loop(name, spec, recipe, model, device, seed, tok, data, *, log) -> dict:
    """Continued training at a longer length (Stuffed Mamba's remedy for state collapse): the
    model's current weights, a fresh AdamW, a fresh warmup + cosine decay over the stage's steps,
    windows of the stage's seq_len from a data stream seeded [seed, 2] and the same share of
    synthetic passkey documents (rng [seed, 25, 2]). Plain LM loss. Returns the stage's record
    (recipe, steps, tokens, time, history, curve on the quick validation windows of its length)."""
    r = stage2_recipe(recipe)
    T, B, total = r["seq_len"], r["batch_size"], r["steps"]
    quick = quick_windows(validation_windows(T))
    opt = _optimizer(model, r)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 2]).generate_state(1)[0]))

    n_pk = int(round(r.get("passkey_share", 0.0) * B))
    pk_rng = np.random.default_rng([seed, 25, 2])
    use_amp = device.startswith("cuda")
    model.train()
    history, curve = [], []
    t0 = time.time()
    log(f"[{name}] stage 2: {total} steps x {B} x {T} tokens, lr {r['lr']}, warmup {r['warmup']}")
    for step in range(total):
        lr = _lr_at(step, total, r)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = _sample_batch(data, T, B, gen, device, tok, n_pk, pk_rng)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        _optimizer_step(opt, model, loss)
        done = step + 1
        if done % 50 == 0 or done == total:
            rec = {"step": done, "loss": float(loss.detach()), "lr": lr,
                   "elapsed_s": round(time.time() - t0, 1)}
            history.append(rec)
            if done % 150 == 0 or done == total:
                v = evaluate(model, quick, "none", batch_size=16)
                curve.append({"step": done, "tokens": done * B * T, "train_loss": rec["loss"],
                              "val_loss_quick": v["loss"]})
                log(f"[{name}] stage2 {json.dumps(rec)} val_quick {v['loss']:.4f}")
    return {"recipe": r, "steps": total, "tokens_seen": total * B * T,
            "train_time_s": round(time.time() - t0, 1), "history": history, "curve": curve,
            "start": "the bf16-rounded stage-1 weights, a fresh optimizer"}


def _stage2_measure(model, tok, recipe: dict, n_keys: int = 16) -> dict:
    """The measurements of a two-stage Mamba-2 (under fast_scan on the CPU): validation at the
    stage-2 length, passkey grid at multiples of the stage-1 length (the stage-2 length is one of
    them when it is a multiple), state figures at positions of multiples of the stage-1 length
    with the collapse flags past the stage-2 length (and past the stage-1 length)."""
    r2 = stage2_recipe(recipe)
    T1, T2 = recipe["seq_len"], r2["seq_len"]
    scan = contextlib.nullcontext()
    if next(model.parameters()).device.type == "cpu":
        from workbench.models.ssd import fast_scan

        scan = fast_scan()
    with scan:
        ev2 = evaluate(model, validation_windows(T2), "none",
                       unigram=unigram_logprobs(model.config.vocab_size))
        pk = passkey_eval(model, tok, T1, n_keys=n_keys)
        sf = state_figures(model, T1, train_len=T2)
    return {"validation_stage2_len": ev2, "passkey": pk, "state_figures": sf}


def continue_stage2(name: str, out: str | Path, *, src: str | Path | None = None, seed: int = 0,
                    stage2: dict | None = None, device: str = "cpu", n_keys: int = 16,
                    log=print) -> dict:
    """Run only the second stage of zoo model `name` from the saved stage-1 checkpoint `src`
    (default: the committed zoo directory), write the result to `out` with a card recording
    both stages (stage 1 from src/metrics.json). stage2: the stage's recipe keys (default: the
    zoo recipe's). The result equals `train(name)` with the stage2 recipe where stage 1 is
    reproduced bit for bit (the stage starts from the bf16-rounded stage-1 weights either way)."""
    src = Path(src) if src is not None else zoo.ZOO_DIR / name
    out = Path(out)
    m1 = json.loads((src / zoo.METRICS).read_text())
    spec = zoo.spec(name)
    recipe = {k: v for k, v in m1["recipe"].items() if k != "stage2"}
    recipe["stage2"] = dict(stage2 or spec.recipe.get("stage2") or {})
    if not recipe["stage2"]:
        raise ValueError(f"no stage2 recipe for {name!r}: pass stage2={{...}}")
    torch.manual_seed(seed)
    model, tok = load_zoo_model(src)
    model.to(device)
    data = torch.from_numpy(train_tokens().astype(np.int64))
    scan = contextlib.nullcontext()
    if not device.startswith("cuda"):
        from workbench.models.ssd import fast_scan

        scan = fast_scan()
    with scan:
        st2 = _stage2_loop(name, spec, recipe, model, device, seed, tok, data, log=log)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    from workbench.models.tokenizer import save as save_tokenizer

    save_tokenizer(tok, out)
    model = model.float().eval()
    T1 = recipe["seq_len"]
    windows = validation_windows(T1)
    uni = unigram_logprobs(model.config.vocab_size)
    from workbench.models.ssd import fast_scan

    with fast_scan():
        ev = evaluate(model, windows, "none", unigram=uni)
        evq = evaluate(model, quick_windows(windows), "none", unigram=uni)
    meas = _stage2_measure(model, tok, recipe, n_keys=n_keys)
    st2["validation"] = meas.pop("validation_stage2_len")
    m = {k: v for k, v in m1.items() if k not in ("state_drift", "state_drift_quick", "position_loss",
                                                   "passkey", "state_figures", "reruns")}
    m.update({
        "recipe": recipe, "validation": ev, "validation_quick": evq, **meas,
        "stage1": {"steps": m1["steps"], "tokens_seen": m1["tokens_seen"], "train_time_s": m1["train_time_s"],
                   "checkpoint_sha256": m1["checkpoint_sha256"], "validation_loss": m1["validation"]["loss"]},
        "stage2": st2,
        "tokens_seen": m1["tokens_seen"] + st2["tokens_seen"],
        "train_time_s": round(m1["train_time_s"] + st2["train_time_s"], 1),
        "checkpoint_sha256": zoo._sha256(out / zoo.CHECKPOINT),
        "train_command": f"workbench zoo train {name} --overwrite --seed {seed} --device {device}",
        "notes": [*m1.get("notes", []),
                  f"Stage 2 was run from the committed stage-1 checkpoint (sha256 "
                  f"{m1['checkpoint_sha256'][:16]}...) with `continue_stage2({name!r}, ...)`; the "
                  "command above runs both stages."],
    })
    (out / zoo.METRICS).write_text(json.dumps(m, indent=1) + "\n")
    write_card(out, m)
    log(f"[{name}] stage 2 done: val loss {ev['loss']:.4f} (128-token windows), "
        f"{st2['validation']['loss']:.4f} ({stage2_recipe(recipe)['seq_len']}-token windows)")
    return m


class FATReLU(torch.nn.Module):
    """ReLU with a threshold: x if x > T else 0 (ProSparse's final step)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x):
        return torch.where(x > self.threshold, x, torch.zeros_like(x))


@torch.no_grad()
def fatrelu_sweep(model, windows, thresholds, unigram=None) -> dict:
    """Validation ppl and TLS (rule fat(T)) of a ReLU llama with FATReLU at each T."""
    saved = [layer.mlp.act_fn for layer in model.model.layers]
    res = {}
    try:
        for t in thresholds:
            for layer in model.model.layers:
                layer.mlp.act_fn = FATReLU(t)
            ev = evaluate(model, windows, "neuron", unigram=unigram)
            res[str(t)] = {"ppl": ev["ppl"], "loss": ev["loss"], "tls": ev["sparsity"]["tls"], "cls_8": ev["sparsity"]["cls_8"]}
    finally:
        for layer, a in zip(model.model.layers, saved):
            layer.mlp.act_fn = a
    return res


# ----------------------------------------------------------------------------- cards


def _f(x, nd=3):
    return f"{x:.{nd}f}"


def write_card(out: Path, m: dict) -> None:
    name = m["name"]
    v, q = m["validation"], m["validation_quick"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [workbench-zoo, activation-sparsity]",
        "---",
        f"# zoo:{name}",
        "",
        m["description"],
        "",
        "## Facts",
        "",
        f"- parameters: {m['params']:,} (tied embeddings counted once); architecture "
        f"`{m['family']}`; weights bf16 (`model.safetensors`, sha256 `{m['checkpoint_sha256'][:16]}...`)",
        "- data: the workbench zoo corpus (`data/corpus`, domains prose / code / math / records; "
        "see its manifest.json), zoo BPE tokenizer (vocab 4096)",
        *(_training_lines(m)),
        f"- recipe: `{json.dumps(m['recipe'])}`",
        f"- reproduce: `{m['train_command']}` (stated tolerance: a rerun with the same corpus and "
        f"seed lands within {REPRO_TOLERANCE_NATS} nats of the validation loss below; GPU kernels "
        "and CPU/GPU differences are not bit-exact)",
        *([f"- reproducibility check: {m['reruns']}"] if m.get("reruns") else []),
        *([f"- steps: the recipe's {m['recipe']['steps']} steps were capped to {m['steps']} by the "
           "training call's time budget (`--time-budget`); the command above reproduces the run"]
          if m["steps"] < m["recipe"]["steps"] else []),
        "",
        "## Validation (whole validation split, float32 evaluation of the bf16 weights)",
        "",
        f"Tokens: {v['tokens']:,}. Loss {_f(v['loss'], 4)} nats, perplexity **{_f(v['ppl'])}**; "
        f"unigram perplexity of the same tokens **{_f(v['unigram_ppl'])}** "
        f"(ratio {_f(v['ppl'] / v['unigram_ppl'], 4)}).",
        "",
        "| domain | tokens | loss | perplexity | unigram perplexity |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for d, r in v["domains"].items():
        lines.append(f"| {d} | {r['tokens']:,} | {_f(r['loss'], 4)} | {_f(r['ppl'])} | {_f(r['unigram_ppl'])} |")
    sp = v.get("sparsity")
    if sp:
        unit = {"neuron": "FFN neurons (down-projection inputs)", "router": "experts (router scores)", "topk": "experts (top-k choice)"}
        kind = zoo.spec(name).sparsity if name in zoo.SPECS else ""
        lines += [
            "",
            f"## Sparsity (units: {unit.get(kind, kind)}, rule `{sp['rule']}`)",
            "",
            f"- TLS (token-level sparsity): **{_f(100 * sp['tls'], 2)} %**",
            f"- CLS_8 (per-sequence windows of 8 valid tokens): **{_f(100 * sp['cls_8'], 2)} %**",
            "- CLS_L for L = " + ", ".join(f"{L}: {_f(100 * sp[f'cls_{L}'], 2)} %" for L in CLS_LENGTHS),
            f"- reuse ratio (consecutive tokens): {_f(100 * sp['reuse'], 2)} %",
            "- per layer TLS: " + ", ".join(_f(100 * x, 1) for x in sp["per_layer_tls"]),
        ]
    if "fatrelu" in m:
        lines += ["", "FATReLU thresholds (not applied by this checkpoint unless config.json has "
                  "`activation_threshold`):", "", "| T | perplexity | TLS fat(T) | CLS_8 |", "| ---: | ---: | ---: | ---: |"]
        lines.append(f"| 0 (ReLU) | {_f(v['ppl'])} | {_f(100 * sp['tls'], 2)} % | {_f(100 * sp['cls_8'], 2)} % |")
        for t, r in m["fatrelu"].items():
            lines.append(f"| {t} | {_f(r['ppl'])} | {_f(100 * r['tls'], 2)} % | {_f(100 * r['cls_8'], 2)} % |")
    if "position_loss" in m and m["position_loss"]:
        lines += ["", f"## Loss by position (4096-token sequences; trained at {m['recipe']['seq_len']})", "",
                  "One forward over each of the first 4 slices of 4,096 tokens of the validation "
                  "windows concatenated (documents by id, no EOS between them).", "",
                  "| positions | mean NLL |", "| --- | ---: |"]
        for k, x in m["position_loss"].items():
            lines.append(f"| {k} | {_f(x, 4)} |")
    if m.get("state_drift"):
        lines += _drift_lines(m)
    if m.get("passkey"):
        lines += _passkey_lines(m)
    if m.get("state_figures"):
        lines += _state_lines(m)
    lines += [
        "",
        f"## Quick figures (first {m['quick_windows_per_domain']} windows per domain, {q['tokens']:,} tokens; the tests recompute these)",
        "",
        f"- loss {_f(q['loss'], 4)}, perplexity {_f(q['ppl'])}, unigram perplexity {_f(q['unigram_ppl'])}",
    ]
    if q.get("sparsity"):
        lines.append(f"- TLS {_f(100 * q['sparsity']['tls'], 2)} %, CLS_8 {_f(100 * q['sparsity']['cls_8'], 2)} %")
    lines += [
        "",
        "Reproduce every number above from this checkpoint:",
        "",
        "```python",
        "from workbench.models.train import measure_zoo",
        f"measure_zoo({name!r})           # whole validation split (as in the tables)",
        f"measure_zoo({name!r}, quick=True)  # the quick figures",
        "```",
        "",
        "## Loss curve",
        "",
        "| step | tokens | train loss | validation loss (quick set) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for c in m["curve"]:
        lines.append(f"| {c['step']} | {c['tokens']:,} | {_f(c['train_loss'], 4)} | {_f(c['val_loss_quick'], 4)} |")
    if m.get("stage2"):
        s1, T2 = m["stage1"], m["stage2"]["recipe"]["seq_len"]
        for c in m["stage2"]["curve"]:
            lines.append(f"| {s1['steps']} + {c['step']} (stage 2, {T2}-token windows) | "
                         f"{s1['tokens_seen'] + c['tokens']:,} | {_f(c['train_loss'], 4)} | {_f(c['val_loss_quick'], 4)} |")
    if m.get("twin"):
        t = m["twin"]
        lines += ["", "## Against the dense twin", "",
                  f"{t['name']}: validation perplexity {_f(t['ppl'])}; this model {_f(v['ppl'])} "
                  f"(ratio {_f(v['ppl'] / t['ppl'], 4)}, i.e. {_f(100 * (v['ppl'] / t['ppl'] - 1), 2)} % "
                  f"higher) at TLS {_f(100 * sp['tls'], 2)} % (rule `{sp['rule']}`)."]
    if m.get("sweep"):
        sw = m["sweep"]
        lines += ["", f"## Recipe sweep ({sw['note']})", "",
                  "| setting | val perplexity | TLS | CLS_8 |", "| --- | ---: | ---: | ---: |"]
        for r in sw["rows"]:
            lines.append(f"| {r['setting']} | {_f(r['ppl'])} | {_f(100 * r['tls'], 2)} % | {_f(100 * r['cls_8'], 2)} % |")
    lines += _predictor_card_lines(out)
    if m.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in m["notes"]]
    lines += ["", "Full training log (every 50 steps) in metrics.json (`history`).", ""]
    (out / "README.md").write_text("\n".join(lines))


def _training_lines(m: dict) -> list[str]:
    """Card lines on the training run: one stage, or both stages of a two-stage recipe."""
    r = m["recipe"]
    ver = f"(torch {m['versions']['torch']}, transformers {m['versions']['transformers']})"
    if not m.get("stage2"):
        return [f"- training: {m['steps']} steps x batch {r['batch_size']} x {r['seq_len']} tokens "
                f"= {m['tokens_seen']:,} tokens, seed {m['seed']}, on {m['device']} in {m['train_time_s']} s {ver}"]
    s1, s2 = m["stage1"], m["stage2"]
    r2 = s2["recipe"]
    return [
        f"- training, two stages, {m['tokens_seen']:,} tokens in all, seed {m['seed']}, on {m['device']} "
        f"in {m['train_time_s']} s {ver}:",
        f"  - stage 1: {s1['steps']} steps x batch {r['batch_size']} x {r['seq_len']} tokens = "
        f"{s1['tokens_seen']:,} tokens in {s1['train_time_s']} s (lr {r['lr']}, warmup {r['warmup']})",
        f"  - stage 2 (continued at a longer length, Stuffed Mamba's remedy for state collapse): "
        f"{s2['steps']} steps x batch {r2['batch_size']} x **{r2['seq_len']}** tokens = {s2['tokens_seen']:,} "
        f"tokens in {s2['train_time_s']} s (from {s2['start']}; lr {r2['lr']}, warmup {r2['warmup']}, "
        f"cosine to {r2['min_lr_ratio']} x lr, passkey share {r2.get('passkey_share', 0)}, its own data "
        f"stream); validation loss on {r2['seq_len']}-token windows {_f(s2['validation']['loss'], 4)}"
        + (f" (the stage-1 checkpoint: {_f(s1['validation_loss'], 4)} on {r['seq_len']}-token windows)"
           if "validation_loss" in s1 else ""),
        f"  - lengths below are multiples of the stage-1 length {r['seq_len']}; the final training "
        f"length {r2['seq_len']} is marked",
    ]


def _final_len(m: dict) -> int:
    return m["stage2"]["recipe"]["seq_len"] if m.get("stage2") else m["recipe"]["seq_len"]


def _drift_lines(m: dict) -> list[str]:
    """Card section: Stuffed-Mamba state drift (metrics.json `state_drift`, see mamba2_drift)."""
    d = m["state_drift"]
    T = m["recipe"]["seq_len"]
    pts = d["points"]
    ref = pts.index(T) if T in pts else 0
    lines = [
        "",
        f"## State drift past the training length (Stuffed Mamba; trained at {T} tokens)",
        "",
        f"{d['n_seq']} validation sequences of {d['total']:,} tokens (documents joined with EOS, "
        f"evenly spaced over the split), run {d['chunk']} tokens per forward with the cache (conv "
        "and SSM state) carried over, float32. State RMS: root mean square of the SSM state h "
        "(heads x head_dim x d_state) of each layer after the given number of tokens; decay: mean "
        "per-token dA = exp(dt * A) over all tokens; cos: mean cosine similarity of consecutive "
        "chunk states.",
        "",
        "| layer | " + " | ".join(f"RMS @{p}" for p in pts) + f" | RMS @{pts[-1]} / @{pts[ref]} | mean decay dA | mean dt | cos |",
        "| ---: | " + " | ".join("---:" for _ in pts) + " | ---: | ---: | ---: | ---: |",
    ]
    for k, v in d["state_rms"].items():
        lines.append(
            f"| {k} | " + " | ".join(_f(x, 4) for x in v) + f" | **{_f(v[-1] / v[ref], 2)}** | "
            f"{_f(d['decay'][k], 5)} | {_f(d['dt'][k], 5)} | {_f(d['state_cos'][k], 4)} |"
        )
    lines += ["", "Mean next-token NLL by position on the same sequences:", "",
              "| positions | mean NLL |", "| --- | ---: |"]
    for k, x in d["loss"].items():
        lines.append(f"| {k} | {_f(x, 4)} |")
    if m.get("state_drift_quick"):
        q = m["state_drift_quick"]
        r = [v[-1] / v[q["points"].index(T)] for v in q["state_rms"].values()]
        lines += ["", f"Test set-up ({q['n_seq']} sequences of {q['total']:,} tokens; "
                  "tests/models/test_mamba2_drift.py recomputes it): state RMS @"
                  f"{q['points'][-1]} / @{T} per layer " + ", ".join(_f(x, 2) for x in r)
                  + "; NLL " + ", ".join(f"{k}: {_f(x, 4)}" for k, x in q["loss"].items()) + "."]
    lines += [
        "",
        "Reproduce (CPU, transformers' reference scan: about 40 s on 2 threads, and the figures "
        "above to 1e-6; they were computed inside `with workbench.models.ssd.fast_scan():`):",
        "",
        "```python",
        "from workbench.models.train import load_zoo_model, mamba2_drift",
        f"model, _ = load_zoo_model({m['name']!r})",
        f"mamba2_drift(model, total={d['total']}, n_seq={d['n_seq']}, chunk={d['chunk']})"
        "  # -> state_rms, decay, dt, state_cos, loss",
        "```",
    ]
    return lines


def _passkey_lines(m: dict) -> list[str]:
    p = m["passkey"]
    T = m["recipe"]["seq_len"]
    trained = f"trained at {T} then {_final_len(m)} tokens" if m.get("stage2") else f"trained at {T} tokens"
    lines = ["", f"## Passkey retrieval (Stuffed Mamba format; {trained})", "",
             f"Greedy decoding, {p['n_keys']} seeded keys per cell (seed {p['seed']}); {p['rule']}. "
             "Rows: total prompt length in tokens; columns: key depth.", "",
             "| length | " + " | ".join(f"{d:g}" for d in p["depths"]) + " | mean |",
             "| ---: | " + " | ".join("---:" for _ in p["depths"]) + " | ---: |"]
    for L, row in zip(p["lengths"], p["accuracy"]):
        mark = " = final training length" if m.get("stage2") and L == _final_len(m) else ""
        lines.append(f"| {L} ({L // T}x{mark}) | " + " | ".join(_f(a, 2) for a in row) + f" | **{_f(sum(row) / len(row), 2)}** |")
    lines += ["", "Reproduce:", "", "```python",
              "from workbench.models.train import load_zoo_model, passkey_eval",
              f"model, tok = load_zoo_model({m['name']!r})",
              f"passkey_eval(model, tok, {T}, n_keys={p['n_keys']}, seed={p['seed']})",
              "```"]
    return lines


def _state_lines(m: dict) -> list[str]:
    s = m["state_figures"]
    T = m["recipe"]["seq_len"]
    pos = s["positions"]
    trained = f"trained at {T} then {_final_len(m)} tokens" if m.get("stage2") else f"trained at {T} tokens"
    lines = ["", f"## State statistics past the training length (StateProbe; {trained})", "",
             f"{s['n_seq']} validation sequences of {s['total']:,} tokens, {s['chunk']} tokens per forward "
             f"with the cache carried over, {s['bucket']}-token buckets (workbench.metrics.state.state_scan). "
             "rms: RMS of the layer's SSM state after the position; cos: cosine with the previous bucket's "
             "state; usage: fraction of state channels (d_state columns) with norm > 1 % of the largest; "
             "erank: effective rank of a head's (head_dim x d_state) state; head means.", "",
             "| layer | " + " | ".join(f"rms @{p}" for p in pos) + " | " + " | ".join(f"rms x @{p}" for p in pos[1:])
             + " | " + " | ".join(f"erank @{p}" for p in pos) + " | " + " | ".join(f"usage @{p}" for p in pos) + " |",
             "| ---: |" + " ---: |" * (4 * len(pos) - 1)]
    for k, v in s["layers"].items():
        lines.append(f"| {k} | " + " | ".join(_f(x, 4) for x in v["rms"]) + " | "
                     + " | ".join(f"**{_f(x / v['rms'][0], 2)}**" for x in v["rms"][1:]) + " | "
                     + " | ".join(_f(x, 2) for x in v["erank"]) + " | " + " | ".join(_f(x, 3) for x in v["usage"]) + " |")
    lines += ["", "Loss by position: " + ", ".join(f"{k}: {_f(x, 4)}" for k, x in s["loss"].items()) + ".", "",
              *[f"Collapse flags ({c['rule']}), out of {c['n_heads']} heads: "
                + ("; ".join(f"{st}: {v['heads']} heads, first at {v['first']}, median {v['median_position']:.0f}"
                             for st, v in c["by_stat"].items()) or "none") + "."
                + ("\n" if c is not s.get("collapse_at_seq_len") and s.get("collapse_at_seq_len") else "")
                for c in (s["collapse"], s.get("collapse_at_seq_len")) if c], "",
              "Reproduce:", "", "```python",
              "from workbench.models.train import load_zoo_model, state_figures",
              "from workbench.models.ssd import fast_scan",
              f"model, _ = load_zoo_model({m['name']!r})",
              f"with fast_scan(): state_figures(model, {T}, n_seq={s['n_seq']}, bucket={s['bucket']}, chunk={s['chunk']}"
              + (f", train_len={s['collapse']['train_len']})" if s["collapse"].get("train_len", T) != T else ")"),
              "```"]
    return lines


def _predictor_card_lines(out: Path) -> list[str]:
    """The card's section on the committed activation predictors (out/predictor/report.json,
    written by `python -m workbench.metrics.predictor`), or nothing where there are none."""
    f = out / "predictor" / "report.json"
    if not f.is_file():
        return []
    r = json.loads(f.read_text())
    s = r["summary"]
    lines = ["", "## Activation predictors (`predictor/`)", "",
             f"Deja Vu style predictors, one per FFN layer, trained at `train_predictors`' defaults (recipe "
             f"`{s['recipe']}`: positive-weighted BCE, no biases, input = the residual stream entering the FFN "
             f"block, width min(1024, d_model), threshold 0.5) on {r['train']}. Held out: {r['held_out']} "
             f"({s['tokens']:,} tokens). Use them with "
             f"`wb.accelerate(model, mode=\"predictor\", predictors=\"zoo:{out.name}\")`.", "",
             f"- reproduce: `{r['command']}` (training {r['train_seconds']:.0f} s on a shared CPU, torch {r['torch']}; "
             "report.json holds every number below)",
             f"- mean recall **{100 * s['mean_recall']:.2f} %**, precision {100 * s['mean_precision']:.2f} %, "
             f"predicted sparsity {100 * s['predicted_sparsity']:.2f} % vs true {100 * s['true_sparsity']:.2f} %",
             f"- perplexity on the held-out tokens: dense {_f(s['ppl_dense'], 4)}, exact sparse mode "
             f"{_f(s['ppl_exact'], 4)}, predicted masks {_f(s['ppl_predictor'], 4)} "
             f"({100 * s['ppl_predictor_increase']:+.2f} %; accelerate handle, {s['backend']} reference path)",
             "", "| layer | recall | precision | predicted sparsity | true sparsity |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for L in r["layers"]:
        lines.append(f"| {L['layer']} | {_f(L['recall'])} | {_f(L['precision'])} | {_f(L['predicted_sparsity'])} "
                     f"| {_f(L['true_sparsity'])} |")
    return lines


def rewrite_cards(names=None) -> None:
    """Re-render the README.md cards from their metrics.json (no training, no measurement)."""
    for name in names or zoo.available():
        d = zoo.ZOO_DIR / name
        write_card(d, json.loads((d / zoo.METRICS).read_text()))


def load_zoo_model(name_or_dir: str | Path, dtype=torch.float32):
    """The zoo model (checked by zoo.resolve) and its tokenizer, without workbench.loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import workbench.models.blockffn  # noqa: F401  (registers BlockFFN)

    path = Path(name_or_dir)
    if not path.is_dir():
        path = zoo.resolve(str(name_or_dir))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def measure_zoo(name: str, quick: bool = False, device: str = "cpu") -> dict:
    """Recompute a zoo card's validation figures from the checkpoint (float32 evaluation)."""
    model, _ = load_zoo_model(name)
    model.to(device)
    s = zoo.spec(name)
    windows = validation_windows(s.recipe["seq_len"])
    if quick:
        windows = quick_windows(windows)
    return evaluate(model, windows, s.sparsity, unigram=unigram_logprobs(model.config.vocab_size))


# ----------------------------------------------------------------------------- parallel runs


def parallel(jobs: list[str], out_root: str, time_budget: float, seed: int = 0) -> None:
    """Train several jobs at once on one device (small models leave a GPU mostly idle).

    A job is NAME or NAME@TAG:key=value,key=value (a recipe variant written to out_root/NAME@TAG).
    """
    train_tokens()  # tokenize once before the workers start
    procs = []
    for job in jobs:
        name, _, rest = job.partition(":")
        outdir = Path(out_root) / name
        base = name.split("@")[0]
        cmd = [sys.executable, "-m", "workbench.models.train", "one", base, "--out", str(outdir),
               "--seed", str(seed), "--time-budget", str(time_budget)]
        if rest:
            cmd += ["--set", rest]
        log = open(Path(out_root) / f"{name}.log", "w")
        procs.append((job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for job, p, log in procs:
        rc = p.wait()
        log.close()
        print(f"{job}: exit {rc}", flush=True)


def _parse_set(s: str | None) -> dict:
    out = {}
    for kv in (s or "").split(","):
        if not kv:
            continue
        k, v = kv.split("=")
        out[k] = float(v) if any(c in v for c in ".e") else int(v)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m workbench.models.train")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("one")
    o.add_argument("name")
    o.add_argument("--out")
    o.add_argument("--device")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--steps", type=int)
    o.add_argument("--time-budget", type=float)
    o.add_argument("--set", default=None)
    o.add_argument("--max-eval-windows", type=int)
    sub.add_parser("cards", help="re-render data/zoo/*/README.md from metrics.json")
    fi = sub.add_parser("finish", help="measure and card a saved checkpoint from its training log")
    fi.add_argument("name")
    fi.add_argument("log")
    sc = sub.add_parser("state-card", help="add the state figures (and passkey grid) to a zoo Mamba-2's card")
    sc.add_argument("names", nargs="+")
    pk = sub.add_parser("passkey-card", help="re-measure the passkey grid of a zoo model and re-render its card")
    pk.add_argument("names", nargs="+")
    pk.add_argument("--n-keys", type=int, default=16)
    pa = sub.add_parser("parallel")
    pa.add_argument("jobs", nargs="+")
    pa.add_argument("--out", required=True)
    pa.add_argument("--time-budget", type=float, default=400)
    pa.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "one":
        log = lambda s: print(s, flush=True)  # noqa: E731
        train(a.name, device=a.device, seed=a.seed, out=a.out, overrides=_parse_set(a.set),
              steps=a.steps, time_budget=a.time_budget,
              max_eval_windows=a.max_eval_windows, log=log)
    elif a.cmd == "cards":
        rewrite_cards()
    elif a.cmd == "finish":
        finish_from_checkpoint(a.name, a.log)
    elif a.cmd == "state-card":
        for n in a.names:
            state_card(n)
    elif a.cmd == "passkey-card":
        for n in a.names:
            passkey_card(n, n_keys=a.n_keys)
    else:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        parallel(a.jobs, a.out, a.time_budget, a.seed)


if __name__ == "__main__":
    main()
