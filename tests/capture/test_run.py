"""Run save/load: round trip, damaged or foreign directories, no silent overwrite; merge."""

from __future__ import annotations

import json

import pytest
import torch

import workbench as wb
from tests import tiny
from workbench.capture import Run
from workbench.errors import CaptureError, RunError


@pytest.fixture(scope="module")
def run():
    model = tiny.build("llama")
    ids = torch.randint(1, tiny.VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    return wb.profile(model, ids, batch_size=3, probes=["neuron_stats", "abs_sketch", "activation_sample"],
                      progress=False)


def test_round_trip(run, tmp_path):
    path = run.save(tmp_path / "r")
    back = Run.load(path)
    assert back.meta["version"] == 1 and back.meta["format"] == "workbench-run"
    assert back.meta["model"]["class"] == "LlamaForCausalLM"
    assert back.meta["data"]["n_tokens"] == 36
    assert back.meta["data"]["sha256"]
    assert back.summary().equals(run.summary())
    assert set(back.tensors) == set(run.tensors)
    assert (tmp_path / "r" / "summary.csv").is_file()
    assert back.get("activation_sample", "model.layers.0.mlp", "acts").shape == (256, 48)


def test_refuses_to_overwrite(run, tmp_path):
    run.save(tmp_path / "r")
    with pytest.raises(RunError, match="overwrite=True"):
        run.save(tmp_path / "r")
    run.save(tmp_path / "r", overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(RunError, match="not a workbench run"):
        run.save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "precious"


def test_save_under_a_file_is_named(run, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunError, match="afile is a file, not a directory"):
        run.save(tmp_path / "afile" / "sub")


def test_overwrite_keeps_the_users_other_files_in_a_run_folder(run, tmp_path):
    path = run.save(tmp_path / "r")
    (path / "notes.txt").write_text("precious")
    (path / "figs").mkdir()
    (path / "figs" / "a.png").write_bytes(b"png")
    small = wb.profile(tiny.build("llama"), torch.randint(1, tiny.VOCAB, (1, 5)), progress=False)
    small.save(path, overwrite=True)
    assert (path / "notes.txt").read_text() == "precious" and (path / "figs" / "a.png").read_bytes() == b"png"
    assert Run.load(path).meta["data"]["n_tokens"] == 5  # the new run replaced the old one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no temporary left behind
    # without other files: the old folder is swapped out whole, nothing stale stays
    plain = run.save(tmp_path / "p")
    small.save(plain, overwrite=True)
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in path.iterdir() if p.suffix != ".txt"
                                                             and p.name != "figs")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


@pytest.mark.parametrize("damage", ["no_json", "bad_json", "foreign", "future", "no_tensors", "bad_tensors",
                                    "missing_site"])
def test_damaged_runs_raise_clear_errors(run, tmp_path, damage):
    path = run.save(tmp_path / "r")
    meta = json.loads((path / "run.json").read_text())
    if damage == "no_json":
        (path / "run.json").unlink()
    elif damage == "bad_json":
        (path / "run.json").write_text("{not json")
    elif damage == "foreign":
        (path / "run.json").write_text(json.dumps({"hello": 1}))
    elif damage == "future":
        meta["version"] = 99
        (path / "run.json").write_text(json.dumps(meta))
    elif damage == "no_tensors":
        (path / "tensors.safetensors").unlink()
    elif damage == "bad_tensors":
        (path / "tensors.safetensors").write_bytes(b"garbage" * 10)
    elif damage == "missing_site":
        meta["sites"].append(dict(meta["sites"][0], name="model.layers.9.mlp"))
        (path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunError):
        Run.load(path)


def test_load_not_a_directory(tmp_path):
    with pytest.raises(RunError, match="not a directory"):
        Run.load(tmp_path / "nope")


def test_empty_dataset_is_an_error():
    model = tiny.build("llama")
    with pytest.raises(CaptureError, match="empty"):
        wb.profile(model, torch.zeros((2, 4), dtype=torch.long), attention_mask=torch.zeros((2, 4), dtype=torch.long),
                   progress=False)


def test_max_tokens_truncates_in_reading_order():
    model = tiny.build("llama")
    ids = torch.randint(1, tiny.VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    run = wb.profile(model, ids, max_tokens=20, batch_size=2, progress=False)
    assert (run.summary()["tokens"] == 20).all()
    assert run.meta["data"]["n_tokens"] == 20


def test_merge_equals_one_pass():
    model = tiny.build("gpt2")
    ids = torch.randint(1, tiny.VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
    whole = wb.profile(model, ids, probes=["neuron_stats", "abs_sketch"], progress=False)
    p1, p2 = wb.NeuronStats(), wb.NeuronStats()
    s1, s2 = wb.AbsSketch(), wb.AbsSketch()
    with wb.capture(model, probes=[p1, s1]):
        model(input_ids=ids[:2])
    with wb.capture(model, probes=[p2, s2]):
        model(input_ids=ids[2:])
    p1.merge(p2)
    s1.merge(s2)
    for k, v in {**p1.state_dict(), **s1.state_dict()}.items():
        ref = whole.tensors[k]
        if v.dtype.is_floating_point:  # batch composition changes float rounding only
            torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-7, msg=k)
        else:
            assert torch.equal(v, ref), k


def test_profile_refuses_bad_counts_and_foreign_ids():
    model = tiny.build("llama")
    ids = torch.randint(1, tiny.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    for kw, what in ((dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-5), "max_tokens"),
                     (dict(batch_size=0), "batch_size"), (dict(batch_size=1.5), "batch_size")):
        with pytest.raises(CaptureError, match=f"{what} must be a whole number >= 1"):
            wb.profile(model, ids, progress=False, **kw)
    for bad in (ids + tiny.VOCAB, ids - tiny.VOCAB):  # another tokenizer's ids: named, not torch's IndexError
        with pytest.raises(CaptureError, match=r"token ids must lie in \[0, "):
            wb.profile(model, bad, progress=False)
    run = wb.profile(model, ids, progress=False, probes="neuron_stats")  # one probe, not a list
    assert run.meta["data"]["n_tokens"] == 12


@pytest.mark.parametrize("edit, what", [
    (lambda m: m.pop("rule"), "'rule' is missing"),
    (lambda m: m.update(rule="garbage(("), "'rule' is missing or not an object"),
    (lambda m: m.update(rule={"kind": "bogus"}), "'rule' cannot be read"),
    (lambda m: m.update(sites="abc"), "'sites' must be a list of objects"),
    (lambda m: m["sites"][0].pop("name"), "site 0 lacks 'name'"),
    (lambda m: m["sites"][1].pop("d_ff"), "site 1 lacks 'd_ff'"),
])
def test_load_names_a_hand_edited_run_json(run, tmp_path, edit, what):
    path = run.save(tmp_path / "r")
    meta = json.loads((path / "run.json").read_text())
    edit(meta)
    (path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match=f"{what}.*re-create it"):
        Run.load(path)
