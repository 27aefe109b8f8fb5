"""zoo:mamba2 shows the Stuffed-Mamba state drift past its 256-token training length.

The committed checkpoint is run over 2 validation sequences of 2048 tokens, chunk by chunk with
the state carried over (workbench.metrics.state.state_drift through train.mamba2_drift); the
figures must match the card's `state_drift_quick` and show the drift with a margin. The fast
CPU scan used here (workbench.models.ssd) is checked against transformers' reference scan.
"""

from __future__ import annotations

import pytest
import torch

from workbench.models import zoo

pytestmark = pytest.mark.skipif("mamba2" not in zoo.available(), reason="zoo:mamba2 not built")

TRAIN_LEN = 256


@pytest.fixture(scope="module")
def model():
    from workbench.models.train import load_zoo_model

    return load_zoo_model("mamba2")[0]


@pytest.fixture(scope="module")
def drift(model):
    from workbench.models.ssd import fast_scan
    from workbench.models.train import mamba2_drift

    q = zoo.card_metrics("mamba2")["state_drift_quick"]
    with fast_scan():
        return mamba2_drift(model, total=q["total"], n_seq=q["n_seq"], chunk=q["chunk"])


def test_fast_scan_matches_reference(model):
    from workbench._compat import output_cache, recurrent_state
    from workbench.models.ssd import fast_scan

    ids = torch.randint(2, 4096, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
        with fast_scan():
            fast = model(input_ids=ids, use_cache=True)
    assert (ref.logits - fast.logits).abs().max() < 1e-3
    for i in range(model.config.num_hidden_layers):
        a = recurrent_state(output_cache(ref, old="cache_params"), i)
        b = recurrent_state(output_cache(fast, old="cache_params"), i)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_drift_matches_card(drift):
    q = zoo.card_metrics("mamba2")["state_drift_quick"]
    assert drift["points"] == q["points"]
    for k, v in q["state_rms"].items():
        assert drift["state_rms"][k] == pytest.approx(v, rel=1e-2)
    for k, v in q["loss"].items():
        assert drift["loss"][k] == pytest.approx(v, abs=5e-3)


def test_state_rms_grows_past_training_length(drift):
    """Every layer's SSM state RMS keeps growing past 256 tokens: at 2048 it is at least 1.5x its
    value at 256 (card: 2.11 to 5.08) and above its value at 1024; on average at least 3x."""
    j = drift["points"].index(TRAIN_LEN)
    k = drift["points"].index(1024)
    ratios = {n: v[-1] / v[j] for n, v in drift["state_rms"].items()}
    assert min(ratios.values()) >= 1.5, ratios
    assert sum(ratios.values()) / len(ratios) >= 3.0, ratios
    for n, v in drift["state_rms"].items():
        assert v[-1] > v[k] > v[j], (n, v)


def test_card_drift_at_4096():
    """The card's headline figures (8 x 4096 tokens): state RMS at 4096 >= 1.5x at 256 in every
    layer (card: 1.96 to 5.60) and the loss past 2048 is >= 0.3 nats above 256-512 (card: +0.57)."""
    d = zoo.card_metrics("mamba2")["state_drift"]
    assert d["total"] == 4096 and d["points"][-1] == 4096
    j = d["points"].index(TRAIN_LEN)
    assert min(v[-1] / v[j] for v in d["state_rms"].values()) >= 1.5
    assert d["loss"]["2048-4095"] - d["loss"]["256-512"] >= 0.3
    assert d["loss"]["2048-4095"] > d["loss"]["1024-2048"] > d["loss"]["512-1024"] > d["loss"]["256-512"]


def test_val_ppl_within_a_quarter_of_unigram():
    v = zoo.card_metrics("mamba2")["validation"]
    assert v["ppl"] <= v["unigram_ppl"] / 4
