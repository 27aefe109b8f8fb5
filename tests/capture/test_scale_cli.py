"""`workbench profile` with the scale flags (in this process): --device-map, --save-every,
--resume, --corpus; errors leave the directory as it was."""

from __future__ import annotations

import json

import workbench as wb
from workbench import cli
from workbench.capture.distributed import CHECKPOINT, compare_runs


def _profile(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["profile", "zoo:relu-llama", "--quiet", "--seq-len", "64", *argv])
    return rc, capsys.readouterr().err


def test_cli_scale_flags_give_the_plain_run(tmp_path, capsys):
    assert _profile(capsys, "--tokens", "600", "--out", str(tmp_path / "plain"))[0] == 0
    plain = wb.Run.load(tmp_path / "plain")
    assert _profile(capsys, "--tokens", "600", "--device-map", "auto", "--save-every", "200",
                    "--out", str(tmp_path / "dm"))[0] == 0
    got = wb.Run.load(tmp_path / "dm")
    assert compare_runs(plain, got, rtol=1e-12) == []
    assert got.meta["scale"]["save_every"] == 200 and not (tmp_path / "dm" / CHECKPOINT).exists()
    # --resume on a directory of another rule: refused, the directory unchanged
    ck = tmp_path / "ck"
    ck.mkdir()
    from workbench.capture.distributed import _identity, _write_checkpoint
    from workbench.capture.probes import make_probes

    model = wb.load_model("zoo:relu-llama")
    ident = _identity(model, wb.Rule.parse("fat(0.1)"), make_probes(["neuron_stats", "abs_sketch"]), {}, {})
    _write_checkpoint(ck, ident, {"batches": 1, "tokens": 64, "sequences": 1, "forward_calls": 1,
                                  "sha256_state": "0"}, [])
    before = (ck / CHECKPOINT).read_bytes()
    rc, err = _profile(capsys, "--tokens", "600", "--resume", "--out", str(ck))
    assert rc == 2 and "checkpoint of another profile" in err and "rule" in err
    assert (ck / CHECKPOINT).read_bytes() == before and [p.name for p in ck.iterdir()] == [CHECKPOINT]
    rc, err = _profile(capsys, "--tokens", "600", "--resume")
    assert rc == 2 and "--resume needs --out DIR" in err


def test_cli_streams_a_jsonl_corpus(tmp_path, capsys):
    texts = [f"def g{i}(y):\n    return y - {i}" for i in range(60)]
    with open(tmp_path / "c.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"content": t}) + "\n")
    rc, err = _profile(capsys, "--corpus", str(tmp_path / "c.jsonl"), "--text-field", "content", "--max-tokens",
                       "500", "--batch-size", "4", "--out", str(tmp_path / "r"))
    assert rc == 0, err
    run = wb.Run.load(tmp_path / "r")
    ref = wb.profile(wb.load_model("zoo:relu-llama"), texts, batch_size=4, max_length=64, max_tokens=500,
                     probes=["neuron_stats", "abs_sketch"], progress=False)
    assert run.meta["data"]["n_tokens"] == 500 and run.meta["data"]["format"] == "jsonl"
    assert compare_runs(ref, run, rtol=0) == []
