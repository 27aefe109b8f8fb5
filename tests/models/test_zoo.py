"""The zoo: loading (wb.load_model and plain from_pretrained), generation, tokenizer round trip,
the required sparsity figures, the cards' numbers reproduced, and clear errors for damaged
checkpoints. Measurements run on the cards' "quick" validation subset (a few thousand tokens).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.errors import ModelLoadError
from workbench.models import zoo

NAMES = list(zoo.SPECS)
BUILT = [n for n in NAMES if n in zoo.available()]

pytestmark = pytest.mark.skipif(not BUILT, reason="no zoo checkpoints under data/zoo")


@pytest.fixture(scope="module")
def quick_windows():
    from workbench.models.train import quick_windows as q
    from workbench.models.train import validation_windows

    return q(validation_windows(256))


@pytest.fixture(scope="module")
def unigram():
    from workbench.models.train import unigram_logprobs

    return unigram_logprobs(4096)


def test_every_registered_model_is_built():
    assert sorted(BUILT) == sorted(NAMES)


def test_zoo_size_budget():
    total = sum(f.stat().st_size for f in zoo.ZOO_DIR.rglob("*") if f.is_file())
    assert total < 40e6


def test_tokenizer_round_trip():
    from workbench.models.corpus import load_split
    from workbench.models.tokenizer import load

    tok = load()
    assert 4000 <= len(tok) <= 8192
    docs = load_split("validation")
    for d in docs[:: max(1, len(docs) // 40)]:
        ids = tok(d.text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == d.text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_corpus_domains_and_split():
    from workbench.models.corpus import DOMAINS, load_split, manifest

    man = manifest()
    val = load_split("validation")
    assert {d.domain for d in val} == set(DOMAINS)
    assert set(man["stats"]["train"]) == set(DOMAINS)
    ids = {d.id for d in val}
    assert len(ids) == len(val)
    assert all(e[2] == ("validation" if e[0] in ids else "train") for e in man["documents"])


@pytest.mark.parametrize("name", BUILT)
def test_card_exists_and_states_the_facts(name):
    path = zoo.resolve(name)
    card = (path / "README.md").read_text()
    m = zoo.card_metrics(name)
    for needle in ("parameters", "unigram perplexity", "reproduce", "Loss curve", "tokens"):
        assert needle in card
    v = m["validation"]
    assert f"{v['ppl']:.3f}" in card and f"{v['unigram_ppl']:.3f}" in card
    assert v["ppl"] <= v["unigram_ppl"] / 4, "validation ppl must be at most a quarter of unigram ppl"
    cfg = json.loads((path / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size"):
        if key in cfg:
            assert cfg[key] % 64 == 0


@pytest.mark.parametrize("name", BUILT)
def test_loads_both_ways_and_generates(name):
    from transformers import AutoModelForCausalLM

    model = wb.load_model(f"zoo:{name}")
    tok = model.tokenizer
    plain = AutoModelForCausalLM.from_pretrained(zoo.resolve(name))
    assert type(plain).__name__ == type(model).__name__
    ids = tok("def main():\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = plain.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    text = tok.decode(out[0, ids.shape[1] :])
    assert isinstance(text, str) and text


@pytest.mark.parametrize("name", BUILT)
def test_card_figures_reproduce(name, quick_windows, unigram):
    """The card's quick figures, recomputed here from the checkpoint, on CPU."""
    from workbench.models.train import evaluate, load_zoo_model, validation_windows
    from workbench.models.train import quick_windows as q

    model, _ = load_zoo_model(name)
    seq_len = zoo.spec(name).recipe["seq_len"]  # the state-capacity pair is measured at 128
    windows = quick_windows if seq_len == 256 else q(validation_windows(seq_len))
    got = evaluate(model, windows, zoo.spec(name).sparsity, unigram=unigram)
    want = zoo.card_metrics(name)["validation_quick"]
    assert got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], abs=2e-3)
    assert got["unigram_ppl"] == pytest.approx(want["unigram_ppl"], rel=1e-6)
    if "sparsity" in want:
        assert got["sparsity"]["tls"] == pytest.approx(want["sparsity"]["tls"], abs=2e-3)
        assert got["sparsity"]["cls_8"] == pytest.approx(want["sparsity"]["cls_8"], abs=2e-3)


def test_relu_llama_sparsity_and_ppl_vs_silu_twin():
    relu, silu = zoo.card_metrics("relu-llama"), zoo.card_metrics("silu-llama")
    rule_tls = relu["validation"]["sparsity"]["tls"]
    if relu["recipe"].get("activation_threshold"):
        rule_tls = relu["fatrelu"][str(relu["recipe"]["activation_threshold"])]["tls"]
    assert rule_tls >= 0.75
    assert relu["validation"]["ppl"] <= 1.10 * silu["validation"]["ppl"]


def _ids_mask(windows, pad):
    t = max(len(w) for _, w in windows)
    ids = torch.full((len(windows), t), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (_, w) in enumerate(windows):
        ids[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = 1
    return ids, mask


def test_relu_llama_sparsity_measured_by_profile(quick_windows):
    """TLS of relu-llama through the workbench's own capture (wb.profile) matches the card."""
    model = wb.load_model("zoo:relu-llama", dtype=torch.float32)
    ids, mask = _ids_mask(quick_windows, model.config.pad_token_id)
    run = wb.profile(model, ids, attention_mask=mask, batch_size=16, progress=False)
    df = run.summary()
    tls = float((df["token_sparsity"] * df["d_ff"]).sum() / df["d_ff"].sum())
    card = zoo.card_metrics("relu-llama")["validation_quick"]["sparsity"]["tls"]
    assert tls == pytest.approx(card, abs=2e-3)


@pytest.mark.parametrize("name", ["blockffn", "blockffn-null"])
def test_blockffn_cls_measured_by_chunk_table(name, quick_windows):
    """TLS and CLS_8 over the router experts through workbench.metrics.chunks match the card."""
    from workbench.metrics.chunks import chunk_table

    model = wb.load_model(f"zoo:{name}", dtype=torch.float32)
    ids, mask = _ids_mask(quick_windows, model.config.pad_token_id)
    df = chunk_table(model, [(ids, mask)], units="experts", lengths=(1, 8))
    row = df[(df.layer == -1) & (df.L == 8)].iloc[0]
    card = zoo.card_metrics(name)["validation_quick"]["sparsity"]
    assert float(row.tls) == pytest.approx(card["tls"], abs=2e-3)
    assert float(row.cls) == pytest.approx(card["cls_8"], abs=2e-3)


def test_blockffn_cls8_gap():
    on = zoo.card_metrics("blockffn")["validation"]["sparsity"]["cls_8"]
    off = zoo.card_metrics("blockffn-null")["validation"]["sparsity"]["cls_8"]
    assert on - off >= 0.25


def test_blockffn_router_hook_sees_scores():
    model = wb.load_model("zoo:blockffn")
    seen = []
    router = model.model.layers[0].mlp.router
    h = router.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8]]))
    finally:
        h.remove()
    assert seen and seen[0].shape[-1] == model.config.n_experts
    assert (seen[0] >= 0).all() and (seen[0] == 0).any()


def _copy(name, tmp_path) -> Path:
    dst = tmp_path / "zoo" / name
    shutil.copytree(zoo.resolve(name), dst)
    return dst


def test_missing_checkpoint_names_file_and_fix(tmp_path, monkeypatch):
    dst = _copy("relu-llama", tmp_path)
    (dst / "model.safetensors").unlink()
    monkeypatch.setattr(zoo, "ZOO_DIR", dst.parent)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*missing.*workbench zoo train relu-llama"):
        zoo.resolve("relu-llama")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        wb.load_model("zoo:relu-llama")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_checkpoint_names_file_and_fix(tmp_path, monkeypatch, damage):
    dst = _copy("relu-llama", tmp_path)
    f = dst / "model.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-100] ^= 0xFF
    f.write_bytes(bytes(raw))
    monkeypatch.setattr(zoo, "ZOO_DIR", dst.parent)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*corrupted.*workbench zoo train relu-llama"):
        zoo.resolve("relu-llama")


def test_unknown_name_lists_the_zoo():
    with pytest.raises(ModelLoadError, match="relu-llama"):
        zoo.resolve("no-such-model")


def test_zoo_cli_list(capsys):
    from workbench.models.zoo_cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for n in NAMES:
        assert n in out


def test_training_is_seeded_on_cpu(tmp_path):
    """Same corpus + seed -> the same model on CPU (2 tiny steps twice)."""
    from workbench.models.train import build_model, l1_factor

    assert l1_factor(0, 100, {"l1": 1.0}) == 0.0
    assert l1_factor(99, 100, {"l1": 1.0}) == 1.0
    torch.manual_seed(0)
    a = build_model(zoo.spec("relu-llama"))
    torch.manual_seed(0)
    b = build_model(zoo.spec("relu-llama"))
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


@pytest.mark.slow
def test_cpu_training_end_to_end_is_reproducible(tmp_path):
    """`zoo train` on CPU writes a loadable, carded model; same seed -> same validation loss."""
    from transformers import AutoModelForCausalLM

    from workbench.models.train import train

    kw = dict(device="cpu", seed=3, steps=3, overrides={"batch_size": 2, "warmup": 1, "l1_start": 0.0},
              max_eval_windows=4, log=lambda s: None)
    a = train("relu-llama", out=tmp_path / "a", **kw)
    b = train("relu-llama", out=tmp_path / "b", **kw)
    assert a["validation"]["loss"] == b["validation"]["loss"]
    assert a["checkpoint_sha256"] == b["checkpoint_sha256"]
    assert (tmp_path / "a" / "README.md").is_file()
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert m.config.hidden_act == "relu"
