"""The two-stage recipe (issue 25): `train` continues at a longer length after the normal run
when the recipe has a "stage2" key, and `continue_stage2` (stage 2 only, from a saved stage-1
checkpoint) lands on the same weights bit for bit. A tiny Mamba-2 with the zoo tokenizer, a few
steps; the validation windows are synthetic and the long-context measurements stubbed (their
own tests cover them), so that only the wiring is under test here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.models import train as tr
from workbench.models import zoo
from workbench.models.corpus import DOMAINS

NAME = "mamba2-s16"


@pytest.fixture
def tiny(monkeypatch):
    base = zoo.spec(NAME)
    cfg = {**base.config, "hidden_size": 32, "num_hidden_layers": 2, "head_dim": 8, "num_heads": 8,
           "chunk_size": 16, "state_size": 8}
    recipe = {**base.recipe, "steps": 3, "batch_size": 2, "seq_len": 64, "warmup": 1, "passkey_share": 0.5,
              "stage2": {"seq_len": 128, "steps": 2, "lr": 1e-3, "warmup": 1}}
    monkeypatch.setitem(zoo.SPECS, NAME, zoo.ZooSpec(NAME, base.family, base.description, cfg, recipe,
                                                    base.sparsity))
    rng = np.random.default_rng(0)
    monkeypatch.setattr(tr, "validation_windows", lambda seq_len=256: [
        (d, rng.integers(2, 4096, seq_len).tolist()) for d in DOMAINS for _ in range(2)])
    calls = []

    def stub(kind):
        def f(*a, **k):
            calls.append((kind, a[1:] if kind == "state" else a[2:], k))
            return {"stub": kind}
        return f

    monkeypatch.setattr(tr, "passkey_eval", stub("passkey"))
    monkeypatch.setattr(tr, "state_figures", stub("state"))
    monkeypatch.setattr(tr, "mamba2_drift", stub("drift"))
    monkeypatch.setattr(tr, "write_card", lambda out, m: (out / "README.md").write_text(
        "\n".join(tr._training_lines(m))))
    return calls


def test_stage2_recipe_inherits_and_refuses_regularisers():
    r = tr.stage2_recipe({"seq_len": 128, "batch_size": 16, "lr": 3e-3, "warmup": 60, "min_lr_ratio": 0.1,
                          "passkey_share": 0.75, "stage2": {"seq_len": 512, "steps": 5, "lr": 1e-3, "warmup": 2}})
    assert r["seq_len"] == 512 and r["lr"] == 1e-3 and r["batch_size"] == 16 and r["passkey_share"] == 0.75
    assert "stage2" not in r
    assert tr.stage2_recipe({"seq_len": 128}) is None
    with pytest.raises(ValueError, match="l1"):
        tr.stage2_recipe({"l1": 0.1, "stage2": {"steps": 1}})


def test_two_stage_train_equals_stage2_from_the_checkpoint(tiny, tmp_path):
    kw = dict(device="cpu", seed=0, log=lambda s: None)
    a = tr.train(NAME, out=tmp_path / "a", **kw)
    r2 = a["stage2"]["recipe"]
    assert a["stage1"]["steps"] == 3 and a["stage2"]["steps"] == 2 and r2["seq_len"] == 128
    assert a["tokens_seen"] == 3 * 2 * 64 + 2 * 2 * 128
    assert [h["step"] for h in a["stage2"]["history"]] == [2] and a["stage2"]["curve"]
    assert np.isfinite(a["stage2"]["validation"]["loss"])
    # lengths stay multiples of the stage-1 length; collapse flags past the final length
    assert ("passkey", (64,), {}) in tiny
    assert ("state", (64,), {"train_len": 128}) in tiny
    card = (tmp_path / "a" / "README.md").read_text()
    assert "stage 2" in card and "x **128** tokens" in card
    # stage 1 alone, then stage 2 from its saved (bf16) checkpoint: the same weights
    c = tr.train(NAME, out=tmp_path / "c", overrides={"stage2": None}, **kw)
    assert "stage2" not in c and c["tokens_seen"] == 3 * 2 * 64
    d = tr.continue_stage2(NAME, tmp_path / "d", src=tmp_path / "c", n_keys=1, log=lambda s: None)
    assert d["checkpoint_sha256"] == a["checkpoint_sha256"] != c["checkpoint_sha256"]
    assert d["stage1"]["checkpoint_sha256"] == c["checkpoint_sha256"]
    assert d["tokens_seen"] == a["tokens_seen"]
    assert json.loads((tmp_path / "d" / zoo.METRICS).read_text())["recipe"]["stage2"]["seq_len"] == 128
