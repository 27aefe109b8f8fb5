"""Metrics: sparsity under the pinned rules, CETT and PPL-p% sparsity, activation predictors,
chunk-level sparsity, functional partitions (bricks). Pure functions over a model + data or over tensors; results are tidy
pandas tables that `store(run, name, df)` keeps inside a Run.

    import workbench.metrics as wm
    wm.sparsity_table(model, texts, rules=["zero", "fat(0.01)", "topk(64)"])
    res = wm.ppl_sparsity(model, texts, p=1)      # res.sparsity, res.per_layer, res.curve
    pred = wm.train_predictors(model, texts)      # pred.metrics, pred.save(dir) (ProSparse recipe)
    wm.predictor_report(model, pred, held_out)    # recall, sparsities, ppl dense / exact / predicted
"""

from workbench.metrics.bricks import (
    BrickAnalysis,
    BricksError,
    Partition,
    ablate,
    average_precision,
    brick_analysis,
    func_scores,
    predictivity,
)
from workbench.metrics.cett import (
    CETTCalibration,
    LayerCETT,
    cett,
    cett_curve,
    cett_search,
    cett_thresholds,
)
from workbench.metrics.chunks import chunk_table
from workbench.metrics.interventions import Intervention, intervene
from workbench.metrics.ppl import NLL, nll, perplexity
from workbench.metrics.predictor import (
    LayerPredictor,
    PredictorError,
    PredictorReport,
    Predictors,
    default_width,
    load_predictors,
    prediction_metrics,
    predictor_report,
    save_predictors,
    train_predictors,
    weighted_bce,
)
from workbench.metrics.routing import (
    ExpertAlignment,
    RoutingError,
    active_histogram,
    align_experts,
    align_layers,
    compare_runs,
    coselection,
    domain_specialisation,
    routing_cls,
    routing_layers,
    routing_load,
    token_difference,
    top_specialisation,
    vocab_by_expert,
    vocab_specialisation,
)
from workbench.metrics.sparsity import (
    PPLSparsity,
    overall_activation_ratio,
    ppl_sparsity,
    sparsity_table,
)
from workbench.metrics.store import info, store, table, tables, tensors

__all__ = [
    "BrickAnalysis", "BricksError", "Partition", "ablate", "average_precision", "brick_analysis",
    "func_scores", "predictivity",
    "CETTCalibration", "Intervention", "LayerCETT", "LayerPredictor", "NLL", "PPLSparsity", "PredictorError",
    "PredictorReport", "Predictors", "predictor_report", "weighted_bce",
    "cett", "chunk_table", "cett_curve", "cett_search", "cett_thresholds", "default_width", "info", "intervene",
    "load_predictors", "nll", "overall_activation_ratio", "perplexity", "ppl_sparsity",
    "prediction_metrics", "save_predictors", "sparsity_table", "store", "table", "tables", "tensors",
    "train_predictors",
    # routing (metrics/routing.py)
    "ExpertAlignment", "RoutingError", "active_histogram", "align_experts", "align_layers", "compare_runs",
    "coselection", "domain_specialisation", "routing_cls", "routing_layers", "routing_load",
    "token_difference", "top_specialisation", "vocab_by_expert", "vocab_specialisation",
]
