"""P5: end-to-end greedy decoding of a 7B-shape ReLU Llama, dense vs wb.accelerate (exact, predictor).

    PYTHONPATH=$PWD python3 benchmarks/bench_decode.py --out $OUT [--layers 32 8] [--new-tokens 64] [--compile]

Model: LlamaConfig(hidden 4096, intermediate 11008, 32 heads (MHA), vocab 32000, hidden_act relu),
bf16, random weights (HF init, std 0.02), `--layers` decoder layers (32 = the Llama-2-7B shape).

FFN sparsity ~90 %: a Llama MLP has no bias to shift, so each layer's ReLU is replaced by
FATReLU(T_l) with T_l the 0.9 quantile of that layer's gate pre-activation x W_g^T, measured in
one calibration forward over `--calib` random tokens (the hook sets layer l's threshold from its
own input before it runs, so later layers are calibrated on thresholded earlier layers). The model
is then a thresholded (FATReLU) model; "dense" is that model run densely (the original modules),
and exact mode must compute the same function: measure() records logits rel RMS and top-1.

Predictor mode: width-1024 Deja Vu predictors (Linear(4096,1024)-ReLU-Linear(1024,11008)) with
random weights; the output bias is set per layer to minus the 0.9 quantile of the predictor
logits on the calibration inputs, so ~90 % of neurons are predicted off. With random predictors
the function is wrong (the error figures are meaningless and reported only for form); P5 measures
the timing of the predicted path, which does not depend on which neurons are chosen.

Timing: workbench.accel.decode_benchmark: StaticCache, one CUDA graph per decode step (captured
after warm-up, both sides), dense and accelerated alternating in the same run, `--reps` medians of
the per-token time over `--new-tokens` - 1 replays. Results JSON: benchmarks/results format.

--compile (= --compile both): each mode is measured twice, as it is (rows with "compile_non_ffn":
false) and with everything but the FFNs compiled by torch.compile (decode_benchmark's
compile_non_ffn; rows with "compile_non_ffn": true), both sides alike; the compiled runs share one
compile of the shape (a `compiled_non_ffn` block around them). --compile on: compiled rows only.
--compile-mode M [M ...]: torch.compile modes, one compiled variant each (default: "default"; e.g.
max-autotune-no-cudagraphs); rows carry "compile_mode". Per compiled variant, one decode step's
logits compiled vs the same step run eagerly from the same cache state (compiled_step_check), on
the FATReLU model and with the plain ReLU put back (continuous: shows the rounding difference
without the threshold's amplification).
Each shape's no-FFN decode (every FFN replaced by zeros) is measured for each variant too, and
each row carries its breakdown (no-FFN ms, FFN ms dense and accelerated, FFN-only speedup).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import workbench as wb  # noqa: E402
from workbench._compat import cache_kwargs  # noqa: E402
from workbench.accel.core import step_logits  # noqa: E402
from workbench.accel.decode import compiled_non_ffn  # noqa: E402
from workbench.models.loading import FATReLU  # noqa: E402

TARGETS = {"exact": 1.45, "predictor": 1.8}
IDEAL = {"exact": 1.65, "predictor": 2.06}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


DEV = "cuda"
SHAPE = {"hidden": 4096, "ff": 11008, "heads": 32, "vocab": 32000}


def build(layers: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    cfg = tf.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["ff"],
                         num_hidden_layers=layers, num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["heads"],
                         hidden_act="relu", max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = tf.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


@torch.no_grad()
def calibrate(model, calib_ids, sparsity: float, width: int):
    """Per layer: FATReLU threshold at the `sparsity` quantile of the gate pre-activation, and a
    random width-`width` predictor whose output bias puts `sparsity` of the logits below zero."""
    layers = model.model.layers
    thresholds, preds, xs = [], {}, {}
    g = torch.Generator(device=DEV).manual_seed(1)

    def hook(mlp, args, i):
        x = args[0].reshape(-1, args[0].shape[-1])
        gate = torch.nn.functional.linear(x, mlp.gate_proj.weight).float().flatten()
        thr = float(torch.quantile(gate[:2_000_000], sparsity))
        thresholds.append(thr)
        xs[i] = x[-8:].clone()  # inputs for the per-layer check
        mlp.act_fn = FATReLU(thr)
        d, f = x.shape[1], mlp.gate_proj.weight.shape[0]
        w1 = torch.randn(width, d, generator=g, device=DEV) / d ** 0.5
        w2 = torch.randn(f, width, generator=g, device=DEV) / width ** 0.5
        lg = (torch.relu(x.float() @ w1.t()) @ w2.t()).flatten()
        b2 = torch.full((f,), -float(torch.quantile(lg[:2_000_000], sparsity)), device=DEV)
        preds[f"model.layers.{i}.mlp"] = {"w1": w1, "b1": torch.zeros(width, device=DEV), "w2": w2, "b2": b2}

    hs = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: hook(m, a, i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=calib_ids)
    finally:
        for h in hs:
            h.remove()
    return thresholds, preds, xs


def p5_setup(layers: int, sparsity: float = 0.9, width: int = 1024, calib: int = 128, prompt: int = 16):
    """The P5 model as the diagnostic scripts use it: built, calibrated (FATReLU thresholds and
    predictors, see `calibrate`), with a prompt; returns (model, prompt_ids, thresholds, preds, xs)."""
    model = build(layers)
    gen = torch.Generator().manual_seed(2)
    calib_ids = torch.randint(0, SHAPE["vocab"], (1, calib), generator=gen).to(DEV)
    prompt_ids = torch.randint(0, SHAPE["vocab"], (1, prompt), generator=gen).to(DEV)
    return (model, prompt_ids, *calibrate(model, calib_ids, sparsity, width))


class _Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@torch.no_grad()
def per_layer_error(model, h, xs):
    """Each FFN alone on the same inputs (8 calibration tokens, one call each): rel RMS of the
    accelerated module's output vs the original module's, and the fraction of tokens whose
    active set differs (there is none to differ: the gate is the same cuBLAS GEMV)."""
    h.off()
    dense = {i: [model.model.layers[i].mlp(x[None, t:t + 1]) for t in range(x.shape[0])] for i, x in xs.items()}
    h.on()
    errs = []
    for i, x in xs.items():
        ys = [model.model.layers[i].mlp(x[None, t:t + 1]) for t in range(x.shape[0])]
        d, a = torch.cat(dense[i]).float(), torch.cat(ys).float()
        errs.append(float((a - d).norm() / d.norm()))
    h.off()
    return {"ffn_rel_rms_median": float(torch.tensor(errs).median()), "ffn_rel_rms_max": max(errs)}


class _SplitDown(torch.nn.Module):
    """The dense FFN with its down projection summed in another (equally valid) order: two halves
    of d_ff in bf16 GEMMs, added in fp32. Measures how much the model's logits move under a mere
    change of summation order: the floor against which the accelerated model's error is read."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = [mlp]

    def forward(self, x):
        m = self.mlp[0]
        a = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        w, k = m.down_proj.weight, m.down_proj.weight.shape[1] // 2
        y = torch.nn.functional.linear(a[..., :k], w[:, :k]).float()
        return (y + torch.nn.functional.linear(a[..., k:], w[:, k:]).float()).to(x.dtype)


@contextlib.contextmanager
def split_down(model):
    """Every FFN of `model` as _SplitDown while inside; the original modules back on exit."""
    mlps = [layer.mlp for layer in model.model.layers]
    try:
        for layer in model.model.layers:
            layer.mlp = _SplitDown(layer.mlp)
        yield model
    finally:
        for layer, mlp in zip(model.model.layers, mlps, strict=True):
            layer.mlp = mlp


def compare_logits(a, b) -> dict:
    """Two step_logits results: rel RMS of a's model-dtype logits against b's, and top-1
    agreement of the float32-projected logits (and of the model-dtype ones)."""
    (la, a32), (lb, b32) = a, b
    return {"logits_rel_rms": float((la.float() - lb.float()).norm() / lb.float().norm()),
            "top1_agreement": float((a32.argmax(-1) == b32.argmax(-1)).float().mean()),
            "top1_agreement_model_dtype_logits": float((la.argmax(-1) == lb.argmax(-1)).float().mean())}


@torch.no_grad()
def sensitivity(model, ids, backend):
    """Logits rel RMS / top-1 (fp32-projected) of: the dense model with its down projections summed
    in another order, and a second accelerated run (split-K atomics make the kernels' sums order-
    nondeterministic), each against the plain dense model, fed one token a step like measure()."""
    h = wb.accelerate(model, mode="exact", backend=backend)
    h.off()

    cmp = compare_logits
    dense = step_logits(model, ids, 1)
    with split_down(model):
        split = step_logits(model, ids, 1)
    h.on()
    try:
        acc1 = step_logits(model, ids, 1)
        acc2 = step_logits(model, ids, 1)
    finally:
        h.off()
    return {"dense_split_order_vs_dense": cmp(split, dense), "exact_vs_dense": cmp(acc1, dense),
            "exact_run2_vs_run1": cmp(acc2, acc1)}


def run_sensitivity(args, layers: int, extra: dict):
    model = build(layers)
    gen = torch.Generator().manual_seed(2)
    calib = torch.randint(0, SHAPE["vocab"], (1, args.calib), generator=gen).to(DEV)
    ids = torch.randint(0, SHAPE["vocab"], (1, args.measure_tokens), generator=gen).to(DEV)
    relu = [layer.mlp.act_fn for layer in model.model.layers]
    out = {"relu0": sensitivity(model, ids, args.backend)}
    log(f"{layers}L ReLU(0):", out["relu0"])
    calibrate(model, calib, args.sparsity, args.width)
    out["fatrelu_q0.9"] = sensitivity(model, ids, args.backend)
    log(f"{layers}L FATReLU q0.9:", out["fatrelu_q0.9"])
    del relu
    extra.setdefault("sensitivity", {})[f"{layers}L"] = out
    del model
    gc.collect()
    torch.cuda.empty_cache() if DEV == "cuda" else None


def _suffix(cmode: str | None) -> str:
    return "" if cmode is None else "_compiled" if cmode == "default" else f"_compiled_{cmode}"


def decode_mode(args, model, mode, preds, xs, gen, prompt, shape, layers, cmode, errs,
                plain_dense_tokens, rows, extra):
    """One P5 row: the error figures (measured once per mode, uncompiled) and the decode timing."""
    h = None
    compiled = cmode is not None
    tag = f"{layers}L {mode}" + (f" compiled ({cmode})" if compiled else "")
    try:
        h = wb.accelerate(model, mode=mode, backend=args.backend,
                          predictors=preds if mode == "predictor" else None)
        h.off()
        if mode not in errs:  # measured once, on the uncompiled modules (eager inside a compiled block)
            mids = torch.randint(0, SHAPE["vocab"], (1, args.measure_tokens), generator=gen)
            with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
                m = h.measure(mids, reps=3, warmup=1)
            err = {k: m.summary.get(k) for k in ("logits_rel_rms", "top1_agreement",
                                                 "top1_agreement_model_dtype_logits", "predictor_recall",
                                                 "tokens", "step_dense_ms", "step_ms", "step_speedup")}
            err["true_sparsity"] = float(m.layers["true_sparsity"].mean())
            err["realised_sparsity"] = float(m.layers["realised_sparsity"].mean())
            err["ffn_layer_speedup_eager_median"] = float(m.layers["speedup"].median())
            if mode == "exact":
                err.update(per_layer_error(model, h, xs))
            log(mode, "measure:", err)
            errs[mode] = err
        err = errs[mode]
        r = wb.decode_benchmark(model, prompt, new_tokens=args.new_tokens, handle=h,
                                warmup=2, reps=args.reps, compile_non_ffn=compiled)
        s = r["summary"]
        if layers <= 8 and not compiled:  # the graph replays compute what the same eager decode computes
            g16 = wb.decode_benchmark(model, prompt, new_tokens=16, handle=h, warmup=1, reps=1)
            e16 = wb.decode_benchmark(model, prompt, new_tokens=16, handle=h, warmup=1, reps=1,
                                      cuda_graphs=False)
            extra.setdefault("graph_vs_eager_tokens_equal", {})[tag] = {
                side: g16["tokens"][side] == e16["tokens"][side] for side in ("dense", "accel")}
            log("graph vs eager:", extra["graph_vs_eager_tokens_equal"])
        log(tag, "decode:", {k: s[k] for k in ("ms_per_token_dense", "ms_per_token_accel", "speedup",
                                               "token_agreement", "cuda_graphs", "compile_non_ffn")},
            "setup_s", [round(x["setup_s"], 1) for x in r["runs"]])
        row = {
            "measure": "P5", "shape": shape, "dtype": "bf16", "mode": mode,
            "sparsity": round(err["realised_sparsity"], 4), "tokens": args.new_tokens,
            "baseline_ms": round(s["ms_per_token_dense"], 4), "ms": round(s["ms_per_token_accel"], 4),
            "speedup": round(s["speedup"], 3), "target": TARGETS[mode], "bytes_ideal": IDEAL[mode],
            "compile_non_ffn": compiled, "compile_mode": cmode, "compiled_modules": s["compiled_modules"],
            "layers": layers, "tokens_per_s_dense": round(s["tokens_per_s_dense"], 2),
            "tokens_per_s": round(s["tokens_per_s_accel"], 2), "cuda_graphs": s["cuda_graphs"],
            "token_agreement": s["token_agreement"], "runs": r["runs"], "error": err,
            "note": ("random predictors: error figures meaningless, timing is what P5 measures"
                     if mode == "predictor" else "thresholded (FATReLU) model; dense = same model, original modules")
                    + ("; non-FFN modules compiled (torch.compile), both sides; error figures from the "
                       "uncompiled model" if compiled else ""),
        }
        if not compiled:
            plain_dense_tokens[mode] = r["tokens"]["dense"]
        elif mode in plain_dense_tokens:  # the compiled dense model decodes what the uncompiled one does?
            a, b = plain_dense_tokens[mode], r["tokens"]["dense"]
            row["dense_token_agreement_vs_uncompiled"] = sum(x == y for x, y in zip(a, b)) / len(a)
        rows.append(row)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        extra.setdefault("failures", []).append(f"{tag}: {type(e).__name__}: {e}")
    finally:
        if h is not None:
            h.off()
    write(args, rows, extra)


@torch.no_grad()
def compiled_step_check(model, prompt, max_len):
    """Inside a compiled block: one decode step's logits, compiled vs the same step run eagerly,
    from the same (eager) prefill; rel RMS and top-1 (fp32 logits of the model)."""
    from transformers import StaticCache

    p = prompt.shape[1]
    out = {}
    for stance in ("force_eager", "default"):
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        with torch.compiler.set_stance("force_eager"):
            lg = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True,
                       cache_position=torch.arange(p, device=prompt.device)).logits
        tok = lg[:, -1].argmax(-1, keepdim=True)
        with torch.compiler.set_stance(stance):
            out[stance] = model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True,
                                cache_position=torch.tensor([p], device=prompt.device)).logits[0, -1].float()
    a, b = out["default"], out["force_eager"]
    return {"logits_rel_rms": float((a - b).norm() / b.norm()), "top1_equal": bool(a.argmax() == b.argmax())}


def no_ffn(args, model, prompt, layers, cmode, info, extra):
    """Where the dense step's time goes: the same decode with every FFN replaced by zeros."""
    compiled = cmode is not None
    key = "no_ffn_ms_per_token" + _suffix(cmode)
    mlps = [layer.mlp for layer in model.model.layers]
    try:
        for layer in model.model.layers:
            layer.mlp = _Zero()
        r = wb.decode_benchmark(model, prompt, new_tokens=args.new_tokens, warmup=2, reps=args.reps,
                                compile_non_ffn=compiled)
        info[key] = r["summary"]["ms_per_token_dense"]
        log(f"{layers}L without FFNs{f' (compiled {cmode})' if compiled else ''}: {info[key]:.3f} ms/token")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        extra.setdefault("failures", []).append(f"{layers}L no-FFN compiled={compiled}: {type(e).__name__}: {e}")
    finally:
        for layer, mlp in zip(model.model.layers, mlps, strict=True):
            layer.mlp = mlp


def run_shape(args, layers: int, rows: list, extra: dict):
    t0 = time.time()
    model = build(layers)
    log(f"built {layers}-layer model in {time.time() - t0:.1f}s, "
        f"{torch.cuda.memory_allocated() / 2**30 if DEV == 'cuda' else 0:.1f} GiB")
    gen = torch.Generator().manual_seed(2)
    calib = torch.randint(0, SHAPE["vocab"], (1, args.calib), generator=gen).to(DEV)
    prompt = torch.randint(0, SHAPE["vocab"], (1, args.prompt), generator=gen).to(DEV)
    relu = [layer.mlp.act_fn for layer in model.model.layers]
    thresholds, preds, xs = calibrate(model, calib, args.sparsity, args.width)
    log(f"thresholds {min(thresholds):.3f}..{max(thresholds):.3f}")
    info = {"layers": layers, "thresholds": [round(t, 4) for t in thresholds]}
    shape = f"llama7b-shape {layers}L {SHAPE['hidden']}x{SHAPE['ff']} vocab{SHAPE['vocab']}"
    variants = {"off": [None], "on": args.compile_mode, "both": [None, *args.compile_mode]}[args.compile]
    errs: dict[str, dict] = {}
    plain_dense_tokens: dict[str, list[int]] = {}
    for cmode in variants:
        # the compiled runs share one compile of this shape: decode_benchmark(compile_non_ffn=True)
        # inside the block reuses it (nothing else runs in the block: measure() would compile
        # other shapes)
        block = compiled_non_ffn(model, mode=cmode) if cmode else contextlib.nullcontext()
        t_block = time.time()
        with block:
            for mode in args.modes:
                decode_mode(args, model, mode, preds, xs, gen, prompt, shape, layers, cmode, errs,
                            plain_dense_tokens, rows, extra)
            no_ffn(args, model, prompt, layers, cmode, info, extra)
            if cmode:  # on the FATReLU model (discontinuous: amplifies any rounding) and on plain ReLU
                fat = [layer.mlp.act_fn for layer in model.model.layers]
                try:
                    chk = {"fatrelu_q0.9": compiled_step_check(model, prompt, args.prompt + args.new_tokens + 3)}
                    for layer, act in zip(model.model.layers, relu, strict=True):
                        layer.mlp.act_fn = act
                    chk["relu0"] = compiled_step_check(model, prompt, args.prompt + args.new_tokens + 3)
                    info["compiled_step_check" + _suffix(cmode)] = chk
                    log(f"compiled ({cmode}) vs eager, one decode step from the same cache:", chk)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    extra.setdefault("failures", []).append(f"{layers}L step check {cmode}: {type(e).__name__}: {e}")
                finally:
                    for layer, act in zip(model.model.layers, fat, strict=True):
                        layer.mlp.act_fn = act
        if cmode:
            info["compiled_block_s" + _suffix(cmode)] = round(time.time() - t_block, 1)
    for r in rows:  # where each row's step goes: no-FFN part, FFN part dense and accelerated
        if r["layers"] != layers:
            continue
        key = "no_ffn_ms_per_token" + _suffix(r["compile_mode"])
        if key in info:
            nf = info[key]
            r["breakdown_ms_per_token"] = {
                "no_ffn_ms": round(nf, 4), "ffn_dense_ms": round(r["baseline_ms"] - nf, 4),
                "ffn_accel_ms": round(r["ms"] - nf, 4),
                "ffn_only_speedup": round((r["baseline_ms"] - nf) / (r["ms"] - nf), 3)}
    write(args, rows, extra)
    # exact mode on the plain ReLU model (threshold 0): a continuous FFN, so the end-to-end error
    # is not amplified by activations jumping across a FATReLU threshold (see the module doc)
    if args.relu_check and "exact" in args.modes:
        h = None
        try:
            for layer, act in zip(model.model.layers, relu, strict=True):
                layer.mlp.act_fn = act
            h = wb.accelerate(model, mode="exact", backend=args.backend)
            m = h.measure(torch.randint(0, SHAPE["vocab"], (1, args.measure_tokens), generator=gen),
                          reps=1, warmup=1)
            info["relu0_exact"] = {k: m.summary[k] for k in ("logits_rel_rms", "top1_agreement",
                                                             "top1_agreement_model_dtype_logits", "tokens")}
            info["relu0_exact"]["sparsity"] = float(m.layers["true_sparsity"].mean())
            info["relu0_exact"].update(per_layer_error(model, h, xs))
            log(f"{layers}L ReLU(0) exact:", info["relu0_exact"])
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            extra.setdefault("failures", []).append(f"{layers}L relu0: {type(e).__name__}: {e}")
        finally:
            if h is not None:
                h.off()
    extra.setdefault("shapes", []).append(info)
    write(args, rows, extra)
    del model, preds
    gc.collect()
    torch.cuda.empty_cache()


def write(args, rows, extra):
    doc = {
        "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke test)", "date": _dt.date.today().isoformat(),
        "commit": os.environ.get("WB_COMMIT", "unknown"),
        "command": "PYTHONPATH=$PWD python3 benchmarks/bench_decode.py " + " ".join(sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": tf.__version__},
        "method": "decode_benchmark: StaticCache + one CUDA graph per decode step, dense/accelerated "
                  "alternating in one run, medians over reps of ms per token; FATReLU threshold per layer "
                  "at the 0.9 quantile of the gate pre-activation (calibration forward)",
        "rows": rows, **extra,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_p5.json").write_text(json.dumps(doc, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/wb_out"))
    ap.add_argument("--layers", type=int, nargs="+", default=[32])
    ap.add_argument("--modes", nargs="+", default=["exact", "predictor"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--measure-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--compile", nargs="?", const="both", default="off", choices=["off", "on", "both"],
                    help="non-FFN modules through torch.compile: both (bare --compile) = rows with and without")
    ap.add_argument("--compile-mode", nargs="+", default=["default"],
                    help="torch.compile modes of the compiled variants (not ones with CUDA graphs of their own)")
    ap.add_argument("--no-relu-check", dest="relu_check", action="store_false")
    ap.add_argument("--sensitivity-only", action="store_true",
                    help="only the error floor: dense with another summation order, and accelerated run twice")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shape on the CPU (reference path): checks the script")
    args = ap.parse_args()
    if args.smoke_cpu:
        global DEV
        DEV = "cpu"
        SHAPE.update(hidden=64, ff=256, heads=4, vocab=512)
        args.backend = "torch"
    rows, extra = [], {}
    if args.sensitivity_only:
        for layers in args.layers:
            run_sensitivity(args, layers, extra)
            write(args, rows, extra)
        return
    for layers in args.layers:
        try:
            run_shape(args, layers, rows, extra)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            extra.setdefault("failures", []).append(f"{layers}L: {type(e).__name__}: {e}")
            write(args, rows, extra)
    for r in rows:
        log(f"P5 {r['layers']}L {r['mode']}{' compiled ' + r['compile_mode'] if r['compile_non_ffn'] else ''}: "
            f"{r['baseline_ms']:.3f} -> {r['ms']:.3f} ms/token, {r['tokens_per_s_dense']:.1f} -> {r['tokens_per_s']:.1f} tok/s "
            f"speedup {r['speedup']:.3f} (target {r['target']}), sparsity {r['sparsity']}, "
            f"rel_rms {r['error']['logits_rel_rms']:.2e} top1 {r['error']['top1_agreement']:.3f}")


if __name__ == "__main__":
    main()
