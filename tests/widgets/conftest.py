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
