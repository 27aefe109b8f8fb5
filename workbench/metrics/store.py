"""Metric results inside a Run: tidy tables in ``run.meta["metrics"]`` (JSON), extra tensors in
the run's tensors under ``metrics/<name>/<key>`` (safetensors), so `Run.save` / `Run.load` keep
them with the capture they belong to.

    store(run, "ppl_sparsity/per_layer", df)
    table(Run.load(path), "ppl_sparsity/per_layer")   # the same DataFrame back
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from workbench.capture.run import Run
from workbench.errors import RunError


def _jsonable(v):
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def store(run: Run, name: str, df: pd.DataFrame, *, tensors: dict[str, torch.Tensor] | None = None,
          info: dict | None = None) -> None:
    """Put table `df` (and optional tensors and JSON-able `info`) into `run` under `name`."""
    metrics = run.meta.setdefault("metrics", {})
    metrics[name] = {
        "columns": [str(c) for c in df.columns],
        "dtypes": [str(t) for t in df.dtypes],
        "data": [[_jsonable(v) for v in row] for row in df.itertuples(index=False, name=None)],
        "info": {k: _jsonable(v) if not isinstance(v, (dict, list)) else v for k, v in (info or {}).items()},
    }
    if tensors:
        run.add_tensors(tensors, prefix=f"metrics/{name}/")


def table(run: Run, name: str) -> pd.DataFrame:
    """The table stored under `name` as a DataFrame."""
    entry = run.meta.get("metrics", {}).get(name)
    if entry is None:
        have = ", ".join(sorted(run.meta.get("metrics", {}))) or "none"
        raise RunError(f"run has no metric table {name!r} (it has: {have}); compute and store it first")
    df = pd.DataFrame(entry["data"], columns=entry["columns"])
    for c, t in zip(entry["columns"], entry.get("dtypes", [])):
        if t.startswith(("float", "int")):
            df[c] = pd.to_numeric(df[c].replace({"inf": math.inf, "-inf": -math.inf}))
            if t.startswith("float"):
                df[c] = df[c].astype(t)
    return df


def info(run: Run, name: str) -> dict:
    """The JSON-able extras stored with table `name`."""
    table(run, name)
    return dict(run.meta["metrics"][name].get("info", {}))


def tables(run: Run) -> list[str]:
    """Names of the metric tables stored in `run`."""
    return sorted(run.meta.get("metrics", {}))


def tensors(run: Run, name: str) -> dict[str, torch.Tensor]:
    """Tensors stored with table `name` (keys without the ``metrics/<name>/`` prefix)."""
    prefix = f"metrics/{name}/"
    return {k[len(prefix):]: v for k, v in run.tensors.items() if k.startswith(prefix)}
