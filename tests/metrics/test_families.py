"""Every metric runs on every dense family the adapters cover (tiny random weights)."""

import pytest
import torch

from tests import tiny
from workbench.capture.core import active_hooks
from workbench.metrics import cett_thresholds, intervene, nll, sparsity_table, train_predictors

CAUSAL = [f for f in tiny.DENSE_FAMILIES if f != "bert"]


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny.VOCAB, (4, 12), generator=g)
    m = torch.ones_like(ids)
    m[0, 8:] = 0
    return [(ids, m)]


@pytest.mark.parametrize("family", tiny.DENSE_FAMILIES)
def test_metrics_on_family(family):
    model = tiny.build(family)
    data = _batch()
    df = sparsity_table(model, data, rules=["zero", "topk(4)"])
    assert len(df) == 2 * df.layer.nunique() and df.token_sparsity.between(0, 1).all()
    thr = cett_thresholds(model, data, 0.1, n_candidates=256)
    assert (thr.cett <= 0.1 + 1e-12).all()
    pred = train_predictors(model, data * 2, eval_data=data, epochs=1, rule="topk(4)")
    assert pred.metrics.recall.between(0, 1).all()
    if family in CAUSAL:
        dense = nll(model, data)
        with intervene(model, "topk(4)"):
            cut = nll(model, data)
        assert cut.tokens == dense.tokens
    assert active_hooks(model) == 0


def test_model_without_ffns_names_the_cause():
    from workbench.errors import AdapterError
    from workbench.metrics import ppl_sparsity

    model = tiny.build("mamba2")
    with pytest.raises(AdapterError, match=r"no dense FFN the adapters know .*1 mixers|no dense FFN"):
        ppl_sparsity(model, _batch())
    with pytest.raises(AdapterError, match="no dense FFN"):
        train_predictors(model, _batch())
