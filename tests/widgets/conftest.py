"""A tiny run with every analysis stored (and a damaged copy), shared by the widget tests."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("panel", reason="panel is not installed (the viz extra)")


def _tiny_run():
    from workbench.widgets.analyses import analyse

    import workbench as wb
    from tests.tiny import build

    model = build("llama")
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    run = wb.profile(model, ids, progress=False, probes=["neuron_stats", "abs_sketch"])
    analyse(run, model, ids, rules=("zero", "fat(0.01)"), max_tokens=128, predictor_epochs=3, max_length=32)
    return run


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """Directory of a tiny-llama run holding every view's data."""
    path = tmp_path_factory.mktemp("runs") / "tiny"
    _tiny_run().save(path)
    return path


@pytest.fixture(scope="session")
def damaged_run_dir(tiny_run_dir, tmp_path_factory):
    """A copy of the tiny run whose tensors file is garbage."""
    path = tmp_path_factory.mktemp("bad") / "damaged"
    shutil.copytree(tiny_run_dir, path)
    (path / "tensors.safetensors").write_bytes(b"not a safetensors file")
    return path


@pytest.fixture(scope="session")
def bare_run_dir(tmp_path_factory):
    """A run with the profile only (no stored analysis)."""
    import workbench as wb
    from tests.tiny import build

    path = tmp_path_factory.mktemp("bare") / "bare"
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    wb.profile(build("llama"), ids, progress=False).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_bf16_model():
    from tests.tiny import build

    return build("llama").to(torch.bfloat16)


@pytest.fixture(scope="session")
def analysis_run_dirs(tmp_path_factory):
    """Tiny real runs of the routing, recurrent-state and bricks analyses (a few seconds)."""
    import workbench as wb
    import workbench.metrics as wm
    from tests import tiny
    from workbench.metrics import state as ms

    root = tmp_path_factory.mktemp("analyses")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, tiny.VOCAB, (8, 24), generator=g)
    wb.profile(tiny.build("mixtral"), ids, probes=[wb.RoutingProbe(budget=64)], labels=["a", "b"] * 4,
               progress=False).save(root / "routing-tiny")
    ms.state_scan(tiny.build("mamba2"), torch.randint(1, tiny.VOCAB, (1, 256), generator=g), bucket=32, chunk=64,
                  data={"train_len": 64}).save(root / "state-tiny")
    res = wm.brick_analysis(tiny.build("llama"), torch.randint(1, tiny.VOCAB, (16, 24), generator=g),
                            labels=["x", "y"] * 8, eval_data=torch.randint(1, tiny.VOCAB, (8, 24), generator=g),
                            eval_labels=["x", "y"] * 4, k=4, seeds=2)
    res.run.save(root / "bricks-tiny")
    return {"Routing": root / "routing-tiny", "Recurrent state": root / "state-tiny", "Bricks": root / "bricks-tiny"}
