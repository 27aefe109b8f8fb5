"""Every mistake the issue lists ends in `workbench: error: <cause and fix>`, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests import tiny
from workbench.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["profile", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def only_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("workbench: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("workbench: error: ")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import workbench

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(workbench, "load_model", boom)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny.build("llama").save_pretrained(d)
    return d


def test_text_missing_file(capsys, no_load, tmp_path):
    rc, err = run_cli(capsys, "--text", str(tmp_path / "nope.txt"))
    assert rc == 2
    assert only_error(err) == f"--text {tmp_path / 'nope.txt'}: no such file; pass a UTF-8 text file"


def test_text_binary_file(capsys, no_load, tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"ELF\x00\x01\x02")
    rc, err = run_cli(capsys, "--text", str(f))
    assert rc == 2
    assert only_error(err) == f"--text {f} is a binary file (NUL byte at offset 3); pass a UTF-8 text file"


def test_text_not_utf8(capsys, no_load, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait".encode("latin-1"))
    rc, err = run_cli(capsys, "--text", str(f))
    assert rc == 2
    assert "is not UTF-8 text (byte 0xe9 at offset 3)" in only_error(err)


def test_dtype_bogus(capsys, no_load):
    rc, err = run_cli(capsys, "--dtype", "bogus")
    assert rc == 2
    assert only_error(err) == "--dtype 'bogus' is not a dtype; use one of float32, bfloat16, float16, float64"


def test_device_cuda_without_cuda(capsys, no_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = run_cli(capsys, "--device", "cuda")
    assert rc == 2
    msg = only_error(err)
    assert msg.startswith("--device cuda: CUDA is not available on this machine (torch ")
    assert msg.endswith("; use --device cpu")


@pytest.mark.parametrize("flag", ["--batch-size", "--seq-len", "--tokens", "--max-tokens", "--save-every"])
def test_counts_below_one(capsys, no_load, flag):
    rc, err = run_cli(capsys, flag, "0")
    assert rc == 2
    assert only_error(err) == f"{flag} must be >= 1 (got 0)"


def test_invalid_config_json(capsys, tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    rc, err = run_cli(capsys, str(tmp_path), "--tokens", "8")
    assert rc == 2
    assert only_error(err) == (f"{tmp_path / 'config.json'} is not valid JSON (Expecting property name enclosed "
                               "in double quotes, line 1 column 24); repair it or download the model again")


def test_truncated_safetensors(capsys, llama_dir, tmp_path):
    import shutil

    d = tmp_path / "trunc"
    shutil.copytree(llama_dir, d)
    f = d / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    rc, err = run_cli(capsys, str(d), "--tokens", "8")
    assert rc == 2
    assert only_error(err) == (f"{f} is truncated: {size // 2:,} bytes, its header describes {size:,}; "
                               "download the model again (or re-save it)")


def test_out_existing_run_refused_before_loading(capsys, no_load, tmp_path):
    (tmp_path / "run.json").write_text("{}")
    rc, err = run_cli(capsys, "--out", str(tmp_path))
    assert rc == 2
    assert only_error(err) == (f"--out {tmp_path} already holds a run; pass --overwrite to replace it, "
                               "or choose another --out")


def test_out_foreign_dir_refused_even_with_overwrite(capsys, no_load, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    rc, err = run_cli(capsys, "--out", str(tmp_path), "--overwrite")
    assert rc == 2
    assert "holds files that are not a workbench run" in only_error(err)


def test_seq_len_longer_than_model(capsys, llama_dir):
    rc, err = run_cli(capsys, str(llama_dir), "--tokens", "8", "--seq-len", "65")
    assert rc == 2
    assert only_error(err) == ("--seq-len 65 is longer than the model's max_position_embeddings (64); "
                               "pass --seq-len 64 or less")


def test_argparse_errors_take_the_same_path(capsys):
    rc, err = run_cli(capsys, "--batch-size", "x")
    assert rc == 2
    assert only_error(err) == "argument --batch-size: invalid int value: 'x'"


def test_console_exit_code_and_no_traceback():
    """The real process: status 2, one error line, no traceback (and a quick start)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "profile", "--batch-size", "0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "workbench: error: --batch-size must be >= 1 (got 0)"


def test_closed_pipe_ends_quietly():
    """`workbench zoo list | head -1`: the reader closes the pipe; status 141, no traceback."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; from workbench.cli import main; "
                          "sys.argv = ['workbench', 'zoo', 'list']; sys.exit(main())"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_dtype_alias_reaches_the_scale_path(capsys, tmp_path):
    """--dtype bf16 with --corpus: the parsed dtype is handed to the scale path, not the raw string."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n")
    rc, err = run_cli(capsys, "zoo:relu-llama", "--corpus", str(corpus), "--dtype", "bf16", "--quiet",
                      "--seq-len", "16", "--out", str(tmp_path / "r"))
    assert rc == 0, err
    import workbench as wb

    assert wb.Run.load(tmp_path / "r").meta["model"]["dtype"] == "bfloat16"


def _checkpoint(out, tokens: int) -> None:
    from workbench.capture.distributed import _write_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    _write_checkpoint(out, {}, {"batches": 1, "tokens": tokens, "sequences": 1, "forward_calls": 1,
                                "sha256_state": "0"}, [])


def test_out_unfinished_checkpoint_without_resume(capsys, no_load, tmp_path):
    """docs/scaling.md: an unfinished checkpoint but no --resume names the fix."""
    _checkpoint(tmp_path / "big", 5120)
    rc, err = run_cli(capsys, "--corpus", str(tmp_path / "c.jsonl"), "--save-every", "5000",
                      "--out", str(tmp_path / "big"))
    assert rc == 2
    assert only_error(err) == (f"--out {tmp_path / 'big'} holds an unfinished profile (checkpoint at 5120 "
                               "tokens): add --resume to continue it, or choose another --out")


def test_ctrl_c_names_the_checkpoint(capsys, monkeypatch, tmp_path):
    from workbench.capture import distributed

    def interrupted(args, source, out, **kw):
        _checkpoint(out, 4096)
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "cli_profile", interrupted)
    rc = main(["profile", "--corpus", str(tmp_path / "c.jsonl"), "--save-every", "5000", "--out", str(tmp_path / "big")])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert err.strip() == (f"workbench: interrupted; the last checkpoint (4096 tokens) is in {tmp_path / 'big'}: "
                           "run the same command with --resume to continue")


def test_ctrl_c_without_checkpoint(capsys, monkeypatch):
    import workbench

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(workbench, "load_model", interrupted)
    rc = main(["profile", "--tokens", "8"])
    assert rc == 130
    assert capsys.readouterr().err.strip() == "workbench: interrupted"


def test_max_tokens_applies_to_text(capsys, tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    rc, err = run_cli(capsys, "zoo:relu-llama", "--text", str(f), "--max-tokens", "50", "--quiet",
                      "--out", str(tmp_path / "r"))
    assert rc == 0, err
    import workbench as wb

    assert wb.Run.load(tmp_path / "r").meta["data"]["n_tokens"] == 50


@pytest.mark.parametrize("name,tail", [
    ("topk-moe", "profile its routing instead: wb.profile(model, docs, probes=[wb.RoutingProbe()])"),
    ("mamba2", "scan its state instead: workbench.metrics.state.state_scan(model, ids)"),
])
def test_model_without_dense_ffn_names_what_to_use(capsys, tmp_path, name, tail):
    rc, err = run_cli(capsys, f"zoo:{name}", "--tokens", "64", "--quiet", "--out", str(tmp_path / "r"))
    assert rc == 2
    msg = only_error(err)
    assert msg.endswith(tail) and "register_adapter" not in msg


def test_unknown_zoo_name_lists_the_zoo_once(capsys):
    rc, err = run_cli(capsys, "zoo:nope", "--tokens", "8")
    assert rc == 2
    msg = only_error(err)
    assert msg.startswith("unknown zoo model 'nope'; the zoo has: relu-llama, ")
    assert msg.count("silu-llama") == 1


def test_model_dir_without_weights_says_how_to_save_one(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    rc, err = run_cli(capsys, str(tmp_path), "--tokens", "8")
    assert rc == 2
    assert only_error(err) == (f"{tmp_path} has no weights (*.safetensors): a model directory needs config.json "
                               "and its weights as *.safetensors; write one with model.save_pretrained(DIR) "
                               "(and the tokenizer with tokenizer.save_pretrained(DIR))")


def test_text_and_corpus_together_are_refused(capsys, no_load, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    rc = main(["profile", "--text", str(f), "--corpus", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and "--text and --corpus both given" in only_error(err)


@pytest.mark.parametrize("argv, what", [
    (["--corpus", "c.jsonl", "--tokens", "100"], "--tokens counts tokens of the bundled validation text"),
    (["--split", "train"], "--split describe a --corpus"),
    (["--text-field", "body", "--tokens", "64"], "--text-field describe a --corpus"),
])
def test_flags_that_would_be_ignored_are_refused(capsys, no_load, argv, what):
    rc = main(["profile", *argv])
    assert rc == 2 and what in only_error(capsys.readouterr().err)
