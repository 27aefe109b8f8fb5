"""Corpus-scale profiles: torch.distributed ranks, resumable checkpoints, streamed corpora.

    # one process, checkpointed every 10M tokens, resumable
    run = profile_corpus(model, TextStream("corpus.jsonl"), out="runs/big", save_every=10_000_000)
    # under torchrun: every rank profiles its shard, rank 0 writes the one Run
    world = init_distributed()                        # gloo on CPU, NCCL on GPUs
    run = profile_corpus(model, texts, out="runs/big", world=world)   # None on ranks > 0

How the work is split. Every rank reads (and tokenizes) the whole stream of batches, the same
batches `wb.profile` makes, and runs the model only on batch i with i % world_size == rank. So
each batch is computed with the same shape as in one process (same kernels, same bits), every
rank knows the global token count (the token budget and the checkpoint schedule need no
communication), and every rank hashes the data: ranks that read different data are caught at
every checkpoint and at the end. Tokenizing is far cheaper than the forward pass.

How the probes merge (generic over any `Probe`). At the end (and at each checkpoint) every rank
moves its probes' `state_dict()` tensors to the host and `gather_object`s them to rank 0 through
the process group's backend (gloo on CPU, NCCL on GPUs); rank 0 folds them, in rank order, with
each probe's own `merge` into a blank copy of the probe, and writes the Run. A probe works
distributed, resumed and checkpointed without changes when:
- `merge` is associative (folding the ranks' states in any grouping gives the single-process
  result, up to float rounding), and a blank copy of the probe (the probe with empty `.state`)
  merged with a state equals that state;
- its state lives in `.state` and round-trips through `state_dict()` / `load_state_dict()`;
- its state size does not depend on the number of tokens (it is gathered and checkpointed).
Integer counts and maxima then come out exactly equal to one process; float sums are summed in
another order (per rank, then across ranks, and restarted at every checkpoint). For sums of
non-negative float64 terms (NeuronStats.abs_sum) the relative difference is at most
n_batches * 2**-53 (1e-12 for 10^4 batches). A probe that draws random numbers (ActivationSample)
gives an equally valid sample, not the same one.

Checkpoints. With `save_every=N` the merged state is written every N tokens (at the next batch
boundary) to `out/profile-checkpoint.safetensors`, atomically (a temporary file and
`os.replace`). Each rank then starts its probes afresh, so a resumed run folds the same partial
sums in the same order as an uninterrupted one and ends with the same Run, bit for bit. On
`resume=True` the checkpoint must come from the same model, rule, probes and batching (else a
DistributedError names what differs and nothing is written); the batches already done are read
again without running the model and their hash must equal the checkpoint's.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from workbench.capture.core import Capture
from workbench.capture.probes import Probe, make_probes
from workbench.capture.profile import _label_names
from workbench.capture.rules import Rule
from workbench.capture.run import Run
from workbench.capture.stream import TextStream, stream_batches
from workbench.data import model_device, token_batches
from workbench.errors import DistributedError, RunError

CHECKPOINT = "profile-checkpoint.safetensors"
CHECKPOINT_FORMAT = "workbench-profile-checkpoint"
CHECKPOINT_VERSION = 1
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- the process group
@dataclass
class World:
    """This process's place among the ranks (size 1 = a plain single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0, gpu: int | None = None) -> World:
    """Join the process group torchrun set up (env:// rendezvous).

    backend: "nccl" when CUDA is available, else "gloo" (default); under NCCL each rank uses
    cuda:LOCAL_RANK (or cuda:`gpu`, the first GPU of a rank whose model spans several).
    Raises DistributedError when torchrun's environment is missing.
    """
    import torch.distributed as dist

    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise DistributedError(
            f"--distributed needs torchrun's environment, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch it as "
            "`torchrun --nproc_per_node N -m workbench.cli profile ... --distributed` "
            "(or drop --distributed to profile in this one process)")
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    gpu = local if gpu is None else gpu
    if backend == "nccl":
        if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
            raise DistributedError(f"NCCL needs a GPU per local rank; rank {rank} has LOCAL_RANK {local} "
                                   f"but {torch.cuda.device_count()} GPUs are visible. Use "
                                   "--nproc_per_node <= the GPU count, or the gloo backend on CPU")
        torch.cuda.set_device(gpu)
    if not dist.is_initialized():
        kw = {"device_id": torch.device("cuda", gpu)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return World(rank=rank, size=size, local_rank=local, backend=backend)


def shutdown(world: World) -> None:
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _all_gather(world: World, obj) -> list:
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def _agree(world: World, what: str, payload: dict, extra=None) -> list:
    """All-gather `payload` (JSON-able) and raise DistributedError on every rank if any rank's
    differs from rank 0's (every collective of the profile goes through here, so ranks that got
    out of step meet a clear error, not a hang). Returns every rank's `extra` (not compared)."""
    both = _all_gather(world, ({"what": what, **payload}, extra))
    got = [b[0] for b in both]
    ref = got[0]
    for r, g in enumerate(got[1:], 1):
        bad = sorted(k for k in set(ref) | set(g) if ref.get(k) != g.get(k))
        if bad:
            field = bad[0]
            raise DistributedError(
                f"rank {r} disagrees with rank 0 on the {field} ({what}): rank 0 has "
                f"{_short(ref.get(field))}, rank {r} has {_short(g.get(field))}. Every rank must load the "
                "same model and read the same data with the same options; start them with one "
                "torchrun command line")
    return [b[1] for b in both]


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) < 300 else s[:300] + "..."


# --------------------------------------------------------------------------- merging probes
def _blank(probe: Probe) -> Probe:
    """A copy of `probe` (same type and config) with empty state."""
    saved = probe.state
    probe.state = {}
    try:
        try:
            return copy.deepcopy(probe)
        except Exception:  # an attribute that cannot be deep-copied (a handle, a lock)
            out = copy.copy(probe)
            out.state = {}
            return out
    finally:
        probe.state = saved


def _loaded(probe: Probe, flat: dict[str, torch.Tensor]) -> Probe:
    out = _blank(probe)
    out.load_state_dict(flat)
    return out


def _host_state(probes: list[Probe]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().cpu() for k, v in p.state_dict().items()} for p in probes]


def fold(probe: Probe, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fold state dicts of `probe`'s kind, in order, with `probe.merge`; the merged state dict."""
    acc = _blank(probe)
    for flat in parts:
        if flat:
            acc.merge(_loaded(probe, flat))
    return {k: v.detach().cpu() for k, v in acc.state_dict().items()}


def _set_state(probe: Probe, flat: dict[str, torch.Tensor]) -> None:
    """Replace the probe's state by `flat`, each tensor on the device its live state had."""
    old = probe.state_dict()
    probe.state = {}
    probe.load_state_dict({k: v.to(old[k].device) if k in old else v for k, v in flat.items()})


def gather_merge(probes: list[Probe], world: World, base: list[dict] | None = None) -> list[dict] | None:
    """Gather every rank's probe states to rank 0 and fold them there in rank order, after
    `base` (earlier, already merged state). Returns the merged host state dicts on rank 0,
    None elsewhere. Works for any Probe (see the module docstring for what a probe needs)."""
    local = _host_state(probes)
    if world.distributed:
        import torch.distributed as dist

        got = [None] * world.size if world.main else None
        dist.gather_object(local, got, dst=0)
    else:
        got = [local]
    if not world.main:
        return None
    return [fold(p, ([base[i]] if base else []) + [g[i] for g in got]) for i, p in enumerate(probes)]


# --------------------------------------------------------------------------- identity
def model_identity(model) -> dict:
    """What identifies the model of a profile (checked on --resume and across ranks)."""
    cfg = getattr(model, "config", None)
    cfg_json = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else ""
    params = [p for p in model.parameters()]
    return {
        "source": getattr(model, "wb_source", None),
        "class": type(model).__name__,
        "n_params": int(sum(p.numel() for p in params)),
        "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
        "config_sha256": hashlib.sha256(cfg_json.encode()).hexdigest()[:16],
    }


def weights_digest(model, n: int = 4096) -> str:
    """A hash of the first `n` bytes of every materialized parameter (meta / offloaded ones
    are skipped): cheap, and tells ranks that loaded different weights apart."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        b = p.detach().reshape(-1)[: max(1, n // p.element_size())].contiguous().view(torch.uint8)
        h.update(name.encode())
        h.update(b.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _identity(model, rule: Rule, probes: list[Probe], settings: dict, data_info: dict) -> dict:
    return {"model": model_identity(model), "rule": rule.to_json(),
            "probes": [{"name": p.name, "class": type(p).__name__, **p.config()} for p in probes],
            "batching": settings, "data": data_info}


def _identity_diff(saved: dict, now: dict) -> str | None:
    for key, label in (("model", "model"), ("rule", "rule"), ("probes", "probes"),
                       ("batching", "batching options"), ("data", "data")):
        a, b = saved.get(key), now.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                fields = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                detail = "; ".join(f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in fields)
            else:
                detail = f"{_short(a)} there, {_short(b)} now"
            return f"{label} ({detail})"
    return None


# --------------------------------------------------------------------------- the output directory
def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DistributedError(f"{path} cannot be read ({exc}); the checkpoint is damaged: profile "
                               "into a new directory") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise DistributedError(f"{path} is not a workbench profile checkpoint; choose another directory")
    if int(meta.get("version", 0)) > CHECKPOINT_VERSION:
        raise DistributedError(f"{path} was written by a newer workbench (checkpoint version "
                               f"{meta.get('version')}); upgrade the workbench to resume it")
    return {"identity": json.loads(meta["identity"]), "progress": json.loads(meta["progress"])}, tensors


def checkpoint_tokens(out: str | os.PathLike) -> int | str | None:
    """Tokens done by the unfinished profile checkpointed in `out` (its metadata only; "?" for a
    damaged checkpoint), or None when `out` holds no checkpoint."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(json.loads((f.metadata() or {})["progress"])["tokens"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return "?"


def _write_checkpoint(out: Path, identity: dict, progress: dict, merged: list[dict]) -> None:
    tensors = {k: v.contiguous().clone() for part in merged for k, v in part.items()}
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION),
                                          "identity": json.dumps(identity, sort_keys=True, default=str),
                                          "progress": json.dumps(progress, sort_keys=True)})
        os.replace(tmp, out / CHECKPOINT)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _prepare_out(out: Path | None, identity: dict, *, resume: bool, overwrite: bool,
                 save_every: int | None) -> tuple[dict | None, dict | None]:
    """Check the output directory before any work (rank 0). Returns (checkpoint, tensors) to
    resume from, or (None, None) for a fresh start. Raises DistributedError / RunError."""
    if out is None:
        if resume or save_every:
            raise DistributedError("--resume and --save-every need an output directory (--out DIR): "
                                   "the checkpoint lives there")
        return None, None
    ckpt = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is a file; choose another directory for the run")
    files = [p.name for p in out.iterdir()] if out.is_dir() else []
    stale = [f for f in files if f.startswith(".checkpoint-") and f.endswith(".tmp")]
    for f in stale:  # a checkpoint write that was killed half-way (the previous checkpoint is intact)
        (out / f).unlink(missing_ok=True)
    files = [f for f in files if f not in stale]
    if resume:
        if "run.json" in files:
            raise DistributedError(f"{out} already holds a finished run: there is nothing to resume "
                                   "(load it with wb.Run.load, or profile into a new directory)")
        if CHECKPOINT not in files:
            raise DistributedError(f"{out} has no {CHECKPOINT}: there is nothing to resume. Start the "
                                   "profile without --resume (with --save-every N to make it resumable)")
        saved, tensors = _read_checkpoint(ckpt)
        diff = _identity_diff(saved["identity"], identity)
        if diff is not None:
            raise DistributedError(
                f"{out} holds the checkpoint of another profile: its {diff} differ. Resume it with "
                "the same model, rule, probes, batching and data, or profile into a new directory; "
                "nothing was changed")
        return saved, tensors
    if CHECKPOINT in files:
        try:
            done = _read_checkpoint(ckpt)[0]["progress"]["tokens"]
        except DistributedError:
            done = "?"
        raise DistributedError(f"{out} holds the checkpoint of an unfinished profile ({done} tokens done): "
                               "continue it with --resume, or choose a new directory")
    if files:
        is_run = "run.json" in files
        if not is_run:
            raise RunError(f"{out} holds files that are not a workbench run; refusing to write into it: "
                           "choose a new directory")
        if not overwrite:
            raise RunError(f"{out} already exists and is not empty; pass overwrite=True (CLI: --overwrite) "
                           "to replace the run, or choose a new directory")
        if save_every:
            raise RunError(f"{out} holds a finished run; a checkpointed profile never writes over one: "
                           "choose a new directory")
    return None, None


def _write_run(run: Run, out: Path, overwrite: bool) -> None:
    """Write the final Run into `out` (which may hold our checkpoint): run files moved in
    last-file-last (run.json marks a complete run), then the checkpoint removed."""
    if not out.exists() or (CHECKPOINT not in {p.name for p in out.iterdir()}):
        run.save(out, overwrite=overwrite)
        return
    tmp = Path(tempfile.mkdtemp(prefix=".run-", dir=out.parent))
    try:
        run.save(tmp / "run", overwrite=False)
        names = sorted(p.name for p in (tmp / "run").iterdir())
        for name in [n for n in names if n != "run.json"] + ["run.json"]:
            os.replace(tmp / "run" / name, out / name)
        (out / CHECKPOINT).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the profile
def _streamed(data) -> bool:
    return isinstance(data, TextStream) or (not isinstance(data, (list, tuple, torch.Tensor))
                                            and isinstance(data, Iterable))


def _batches(model, data, *, tokenizer, attention_mask, batch_size, max_length, padding_side,
             kept: list) -> Iterator | list:
    if _streamed(data):
        return stream_batches(data, tokenizer, batch_size=batch_size, max_length=max_length,
                              padding_side=padding_side)
    return token_batches(data, tokenizer=tokenizer, attention_mask=attention_mask, batch_size=batch_size,
                         max_length=max_length, padding_side=padding_side, kept=kept)


def profile_corpus(model, data, *, out: str | os.PathLike | None = None, tokenizer=None,
                   batch_size: int = 8, max_tokens: int | None = None, max_length: int | None = 512,
                   attention_mask: torch.Tensor | None = None, rule="zero", probes=None,
                   padding_side: str | None = None, save_every: int | None = None, resume: bool = False,
                   overwrite: bool = False, world: World | None = None, progress: bool = True,
                   data_info: dict | None = None, labels=None, layout=None) -> Run | None:
    """Profile `model` over `data` like `wb.profile`, at corpus scale.

    data: what `wb.profile` takes, or a `TextStream` / any iterable of texts (streamed, never
    held whole). world: from `init_distributed()` under torchrun (default: one process).
    save_every: write the merged state to `out` every that many tokens; resume: continue from
    the checkpoint in `out`. Rank 0 returns the Run (saved to `out` when given); other ranks
    return None. The Run equals `wb.profile(model, data, ...)` with the same options (see the
    module docstring for the exact sense). labels: as for `wb.profile` (per-text labels, zoo
    Documents by domain), for data in memory; a streamed corpus is not labelled.
    """
    world = world or World()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    rule = Rule.parse(rule)
    probes = make_probes(probes)
    if save_every is not None and save_every < 1:
        raise DistributedError(f"save_every must be >= 1 token (got {save_every})")
    if isinstance(data, TextStream):
        data_info = {**data.describe(), **(data_info or {})}
    settings = {"batch_size": batch_size, "max_length": max_length, "max_tokens": max_tokens,
                "padding_side": side, "attention_mask": attention_mask is not None}
    identity = _identity(model, rule, probes, settings, data_info or {})
    out = Path(out) if out is not None else None
    _agree(world, "model and options", {**identity, "weights": weights_digest(model)})

    # rank 0 checks the directory; every rank learns the outcome (so all raise, or all resume)
    status = None
    saved = tensors = None
    if world.main:
        try:
            saved, tensors = _prepare_out(out, identity, resume=resume, overwrite=overwrite, save_every=save_every)
            status = {"ok": True, "progress": saved["progress"] if saved else None}
        except (DistributedError, RunError) as exc:
            status = {"ok": False, "error": str(exc), "type": type(exc).__name__}
    status = _all_gather(world, status)[0]
    if not status["ok"]:
        raise (RunError if status["type"] == "RunError" else DistributedError)(status["error"])
    start = status["progress"] or {"batches": 0, "tokens": 0, "sequences": 0, "forward_calls": 0,
                                   "sha256_state": None}
    base = None
    if world.main and tensors is not None:
        base = [{k: v for k, v in tensors.items() if k.startswith(p.name + "/")} for p in probes]

    names = label_source = label_ids = vocab = None
    if not _streamed(data):
        names, label_source = _label_names(data, labels)
    elif labels is not None:
        raise DistributedError("labels need the data in memory (a list of texts or Documents); a streamed "
                               "corpus is profiled without labels")
    kept: list[int] = []
    device = model_device(model)
    budget = max_tokens if max_tokens else math.inf
    sha = hashlib.sha256()
    used = start["tokens"]
    n_seq = start["sequences"]
    last_save = used
    skip = start["batches"]
    i = -1
    t0 = time.perf_counter()
    batches = _batches(model, data, tokenizer=tokenizer, attention_mask=attention_mask, batch_size=batch_size,
                       max_length=max_length, padding_side=side, kept=kept)
    if names is not None:
        vocab = sorted(set(names))
        index = {n: k for k, n in enumerate(vocab)}
        label_ids = torch.tensor([index[names[k]] for k in kept], dtype=torch.int64)
    row = 0
    total = None if budget == math.inf else budget
    if isinstance(batches, list):  # in memory: the token count is known, so is the time left
        total = min(sum(int(m.sum()) for _, m in batches), budget)
    bar = tqdm(total=total, initial=used, unit="tok", unit_scale=True,
               desc=f"profile ({world.size} rank{'s' if world.size > 1 else ''})",
               disable=not (progress and world.main), dynamic_ncols=True)
    forward_calls = 0
    try:
        with Capture(model, probes=probes, rule=rule, data=data_info, layout=layout) as cap:
            for i, (ids, m) in enumerate(batches):
                if label_ids is not None:
                    cap.set_labels(label_ids[row:row + ids.shape[0]])
                row += ids.shape[0]
                if i < skip:  # done before the checkpoint: hash, do not run
                    sha.update(ids.cpu().numpy().tobytes())
                    sha.update(m.cpu().numpy().tobytes())
                    if i == skip - 1 and sha.hexdigest() != start["sha256_state"]:
                        raise DistributedError(
                            f"the data differ from the checkpoint's: the first {skip} batches hash to "
                            f"{sha.hexdigest()[:12]}, the checkpoint has {start['sha256_state'][:12]}. "
                            "Resume with the same corpus and options, or profile into a new directory")
                    continue
                if used >= budget:
                    break
                n = int(m.sum())
                if used + n > budget:
                    keep = int(budget - used)
                    flat_rank = torch.cumsum(m.reshape(-1), 0).reshape(m.shape)
                    m = m * (flat_rank <= keep).long()
                    n = keep
                sha.update(ids.cpu().numpy().tobytes())
                sha.update(m.cpu().numpy().tobytes())
                if i % world.size == world.rank:
                    with torch.no_grad():
                        model(input_ids=ids.to(device), attention_mask=m.to(device))
                used += n
                n_seq += int((m.sum(1) > 0).sum())
                bar.update(n)
                if save_every and used - last_save >= save_every and used < budget:
                    calls = sum(_agree(world, "checkpoint", {"batches": i + 1, "tokens": used,
                                                             "sha256_state": sha.hexdigest()}, cap.call.calls))
                    merged = gather_merge(probes, world, base)
                    for p in probes:  # the next partial sums start afresh on every rank
                        p.state = {}
                    if world.main:
                        base = merged
                        _write_checkpoint(out, identity, {
                            "batches": i + 1, "tokens": used, "sequences": n_seq,
                            "forward_calls": start["forward_calls"] + calls,
                            "sha256_state": sha.hexdigest()}, merged)
                    last_save = used
            if i < skip - 1:
                raise DistributedError(f"the data end after {i + 1} batches, but the checkpoint was written "
                                       f"after {skip}: resume with the same corpus, or profile anew")
            calls = _agree(world, "end of data", {"batches": i + 1, "tokens": used, "sequences": n_seq,
                                                  "sha256": sha.hexdigest()}, cap.call.calls)
            forward_calls = start["forward_calls"] + sum(calls)
            merged = gather_merge(probes, world, base)
            if world.main and (world.distributed or base is not None):
                for p, flat in zip(probes, merged):
                    _set_state(p, flat)
    finally:
        bar.close()
    if not world.main:
        return None
    if used == 0:
        from workbench.errors import CaptureError

        raise CaptureError("the dataset is empty: no valid (non-padding) tokens")
    wall = time.perf_counter() - t0
    run = cap.run
    info = {"kind": "token_ids" if isinstance(data, torch.Tensor) else "texts", "n_sequences": n_seq,
            "n_tokens": used, "sha256": sha.hexdigest()}
    run.meta["data"] = {**(data_info or {}), **info, "forward_calls": forward_calls}
    if vocab is not None:
        run.meta["labels"] = {"names": vocab, "source": label_source,
                              "sequences": {v: int((label_ids == k).sum()) for k, v in enumerate(vocab)}}
    run.meta["scale"] = {"world_size": world.size, "backend": world.backend, "save_every": save_every,
                         "resumed_at_tokens": start["tokens"] or None, "wall_s": round(wall, 3),
                         "tokens_per_s": round((used - start["tokens"]) / wall, 1) if wall > 0 else None}
    if out is not None:
        _write_run(run, out, overwrite)
    return run


# --------------------------------------------------------------------------- comparing runs
def compare_runs(a: Run, b: Run, rtol: float = 1e-12) -> list[str]:
    """Differences between two runs' statistics: integer and bool tensors must be equal,
    float tensors within `rtol` (relative to the larger magnitude), and the data provenance
    (tokens, sequences, hash, forward calls) equal. An empty list means equal."""
    diffs = []
    ta, tb = a.tensors, b.tensors
    if set(ta) != set(tb):
        diffs.append(f"tensor keys differ: {sorted(set(ta) ^ set(tb))[:5]}")
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            diffs.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        elif x.is_floating_point():
            x64, y64 = x.double(), y.double()
            scale = torch.maximum(x64.abs(), y64.abs()).clamp_min(1e-300)
            rel = ((x64 - y64).abs() / scale).nan_to_num(0.0)
            if x.numel() and float(rel.max()) > rtol:
                diffs.append(f"{k}: max relative difference {float(rel.max()):.3g} > {rtol:g}")
        elif not torch.equal(x, y):
            diffs.append(f"{k}: {int((x != y).sum())} entries differ")
    for f in ("n_tokens", "n_sequences", "sha256", "forward_calls"):
        va, vb = a.meta.get("data", {}).get(f), b.meta.get("data", {}).get(f)
        if va != vb:
            diffs.append(f"data.{f}: {va} vs {vb}")
    return diffs


# --------------------------------------------------------------------------- the CLI
def rank_gpus(distributed: bool) -> list[int]:
    """The GPUs of this rank when its model spans several (`--device-map auto` under torchrun):
    local rank r of L uses GPUs r*k .. r*k+k-1, k = n_gpus // L (all GPUs for one process)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return []
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))) if distributed else 1
    local = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
    k = n // local_size
    if k < 1:
        raise DistributedError(f"{local_size} ranks on this machine but {n} GPUs: with --device-map each "
                               "rank needs at least one GPU; lower --nproc_per_node")
    return list(range(local * k, local * k + k))


def rank_max_memory(gpus: list[int], fraction: float = 0.9) -> dict | None:
    """accelerate `max_memory` with this rank's GPUs only (`fraction` of each, the rest left for
    activations) plus the host's free memory for offload; None on CPU-only machines."""
    if not gpus:
        return None
    mem = {g: int(fraction * torch.cuda.get_device_properties(g).total_memory) for g in gpus}
    mem["cpu"] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return mem


def scale_requested(args) -> bool:
    """Whether a `workbench profile` command line asks for this module's features."""
    return bool(getattr(args, "distributed", False) or getattr(args, "resume", False)
                or getattr(args, "save_every", None) or getattr(args, "corpus", None)
                or getattr(args, "device_map", None))


def cli_profile(args, source: str, out: Path, probes=None, dtype: torch.dtype | None = None) -> Run | None:
    """`workbench profile` with --distributed / --resume / --save-every / --corpus /
    --device-map: load, read the data (streamed), profile through `profile_corpus`, save to
    `out`. dtype: the parsed --dtype (args.dtype is the raw string). Rank 0 returns the Run,
    other ranks None."""
    import workbench as wb
    from workbench.data import validation_tokens

    if args.resume and not args.out:
        raise DistributedError("--resume needs --out DIR: the directory of the interrupted profile")
    gpus = rank_gpus(args.distributed) if args.device_map == "auto" else []
    world = init_distributed(gpu=gpus[0] if gpus else None) if args.distributed else World()
    try:
        load_kw = {"device": args.device, "dtype": dtype}
        if args.device_map:
            load_kw = {"dtype": dtype, "device_map": args.device_map}
            mm = rank_max_memory(gpus)
            if mm is not None:
                load_kw["max_memory"] = mm
        elif world.backend == "nccl":
            load_kw["device"] = f"cuda:{world.local_rank}"
        model = wb.load_model(source, **load_kw)
        torch.manual_seed(0)
        mask = None
        if args.corpus or args.text:
            data = TextStream(args.corpus or args.text, field=args.text_field,
                              fmt="text" if args.text else None, split=args.split)
            info = {}
        else:
            data, mask, desc = validation_tokens(model, args.tokens, args.seq_len)
            info = {"tokens_requested": args.tokens, "text": desc}
        return profile_corpus(
            model, data, out=out, batch_size=args.batch_size, max_tokens=args.max_tokens,
            max_length=args.seq_len, attention_mask=mask, rule=args.rule, probes=probes,
            save_every=args.save_every, resume=args.resume, overwrite=args.overwrite, world=world,
            progress=not args.quiet, data_info=info)
    finally:
        shutdown(world)
