"""The metric tables the views read, under fixed names in a Run, and one call that fills them.

    import workbench.widgets.analyses as wa
    wa.analyse(run, model, data)      # rules, CETT curve, PPL-1% search, chunk CLS_L, predictors
    run.save(path)                    # `workbench serve path` shows every view

Each view's `missing(run)` names the analysis below that fills its tables, so a run that lacks
one says how to get it.
"""

from __future__ import annotations

RULES = "sparsity_table"          # wm.sparsity_table(model, data, rules=[...])
CETT = "cett_curve"               # wm.cett_curve(model, data)
PPL_PREFIX = "ppl"                # PPLSparsity.store(run) -> ppl<p>_sparsity/per_layer and /curve
CHUNK = "chunk"                   # wm.chunk_table(model, data)
PREDICTOR = "predictor"           # Predictors.store(run)

HOWTO = {
    RULES: f'wm.store(run, "{RULES}", wm.sparsity_table(model, texts, rules=["zero", "fat(0.01)", "topk(64)"]))',
    CETT: f'wm.store(run, "{CETT}", wm.cett_curve(model, texts))',
    "ppl": "wm.ppl_sparsity(model, texts, p=1).store(run)",
    CHUNK: f'wm.store(run, "{CHUNK}", wm.chunk_table(model, texts))',
    PREDICTOR: "wm.train_predictors(model, texts).store(run)",
}


def ppl_names(run) -> list[str]:
    """The PPL-p% results stored in `run` (e.g. ["ppl1_sparsity"]), those with both tables."""
    names = run.meta.get("metrics", {})
    out = []
    for n in names:
        if n.startswith(PPL_PREFIX) and n.endswith("/per_layer") and n[: -len("per_layer")] + "curve" in names:
            out.append(n[: -len("/per_layer")])
    return sorted(out)


def has(run, name: str) -> bool:
    return name in run.meta.get("metrics", {})


def analyse(run, model, data, *, rules=("zero", "fat(0.01)", "topk(64)"), p: float = 1.0,
            what=("rules", "cett", "ppl", "chunk", "predictor"), max_tokens: int = 2048,
            predictor_epochs: int = 30, target_recall: float | None = 0.9, batch_size: int = 8, max_length: int = 256) -> None:
    """Compute the analyses named in `what` on `model` and `data` and store them in `run`."""
    import workbench.metrics as wm

    kw = dict(batch_size=batch_size, max_length=max_length)
    if "rules" in what:
        wm.store(run, RULES, wm.sparsity_table(model, data, rules=list(rules), **kw))
    cal = None
    if "cett" in what or "ppl" in what:
        cal = wm.CETTCalibration.from_model(model, data, max_tokens=max_tokens, **kw)
    if "cett" in what:
        wm.store(run, CETT, wm.cett_curve(model, data, calibration=cal))
    if "ppl" in what:
        wm.ppl_sparsity(model, data, p=p, calibration=cal, **kw).store(run)
    if "chunk" in what:
        wm.store(run, CHUNK, wm.chunk_table(model, data, **kw))
    if "predictor" in what:
        wm.train_predictors(model, data, epochs=predictor_epochs, max_tokens=max_tokens, target_recall=target_recall,
                            **kw).store(run)


def demo_run(out, source: str = "zoo:relu-llama", tokens: int = 4096, *, seq_len: int = 256,
             analyses=("rules", "cett", "ppl", "chunk", "predictor"), overwrite: bool = True):
    """Profile `source` on `tokens` validation tokens, store every analysis, save the run to `out`."""
    import torch

    import workbench as wb
    from workbench.data import validation_tokens

    model = wb.load_model(source)
    torch.manual_seed(0)
    ids, mask, desc = validation_tokens(model, tokens, seq_len)
    run = wb.profile(model, ids, attention_mask=mask, max_length=seq_len, progress=False,
                     probes=["neuron_stats", "abs_sketch"], data_info={"tokens_requested": tokens, "text": desc})
    analyse(run, model, [(ids, mask)], what=analyses, max_length=seq_len)
    run.save(out, overwrite=overwrite)
    return run


def table_or_none(run, name: str):
    """The stored table `name` or None."""
    if not has(run, name):
        return None
    import workbench.metrics as wm

    return wm.table(run, name)
