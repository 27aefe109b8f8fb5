"""Distributed (torch.distributed, gloo) and resumable profiles equal the single-process Run;
bad set-ups fail with clear errors and leave the output directory untouched."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import workbench as wb
from tests import tiny
from tests.capture.test_device_map import RouterCounts
from workbench.capture import Capture
from workbench.capture.distributed import (
    CHECKPOINT,
    compare_runs,
    fold,
    init_distributed,
    profile_corpus,
    shutdown,
)
from workbench.errors import DistributedError, RunError

ROOT = Path(__file__).resolve().parents[2]
PROBES = ("neuron_stats", "abs_sketch")


@pytest.fixture(autouse=True)
def _one_thread():
    """The forked ranks run one thread each (OpenMP is not fork-safe beyond one); the reference
    in this process must too: a float32 GEMM's blocking, so its rounding, depends on the thread
    count, which moved activations by ~1e-8 relative between the ranks and a 2-thread reference."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(seed=0, b=23, t=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, tiny.VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(0, b, 3):
        mask[i, : 1 + i % 5] = 0  # left padding
    for i in range(1, b, 4):
        mask[i, t - 2 - i % 4:] = 0  # right padding
    return ids, mask


# ------------------------------------------------------------------ merging, in one process
def test_fold_of_shards_equals_one_pass_for_any_probe():
    """The generic merge (state_dict -> blank copy -> merge) over shard captures gives the
    single-pass state: counts exact, float64 sums within n_batches * 2**-53."""
    model = tiny.build("qwen2_moe")
    ids, mask = _data()
    batches = [(ids[i:i + 3], mask[i:i + 3]) for i in range(0, ids.shape[0], 3)]
    mk = lambda: [wb.NeuronStats(), wb.AbsSketch(), RouterCounts()]  # noqa: E731
    one = mk()
    with Capture(model, probes=one), torch.no_grad():
        for x, m in batches:
            model(input_ids=x, attention_mask=m)
    shards = [mk() for _ in range(3)]
    for r, probes in enumerate(shards):
        with Capture(model, probes=probes), torch.no_grad():
            for x, m in batches[r::3]:
                model(input_ids=x, attention_mask=m)
    for k, p in enumerate(one):
        merged = fold(p, [{kk: v for kk, v in s[k].state_dict().items()} for s in shards])
        ref = p.state_dict()
        assert set(merged) == set(ref) and merged
        for key, v in ref.items():
            if v.is_floating_point():
                torch.testing.assert_close(merged[key], v, rtol=len(batches) * 2.0**-53, atol=0)
            else:
                assert torch.equal(merged[key], v), key


# ------------------------------------------------------------------ two gloo ranks (forked)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, size, port, q):
    try:
        torch.set_num_threads(1)  # OpenMP is not fork-safe beyond one thread
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        world = init_distributed(backend="gloo", timeout_s=60)
        try:
            q.put((rank, "ok", fn(world)))
        finally:
            shutdown(world)
    except BaseException as exc:
        q.put((rank, type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))
    finally:
        q.close()
        q.join_thread()  # flush before leaving without the parent's atexit handlers
        os._exit(0)


def _ranks(fn, size=2, timeout=60) -> dict:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, size, port, q)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        got = dict((r, (kind, val)) for r, kind, val in (q.get(timeout=timeout) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return got


def test_two_gloo_ranks_equal_one_process(tmp_path):
    ids, mask = _data(1)
    model = tiny.build("llama")
    ref = wb.profile(model, ids, attention_mask=mask, batch_size=3, probes=list(PROBES), progress=False)

    def work(world):
        run = profile_corpus(model, ids, attention_mask=mask, batch_size=3, probes=list(PROBES), world=world,
                             out=tmp_path / "run", save_every=25, progress=False)
        return None if run is None else run.meta["scale"]["world_size"]

    got = _ranks(work)
    assert got == {0: ("ok", 2), 1: ("ok", None)}, got
    run = wb.Run.load(tmp_path / "run")
    assert compare_runs(ref, run, rtol=1e-12) == []  # counts and maxima exact, sums within 1e-12
    assert not (tmp_path / "run" / CHECKPOINT).exists()


@pytest.mark.parametrize("what", ["model", "data"])
def test_ranks_that_disagree_fail_clearly(tmp_path, what):
    ids, mask = _data(2)

    def work(world):
        model = tiny.build("llama")
        x = ids
        if world.rank == 1 and what == "model":
            with torch.no_grad():
                model.model.embed_tokens.weight[0, 0] += 1.0
        if world.rank == 1 and what == "data":
            x = ids.clone()
            x[-1, -1] = (x[-1, -1] + 1) % tiny.VOCAB
        profile_corpus(model, x, attention_mask=mask, batch_size=4, world=world, out=tmp_path / "run",
                       progress=False)

    got = _ranks(work)
    field = "weights" if what == "model" else "sha256"
    for r in (0, 1):
        kind, msg = got[r]
        assert kind == "DistributedError", msg
        assert f"rank 1 disagrees with rank 0 on the {field}" in msg and "same model" in msg
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ killed and resumed
class _Kill:
    """Raises KeyboardInterrupt at the model's n-th forward call (a kill between checkpoints)."""

    def __init__(self, model, n):
        self.n, self.calls = n, 0
        self.h = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def _run(model, ids, mask, out, **kw):
    return profile_corpus(model, ids, attention_mask=mask, batch_size=3, probes=list(PROBES), out=out,
                          save_every=20, progress=False, **kw)


def _interrupted(tmp_path, model, ids, mask):
    out = tmp_path / "resumed"
    kill = _Kill(model, 6)
    with pytest.raises(KeyboardInterrupt):
        _run(model, ids, mask, out)
    kill.h.remove()
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]  # no run yet, nothing else
    return out


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    ids, mask = _data(3)
    model = tiny.build("llama")
    full = _run(model, ids, mask, tmp_path / "full")
    out = _interrupted(tmp_path, model, ids, mask)
    calls = _Kill(model, 10**9)
    resumed = _run(model, ids, mask, out, resume=True)
    calls.h.remove()
    assert calls.calls < 8  # only the batches after the checkpoint ran again
    assert compare_runs(full, resumed, rtol=0) == []  # bit for bit
    assert compare_runs(full, wb.Run.load(out), rtol=0) == []
    assert not (out / CHECKPOINT).exists()
    assert resumed.meta["scale"]["resumed_at_tokens"] > 0
    plain = wb.profile(model, ids, attention_mask=mask, batch_size=3, probes=list(PROBES), progress=False)
    assert compare_runs(plain, resumed, rtol=1e-12) == []


def test_resume_refuses_another_model_rule_or_data(tmp_path):
    ids, mask = _data(4)
    model = tiny.build("llama")
    out = _interrupted(tmp_path, model, ids, mask)
    before = (out / CHECKPOINT).read_bytes()
    with pytest.raises(DistributedError, match=r"checkpoint of another profile: its rule .*nothing was changed"):
        profile_corpus(model, ids, attention_mask=mask, batch_size=3, probes=list(PROBES), out=out,
                       rule="fat(0.1)", save_every=20, resume=True, progress=False)
    with pytest.raises(DistributedError, match=r"its model \(class: \"LlamaForCausalLM\" there, \"Qwen2ForCausalLM\""):
        _run(tiny.build("qwen2"), ids, mask, out, resume=True)
    with pytest.raises(DistributedError, match="its batching options"):
        profile_corpus(model, ids, attention_mask=mask, batch_size=5, probes=list(PROBES), out=out,
                       save_every=20, resume=True, progress=False)
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % tiny.VOCAB
    with pytest.raises(DistributedError, match="the data differ from the checkpoint's"):
        _run(model, other, mask, out, resume=True)
    assert (out / CHECKPOINT).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]


def test_output_directory_guards(tmp_path):
    ids, mask = _data(5, b=6)
    model = tiny.build("llama")
    out = tmp_path / "ck"
    kill = _Kill(model, 2)
    with pytest.raises(KeyboardInterrupt):
        profile_corpus(model, ids, attention_mask=mask, batch_size=1, out=out, save_every=5, progress=False)
    kill.h.remove()
    (out / ".checkpoint-abc.tmp").write_bytes(b"half-written")  # a kill during a checkpoint write
    with pytest.raises(DistributedError, match="unfinished profile .* continue it with --resume"):
        profile_corpus(model, ids, attention_mask=mask, batch_size=1, out=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]
    with pytest.raises(DistributedError, match="nothing to resume"):
        profile_corpus(model, ids, attention_mask=mask, out=tmp_path / "empty", resume=True, progress=False)
    done = tmp_path / "done"
    profile_corpus(model, ids, attention_mask=mask, out=done, progress=False)
    with pytest.raises(DistributedError, match="already holds a finished run"):
        profile_corpus(model, ids, attention_mask=mask, out=done, resume=True, progress=False)
    with pytest.raises(RunError, match="already exists and is not empty"):
        profile_corpus(model, ids, attention_mask=mask, out=done, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a workbench run"):
        profile_corpus(model, ids, attention_mask=mask, out=foreign, save_every=5, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_distributed_without_torchrun_environment(tmp_path, monkeypatch, capsys):
    from workbench import cli

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    rc = cli.main(["profile", "builtin:tiny-relu-llama", "--tokens", "64", "--distributed", "--quiet",
                   "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--distributed needs torchrun's environment" in err and "torchrun --nproc_per_node" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ the torchrun command line
@pytest.mark.slow
def test_torchrun_two_process_cli_profile_equals_single_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m workbench.cli profile zoo:relu-llama --tokens 4096
    --distributed` writes the Run of the plain `workbench profile zoo:relu-llama --tokens 4096`."""
    from workbench.data import validation_tokens

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "workbench.cli", "profile", "zoo:relu-llama", "--tokens", "4096",
           "--distributed", "--quiet", "--out", str(tmp_path / "dist")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the single-process reference, as `workbench profile` computes it, while the ranks start
    model = wb.load_model("zoo:relu-llama")
    data, mask, _ = validation_tokens(model, 4096, 256)
    ref = wb.profile(model, data, attention_mask=mask, batch_size=8, max_length=256, probes=list(PROBES),
                     progress=False)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    run = wb.Run.load(tmp_path / "dist")
    assert run.meta["scale"]["world_size"] == 2 and run.meta["scale"]["backend"] == "gloo"
    assert compare_runs(ref, run, rtol=0) == []
    assert run.meta["data"]["n_tokens"] == 4096
    assert "mean token sparsity" in stdout


# ------------------------------------------------------------------ data labels follow their rows
class LabelTokens(wb.probes.Probe):
    """Test probe: valid tokens per data label (as the routing / bricks probes count)."""

    name = "label_tokens"

    def update(self, site, batch, ctx):
        st = self.state.setdefault(site.name, {"n": torch.zeros(16, dtype=torch.int64, device=batch.a.device)})
        lab = batch.labels
        if batch.valid is not None:
            lab = lab[batch.valid]
        st["n"] += torch.bincount(lab, minlength=16)[:16]


def test_labelled_documents_on_two_ranks_equal_one_process(tmp_path):
    from workbench.models.corpus import load_split

    model = wb.load_model("zoo:relu-llama")
    docs = load_split("validation")[:30]
    kw = dict(batch_size=4, max_length=48, max_tokens=1000, progress=False)
    ref = wb.profile(model, docs, probes=["neuron_stats", LabelTokens()], **kw)
    assert ref.meta["labels"]["source"] == "domain" and len(ref.meta["labels"]["names"]) > 1

    def work(world):
        profile_corpus(model, docs, probes=["neuron_stats", LabelTokens()], world=world, out=tmp_path / "run", **kw)

    got = _ranks(work)
    assert got == {0: ("ok", None), 1: ("ok", None)}, got
    run = wb.Run.load(tmp_path / "run")
    assert run.meta["labels"] == ref.meta["labels"]
    assert compare_runs(ref, run, rtol=1e-12) == []
    with pytest.raises(DistributedError, match="labels need the data in memory"):
        profile_corpus(model, iter(["a text"]), labels=["x"], progress=False)


def test_sigkilled_process_resumes_to_the_uninterrupted_run(tmp_path):
    """A real kill (SIGKILL: no exception, no `finally`) in a forked process mid-profile; the
    directory holds only the last checkpoint, and --resume ends with the uninterrupted Run."""
    import signal

    ids, mask = _data(6)
    model = tiny.build("llama")
    full = _run(model, ids, mask, tmp_path / "full")
    out = tmp_path / "killed"
    pid = os.fork()
    if pid == 0:  # the child: profile, and die at the 7th forward call
        try:
            torch.set_num_threads(1)
            calls = [0]

            def die(module, args):
                calls[0] += 1
                if calls[0] == 7:
                    os.kill(os.getpid(), signal.SIGKILL)

            model.register_forward_pre_hook(die)
            _run(model, ids, mask, out)
        finally:
            os._exit(3)  # not reached when killed
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]
    resumed = _run(model, ids, mask, out, resume=True)
    assert resumed.meta["scale"]["resumed_at_tokens"] > 0
    assert compare_runs(full, wb.Run.load(out), rtol=0) == []
