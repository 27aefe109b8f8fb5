"""Run: the result of a capture, saved as a directory (safetensors + JSON).

Layout of a run directory:
    run.json              format, version, model and data provenance, rule, probes, layout
    tensors.safetensors   every probe's state, keys "<probe>/<site>/<field>"
    summary.csv           run.summary() as a table (for people and spreadsheets)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.capture.rules import Rule
from workbench.capture.sketch import SketchSpec, quantiles
from workbench.errors import RunError, WorkbenchError

FORMAT = "workbench-run"
VERSION = 1
RUN_FILES = ("run.json", "tensors.safetensors", "summary.csv")  # what Run.save writes
SUMMARY_COLUMNS = ["layer", "name", "role", "kind", "activation", "d_ff", "tokens", "token_sparsity",
                   "activation_ratio", "nonzero_sparsity", "dead_neurons", "mean_abs", "max_abs",
                   "abs_p50", "abs_p90", "abs_p99"]


class Run:
    """Statistics of one capture plus its provenance.

    `tensors` maps "<probe>/<site>/<field>" to tensors; `meta` holds JSON-able provenance:
    model, data, rule, probes, sites (the FFN layout), created, version.
    """

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor] | None = None, probes=None):
        self.meta = meta
        self._tensors = tensors
        self._probes = probes  # live probes while capturing

    # -- contents ------------------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._probes is not None:
            out = {}
            for p in self._probes:
                out.update(p.state_dict())
            return out
        return self._tensors or {}

    def finalize(self) -> None:
        """Move the probes' state to the host and stop tracking live probes."""
        if self._probes is not None:
            self._tensors = {k: v.detach().cpu() for k, v in self.tensors.items()}
            self.meta["probes"] = [{"name": p.name, **p.config()} for p in self._probes]
            self._probes = None

    def add_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Attach extra tensors (e.g. a metric's results) to a finished run; saved with it.

        Keys become `prefix + key`; probe keys ("<probe>/...") cannot be replaced this way.
        """
        self.finalize()
        if self._tensors is None:
            self._tensors = {}
        probes = {p.get("name") for p in self.meta.get("probes", [])}
        for k, t in tensors.items():
            key = prefix + k
            if key.split("/", 1)[0] in probes:
                raise RunError(f"{key!r} would overwrite a probe's statistics; use another prefix")
            self._tensors[key] = t.detach().cpu().contiguous()

    @property
    def rule(self) -> Rule:
        return Rule.from_json(self.meta["rule"])

    @property
    def sites(self) -> list[dict]:
        return self.meta.get("sites", [])

    def get(self, probe: str, site: str, field: str) -> torch.Tensor:
        key = f"{probe}/{site}/{field}"
        t = self.tensors.get(key)
        if t is None:
            raise RunError(f"run has no tensor {key!r}; was the {probe!r} probe part of the capture?")
        return t

    def neuron_stats(self, site: str) -> dict[str, torch.Tensor]:
        return {f: self.get("neuron_stats", site, f).cpu()
                for f in ("active", "nonzero", "abs_sum", "abs_max", "tokens", "nonfinite")}

    def quantiles(self, site: str, qs=(0.5, 0.9, 0.99)) -> torch.Tensor:
        """|a| quantiles of one FFN from its DDSketch (relative error <= alpha)."""
        spec = self.sketch_spec
        return quantiles(self.get("abs_sketch", site, "hist"), qs, spec)

    @property
    def sketch_spec(self) -> SketchSpec:
        for p in self.meta.get("probes", []):
            if p.get("name") == "abs_sketch":
                return SketchSpec(alpha=p["alpha"], min_value=p["min_value"], max_value=p["max_value"])
        return SketchSpec()

    def summary(self) -> pd.DataFrame:
        """One row per FFN: layer (0-based block index), d_ff, token_sparsity (fraction of valid
        (token, neuron) pairs inactive under the run's rule), and more."""
        rows = []
        have_sketch = any(k.startswith("abs_sketch/") for k in self.tensors)
        if not any(k.startswith("neuron_stats/") for k in self.tensors):
            return pd.DataFrame([], columns=SUMMARY_COLUMNS[:-3])  # a capture of site probes only
        for s in self.sites:
            st = self.neuron_stats(s["name"])
            tokens = int(st["tokens"])
            d_ff = int(s["d_ff"])
            pairs = max(tokens * d_ff, 1)
            active = int(st["active"].sum())
            row = {
                "layer": int(s["layer"]), "name": s["name"], "role": s["role"], "kind": s["kind"],
                "activation": s["activation"], "d_ff": d_ff, "tokens": tokens,
                "token_sparsity": 1.0 - active / pairs if tokens else float("nan"),
                "activation_ratio": active / pairs if tokens else float("nan"),
                "nonzero_sparsity": 1.0 - int(st["nonzero"].sum()) / pairs if tokens else float("nan"),
                "dead_neurons": int((st["active"] == 0).sum()),
                "mean_abs": float(st["abs_sum"].sum()) / pairs if tokens else float("nan"),
                "max_abs": float(st["abs_max"].max()) if d_ff else float("nan"),
            }
            if have_sketch:
                q = self.quantiles(s["name"])
                row.update(abs_p50=float(q[0]), abs_p90=float(q[1]), abs_p99=float(q[2]))
            rows.append(row)
        cols = [c for c in SUMMARY_COLUMNS if not c.startswith("abs_p") or have_sketch]
        return pd.DataFrame(rows, columns=cols)

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the run to directory `path`.

        Refuses an existing non-empty directory unless `overwrite=True`, and even then only
        replaces a directory that is itself a run (never a folder of other files); other files
        kept in a run's directory (notes, figures) stay, only the run's own files are replaced.
        """
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise RunError(f"{path} exists and is a file; choose another directory for the run")
            if any(path.iterdir()):
                is_run = (path / "run.json").is_file()
                if not overwrite:
                    raise RunError(f"{path} already exists and is not empty; pass overwrite=True "
                                   f"(CLI: --overwrite) to replace {'the run' if is_run else 'it'}, "
                                   "or choose a new directory")
                if not is_run:
                    raise RunError(f"{path} holds files that are not a workbench run; refusing to "
                                   "overwrite them even with overwrite=True: choose a new directory")
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise RunError(f"cannot write the run to {path}: {blocking} is a file, not a directory; choose "
                           "another directory for the run")
        self.finalize()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".run-", dir=path.parent))
        try:
            meta = dict(self.meta, format=FORMAT, version=VERSION)
            tensors = {k: v.contiguous() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": FORMAT})
            (tmp / "run.json").write_text(json.dumps(meta, indent=2, default=str))
            if self.sites and any(k.startswith("neuron_stats/") for k in tensors):
                self.summary().to_csv(tmp / "summary.csv", index=False)
            if path.exists() and any(p.name not in RUN_FILES for p in path.iterdir()):
                # a run folder the user also keeps other files in (notes, figures): replace only the
                # run's own files, run.json (the mark of a complete run) out first and in last
                (path / "run.json").unlink(missing_ok=True)
                for name in RUN_FILES:
                    if name != "run.json" and not (tmp / name).exists():
                        (path / name).unlink(missing_ok=True)  # e.g. a summary.csv the new run lacks
                for name in sorted(p.name for p in tmp.iterdir()):
                    if name != "run.json":
                        os.replace(tmp / name, path / name)
                os.replace(tmp / "run.json", path / "run.json")
                tmp.rmdir()
            elif path.exists():  # swap, so the old run is removed only once the new one is in place
                old = Path(tempfile.mkdtemp(prefix=".run-old-", dir=path.parent))
                os.replace(path, old / "run")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Run:
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"{path} is not a directory; a run is a directory written by Run.save")
        meta_path = path / "run.json"
        if not meta_path.is_file():
            raise RunError(f"{path} has no run.json: it is not a workbench run (or it is damaged); "
                           "re-create it with wb.profile(...).save(path)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{meta_path} is not valid JSON ({exc}); the run is damaged, re-create it") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RunError(f"{meta_path} is not a workbench run (format field is "
                           f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
        if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
            raise RunError(f"{path} was written by run format version {meta.get('version')!r}; this "
                           f"workbench reads versions <= {VERSION}: upgrade the workbench")
        _check_meta(meta, meta_path)
        tpath = path / "tensors.safetensors"
        if not tpath.is_file():
            raise RunError(f"{tpath} is missing; the run is damaged, re-create it")
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RunError(f"{tpath} cannot be read ({exc}); the run is damaged, re-create it") from exc
        for s in meta.get("sites", []):
            key = f"neuron_stats/{s['name']}/active"
            if any(k.startswith("neuron_stats/") for k in tensors) and key not in tensors:
                raise RunError(f"{tpath} lacks {key!r} listed in run.json; the run is damaged, re-create it")
        return cls(meta, tensors)

    def __repr__(self) -> str:
        model = self.meta.get("model", {}).get("source") or self.meta.get("model", {}).get("class")
        return (f"Run(model={model!r}, rule={str(self.rule)!r}, sites={len(self.sites)}, "
                f"tokens={self.meta.get('data', {}).get('n_tokens')})")


_SITE_FIELDS = ("layer", "name", "d_ff")


def _check_meta(meta: dict, meta_path: Path) -> None:
    """The fields every reader of a Run relies on (rule, sites, routers, mixers), checked at load:
    a hand-edited or truncated run.json is named here, not as a KeyError in a view later."""
    def bad(what: str) -> RunError:
        return RunError(f"{meta_path}: {what}; the run is damaged or was edited by hand: re-create it "
                        "(wb.profile(...).save(path))")

    if not isinstance(meta.get("rule"), dict):
        raise bad("'rule' is missing or not an object")
    try:
        Rule.from_json(meta["rule"])
    except (KeyError, TypeError, ValueError, WorkbenchError) as exc:
        raise bad(f"'rule' cannot be read ({exc!r})") from exc
    for key in ("sites", "routers", "mixers"):
        if not isinstance(meta.get(key, []), list) or not all(isinstance(x, dict) for x in meta.get(key, [])):
            raise bad(f"'{key}' must be a list of objects")
    for i, site in enumerate(meta.get("sites", [])):
        lacking = [f for f in _SITE_FIELDS if f not in site]
        if lacking:
            raise bad(f"site {i} lacks {', '.join(map(repr, lacking))}")
    for key in ("routers", "mixers"):
        for i, site in enumerate(meta.get(key, [])):
            if "name" not in site or "layer" not in site:
                raise bad(f"{key[:-1]} {i} lacks 'name' or 'layer'")


def new_meta(model, layout, rule: Rule, data: dict | None = None) -> dict:
    cfg = getattr(model, "config", None)
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:
        dtype = None
    from workbench import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "workbench_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "source": getattr(model, "wb_source", None),
            "class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
            "dtype": dtype,
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "adapter": layout.adapter,
        },
        "data": data or {},
        "rule": rule.to_json(),
        "sites": [
            {"layer": s.layer, "name": s.name, "role": s.role, "kind": s.kind, "activation": s.activation,
             "d_ff": s.d_ff, "d_model": s.d_model, "threshold": s.threshold}
            for s in layout.ffns
        ],
        "routers": [{"layer": r.layer, "name": r.name, "kind": r.kind, "n_experts": r.n_experts,
                     "top_k": r.top_k} for r in layout.routers],
        "mixers": [{"layer": m.layer, "name": m.name, "kind": m.kind} for m in layout.mixers],
    }
