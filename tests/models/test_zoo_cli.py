"""`workbench zoo train`: every argument mistake ends in one `workbench: error:` line, exit 2, before
any training; the shipped checkpoint is never replaced without --overwrite."""

from __future__ import annotations

import pytest
import torch

from tests.cli.test_profile_errors import only_error
from workbench.cli import main
from workbench.models import zoo

KEYS = ("activation_threshold, batch_size, l1, l1_end, l1_start, lr, min_lr_ratio, seq_len, steps, "
        "warmup, weight_decay")


@pytest.fixture
def no_train(monkeypatch):
    from workbench.models import train

    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("training started before the checks"))


def _err(capsys, *argv) -> str:
    assert main(["zoo", "train", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return only_error(err)


@pytest.mark.parametrize("argv,msg", [
    (["--set", "bogus"], "--set 'bogus' is not KEY=VALUE; e.g. --set lr=0.002,steps=500"),
    (["--set", "lr=abc"], "--set lr=abc: lr takes a number (the recipe has 0.003)"),
    (["--set", "warmup=1.5"], "--set warmup=1.5: warmup takes an integer (the recipe has 150)"),
    (["--set", "foo=1"], f"--set foo: relu-llama's recipe has no key 'foo'; settable keys: {KEYS}"),
    (["--steps", "0"], "--steps must be >= 1 (got 0)"),
    (["--steps", "-5"], "--steps must be >= 1 (got -5)"),
    (["--set", "steps=0"], "--set steps must be >= 1 (got 0)"),
    (["--device", "foo"], "--device 'foo' is not a device; use cpu, cuda or cuda:N"),
])
def test_bad_arguments(capsys, no_train, tmp_path, argv, msg):
    assert _err(capsys, "relu-llama", "--out", str(tmp_path / "m"), *argv) == msg


def test_cuda_without_cuda(capsys, no_train, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _err(capsys, "relu-llama", "--device", "cuda", "--out", str(tmp_path)).endswith("; use --device cpu")


def test_out_is_a_file(capsys, no_train, tmp_path):
    f = tmp_path / "README.md"
    f.write_text("mine")
    assert _err(capsys, "relu-llama", "--out", str(f)) == f"--out {f} is a file; choose a directory for the model"


def test_out_foreign_files(capsys, no_train, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert _err(capsys, "relu-llama", "--out", str(tmp_path)) == (
        f"--out {tmp_path} holds files that are not a model; refusing to write into it: choose another --out")


def test_shipped_checkpoint_needs_overwrite(capsys, no_train):
    msg = _err(capsys, "relu-llama")
    assert msg.startswith(f"{zoo.ZOO_DIR / 'relu-llama'} (the default output) already holds the zoo model "
                          "'relu-llama' (config.json, model.safetensors")
    assert msg.endswith("pass --overwrite to replace it, or --out DIR to train into another directory")


def test_checks_pass_then_train(monkeypatch, tmp_path, capsys):
    from workbench.models import train

    got = {}

    def fake(name, **kw):
        got.update(kw, name=name)
        return {"name": name, "validation": {"ppl": 1.0, "unigram_ppl": 2.0}}

    monkeypatch.setattr(train, "train", fake)
    assert main(["zoo", "train", "relu-llama", "--out", str(tmp_path / "m"), "--set", "lr=0.002,steps=5"]) == 0
    assert got["overrides"] == {"lr": 0.002, "steps": 5} and got["out"] == str(tmp_path / "m")
    assert main(["zoo", "train", "relu-llama", "--overwrite", "--steps", "3"]) == 0  # the shipped one, asked for
    assert got["out"] is None and got["steps"] == 3
