"""wb.load_model: hub ids through the HF cache (offline), local directories, pickle refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import workbench as wb
from tests import tiny
from workbench.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[2]


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(tiny.VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


@pytest.fixture()
def model_dir(tmp_path):
    model = tiny.build("llama")
    model.save_pretrained(tmp_path / "m")
    _save_tokenizer(tmp_path / "m")
    return tmp_path / "m", model


def test_local_directory_with_tokenizer(model_dir):
    path, ref = model_dir
    model = wb.load_model(path)
    assert model.tokenizer is not None
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    run = wb.profile(model, ["w1 w2 w3 w4", "w5 w6"], progress=False)
    assert run.summary()["tokens"].tolist() == [6, 6]
    assert run.meta["model"]["source"] == str(path.resolve())


def test_dtype_and_device_pass_through(model_dir):
    path, _ = model_dir
    model = wb.load_model(path, dtype=torch.bfloat16, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pickle_checkpoints_refused_unless_opted_in(tmp_path):
    model = tiny.build("llama")
    _save_bin(model, tmp_path / "p")
    with pytest.raises(ModelLoadError, match="pickle"):
        wb.load_model(tmp_path / "p")
    loaded = wb.load_model(tmp_path / "p", allow_pickle=True)
    assert loaded.config.model_type == "llama"


def _save_bin(model, path: Path) -> None:
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def test_missing_directory_and_bad_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        wb.load_model(tmp_path / "nothing" / "here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        wb.load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="zoo model"):
        wb.load_model("zoo:no-such-model")


def test_remote_code_is_off_by_default(tmp_path):
    path = tmp_path / "rc"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "custom-x", "auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}}))
    (path / "model.safetensors").write_bytes(b"")
    (path / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        wb.load_model(path)


def test_hub_id_from_offline_cache(tmp_path, model_dir):
    """A cache directory in the hub's snapshot layout, read with HF_HUB_OFFLINE=1."""
    src, ref = model_dir
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    ids = [[3, 4, 5, 6]]
    expected = ref(input_ids=torch.tensor(ids)).logits[0, -1].tolist()
    code = textwrap.dedent(f"""
        import json, torch, workbench as wb
        m = wb.load_model("tiny-org/tiny-llama")
        out = m(input_ids=torch.tensor({ids})).logits[0, -1].tolist()
        print(json.dumps({{"tok": m.tokenizer is not None, "logits": out, "source": m.wb_source}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["tok"] and got["source"] == "tiny-org/tiny-llama"
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected))
    # and a hub id that is not cached gives the clear offline error
    code2 = "import workbench as wb\ntry:\n    wb.load_model('tiny-org/absent')\nexcept wb.WorkbenchError as e:\n    print('ERR', e)\n"
    res2 = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert "not in the Hugging Face cache" in res2.stdout, res2.stdout + res2.stderr[-2000:]


def test_activation_threshold_applies_fatrelu(tmp_path):
    model = tiny.build("llama")
    model.config.activation_threshold = 0.05
    model.save_pretrained(tmp_path / "t")
    loaded = wb.load_model(tmp_path / "t")
    sites = wb.locate(loaded).ffns
    assert all(s.activation == "fatrelu" and s.threshold == 0.05 for s in sites)
    plain = wb.load_model(tmp_path / "t", apply_threshold=False)
    assert all(s.activation == "relu" for s in wb.locate(plain).ffns)
    ids = torch.randint(1, tiny.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    fat = wb.profile(loaded, ids, progress=False).summary()["token_sparsity"]
    relu = wb.profile(plain, ids, progress=False).summary()["token_sparsity"]
    assert (fat > relu).all()


def test_dtype_names_and_aliases(model_dir):
    path, _ = model_dir
    assert next(wb.load_model(path, dtype="bf16").parameters()).dtype == torch.bfloat16
    assert next(wb.load_model(path, dtype="torch.float16").parameters()).dtype == torch.float16
    with pytest.raises(ModelLoadError, match=r"dtype 'bogus' is not a dtype; use one of float32, bfloat16, float16, float64"):
        wb.load_model("zoo:relu-llama", dtype="bogus")


def test_cuda_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"^CUDA is not available here: use device='cpu'$"):
        wb.load_model("zoo:relu-llama", device="cuda")
    with pytest.raises(ModelLoadError, match=r"device 'foo' is not a device"):
        wb.load_model("builtin:tiny-relu-llama", device="foo")
