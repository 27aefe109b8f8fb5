"""End-to-end greedy decoding of a plain-FFN ReLU model (OPT-6.7B shape), dense vs wb.accelerate.

    PYTHONPATH=$PWD python3 benchmarks/bench_decode_plain.py --out $OUT [--layers 32] [--sparsity 0.9]

The issue's P5 is a gated Llama; this is the same measurement for the other family of ReLU models,
the plain FFN down(relu(up(x) + b)) of OPT (Deja Vu's and PowerInfer's models). wb.accelerate
makes each FFN one SparsePlainFFN: in exact mode fc1 and its ReLU run densely (the model's own
modules) and fc2 through `kernels.sparse_down`, so at FFN sparsity s the FFN reads (1 + (1 - s)) / 2
of its bytes, and the whole model's bytes ideal is reported per row ("bytes_ideal": dense bytes
over accelerated bytes, attention, fc1 and lm_head read whole). There is no issue target for it
("target": null).
`--modes exact predictor` adds predictor mode (Deja Vu on OPT): random width-`--width` predictors
with ~`--sparsity` predicted off (their choice is wrong, so the error figures are for form; the
timing does not depend on which rows are chosen), fc1 and fc2 then read on the predicted rows only
(`kernels.plain_ffn_predicted`: the predictor's second layer, the up rows and the down rows in one
launch). Before
the predictor rows, every fc1 bias is raised so that nearly all units are active (`all_active`): fc2
then reads the predicted rows, as behind a predictor of perfect recall; on the 90 %-sparse model a
random predictor would let only ~1 % of the units through to fc2 and flatter its time. Predictor
mode must therefore come after exact mode in `--modes`.

Model: OPTConfig(hidden 4096, ffn_dim 16384, 32 heads, vocab 50272; the OPT-6.7B shape), bf16,
random weights (HF init), `--layers` decoder layers. Sparsity: OPT's fc1 has a bias, so each
layer's bias is lowered by the `--sparsity` quantile of its own pre-activation, measured in one
calibration forward over `--calib` random tokens (layer by layer, each on the already-sparsified
layers before it): the model stays a plain ReLU model, now with ~`--sparsity` zeros.

Rows: decode_benchmark (StaticCache, one CUDA graph per decode step, dense and accelerated
alternating, `--reps` medians), with the non-FFN modules as they are and compiled
(compile_non_ffn: everything but fc1 and fc2, both sides alike), plus measure()'s logits
error (exact mode must match the dense model) and the realised sparsity.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import workbench as wb  # noqa: E402

SHAPE = {"hidden": 4096, "ff": 16384, "heads": 32, "vocab": 50272}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def build(layers: int, dev: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    cfg = tf.OPTConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], ffn_dim=SHAPE["ff"],
                       num_hidden_layers=layers, num_attention_heads=SHAPE["heads"], max_position_embeddings=2048,
                       word_embed_proj_dim=SHAPE["hidden"], activation_function="relu", bos_token_id=2,
                       eos_token_id=2, pad_token_id=1)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = tf.OPTForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def _calibrate_fc1(model, calib_ids, hook) -> None:
    """One forward over `calib_ids` with `hook(fc1, args, out, layer_index)` on every fc1 (removed after)."""
    hs = [layer.fc1.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
          for i, layer in enumerate(model.model.decoder.layers)]
    try:
        model(input_ids=calib_ids)
    finally:
        for h in hs:
            h.remove()


@torch.no_grad()
def sparsify(model, calib_ids, sparsity: float, width: int = 0) -> tuple[list[float], dict]:
    """Lower each fc1 bias by the `sparsity` quantile of that layer's pre-activation (in order).
    With `width`, also a random width-`width` Deja Vu predictor per layer whose output bias puts
    `sparsity` of its logits on the calibration inputs below zero (as bench_decode.calibrate does:
    the timing of the predicted path does not depend on which neurons are chosen)."""
    shifts, preds = [], {}
    g = torch.Generator(device=calib_ids.device).manual_seed(1)

    def hook(fc1, args, out, i):
        q = float(torch.quantile(out.float().flatten()[:4_000_000], sparsity))
        fc1.bias -= q
        shifts.append(q)
        if width:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            d, f = x.shape[1], fc1.weight.shape[0]
            w1 = torch.randn(width, d, generator=g, device=x.device) / d ** 0.5
            w2 = torch.randn(f, width, generator=g, device=x.device) / width ** 0.5
            lg = (torch.relu(x @ w1.t()) @ w2.t()).flatten()
            b2 = torch.full((f,), -float(torch.quantile(lg[:4_000_000], sparsity)), device=x.device)
            preds[f"model.decoder.layers.{i}"] = {"w1": w1, "b1": torch.zeros(width, device=x.device), "w2": w2,
                                                  "b2": b2}
        return out - q

    _calibrate_fc1(model, calib_ids, hook)
    return shifts, preds


@torch.no_grad()
def all_active(model, calib_ids, q: float = 0.001) -> list[float]:
    """Raise each fc1 bias so that its pre-activation's `q` quantile is positive (in order): nearly
    every unit active, so that in predictor mode fc2 reads the predicted rows, as it would behind a
    predictor of perfect recall (random predictors pick rows regardless of the true activity: on the
    90 %-sparse model only ~1 % of units would reach fc2, which would flatter its time)."""
    raised = []

    def hook(fc1, args, out, i):
        lift = max(0.0, -float(torch.quantile(out.float().flatten()[:4_000_000], q)))
        fc1.bias += lift
        raised.append(lift)
        return out + lift

    _calibrate_fc1(model, calib_ids, hook)
    return raised


@torch.no_grad()
def per_layer_error(model, ids, backend: str) -> dict:
    """Each fc2 alone on its own inputs (the prompt's tokens, one call each): rel RMS against the
    float64 product of the kernel's output and of the dense module's (cuBLAS) output."""
    xs = {}
    hs = [layer.fc2.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
          for i, layer in enumerate(model.model.decoder.layers)]
    try:
        model(input_ids=ids)
    finally:
        for h in hs:
            h.remove()
    kern, dense = [], []
    for i, layer in enumerate(model.model.decoder.layers):
        fc2, a = layer.fc2, xs[i]
        truth = a.double() @ fc2.weight.double().t() + fc2.bias.double()
        y = torch.cat([wb.kernels.sparse_down(a[t:t + 1], fc2.weight.t().contiguous(), bias=fc2.bias, backend=backend)
                       for t in range(a.shape[0])])
        yd = torch.cat([fc2(a[t:t + 1]) for t in range(a.shape[0])])
        kern.append(float((y.double() - truth).norm() / truth.norm()))
        dense.append(float((yd.double() - truth).norm() / truth.norm()))
    return {"fc2_kernel_vs_fp64_max": max(kern), "fc2_cublas_vs_fp64_max": max(dense)}


def model_bytes(model, sparsity: float, predictor_width: int = 0) -> tuple[float, float]:
    """Weight bytes one decode step reads: dense, and with fc2 read at (1 - sparsity); with a
    predictor width (predictor mode), fc1 too, plus the predictors' two layers."""
    dense = acc = 0.0
    for name, p in model.named_parameters():
        if "embed_positions" in name or (name.endswith("embed_tokens.weight") and
                                         model.get_output_embeddings().weight is not p):
            continue  # an embedding lookup reads one row
        b = p.numel() * p.element_size()
        dense += b
        sparse = ".fc2.weight" in name or (predictor_width and ".fc1.weight" in name)
        acc += b * ((1 - sparsity) if sparse else 1.0)
        if predictor_width and ".fc1.weight" in name:
            acc += predictor_width * (p.shape[0] + p.shape[1]) * p.element_size()
    return dense, acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/wb_out"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--measure-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["exact"], choices=["exact", "predictor"])
    ap.add_argument("--width", type=int, default=1024, help="predictor width (predictor mode)")
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shape on the CPU (reference path)")
    args = ap.parse_args()
    if args.modes != sorted(args.modes, key=["exact", "predictor"].index):
        ap.error("--modes: put exact before predictor (predictor mode raises the fc1 biases)")
    dev = "cpu" if args.smoke_cpu else "cuda"
    if args.smoke_cpu:
        SHAPE.update(hidden=64, ff=256, heads=4, vocab=512)
        args.layers, args.new_tokens, args.reps, args.measure_tokens, args.width = 2, 4, 1, 4, 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build(args.layers, dev)
    gen = torch.Generator().manual_seed(2)
    calib = torch.randint(0, SHAPE["vocab"], (1, args.calib), generator=gen).to(dev)
    prompt = torch.randint(0, SHAPE["vocab"], (1, args.prompt), generator=gen).to(dev)
    shifts, preds = sparsify(model, calib, args.sparsity, args.width if "predictor" in args.modes else 0)
    log(f"built {args.layers} layers, fc1 bias shifts {min(shifts):.3f}..{max(shifts):.3f}")
    dense_b, acc_b = model_bytes(model, args.sparsity)
    pred_b = (model_bytes(model, args.sparsity, predictor_width=args.width)[1] if "predictor" in args.modes
              else None)
    shape = f"opt {SHAPE['hidden']}x{SHAPE['ff']}"
    rows = []
    for mode in args.modes:
        kw = {"predictors": preds} if mode == "predictor" else {}
        if mode == "predictor":
            lifts = all_active(model, calib)
            log(f"predictor mode: fc1 biases raised by {min(lifts):.3f}..{max(lifts):.3f} (nearly all units active)")
        h = wb.accelerate(model, mode=mode, backend="auto" if args.smoke_cpu else "triton", **kw)
        try:
            m = h.measure(prompt[:, :args.measure_tokens], reps=5, warmup=2)
            log(mode, m)
            err = {k: m.summary[k] for k in ("logits_rel_rms", "top1_agreement", "top1_agreement_model_dtype_logits")}
            err["realised_sparsity"] = float(m.layers["realised_sparsity"].mean())
            err["true_sparsity"] = float(m.layers["true_sparsity"].mean())
            err["ffn_eager_speedup_median"] = float(m.layers["speedup"].median())  # whole FFN, eager calls
            err.update(eager_step_dense_ms=m.summary["step_dense_ms"], eager_step_ms=m.summary["step_ms"])
            # the noise floor: the same model with fc2 through the torch reference (fp32 sums, one
            # rounding, another summation order than cuBLAS): a random 32-layer bf16 model amplifies
            # any rounding difference (docs/kernels.md, accuracy on a 7B-shape model)
            if mode == "predictor":  # the predicted rows' recall (random predictors: ~0.1, for form)
                err["predictor_recall"] = m.summary["predictor_recall"]
            h.off()
            with wb.accelerate(model, mode=mode, backend="torch", **kw) as hr:
                ref = hr.measure(prompt[:, :args.measure_tokens], reps=1, warmup=0)
            err.update(per_layer_error(model, prompt[:, :8], "torch" if args.smoke_cpu else "triton"))
            h.on()
            err["torch_reference_logits_rel_rms"] = ref.summary["logits_rel_rms"]
            err["torch_reference_top1_agreement"] = ref.summary["top1_agreement"]
            log(mode, "noise floor and per-layer error", {k: err[k] for k in err if "reference" in k or "fp64" in k})
            for c in args.compile:
                r = wb.decode_benchmark(model, prompt, new_tokens=args.new_tokens, handle=h, reps=args.reps,
                                        warmup=2, compile_non_ffn=(c == "on"))
                s = r["summary"]
                log(mode, f"compile={c}", {k: s[k] for k in ("ms_per_token_dense", "ms_per_token_accel",
                                                             "speedup", "tokens_match")})
                rows.append({
                    "measure": "decode-plain", "shape": shape, "dtype": "bf16", "mode": mode,
                    "sparsity": args.sparsity, "tokens": 1, "layers": args.layers,
                    "baseline_ms": s["ms_per_token_dense"], "ms": s["ms_per_token_accel"], "speedup": s["speedup"],
                    "target": None, "bytes_ideal": dense_b / (pred_b if mode == "predictor" else acc_b),
                    "compile_non_ffn": c == "on",
                    **({"predictor_width": args.width, "fc1_biases": "raised: nearly every unit active, so fc2 reads "
                        "the predicted rows (as behind a predictor of perfect recall)"} if mode == "predictor" else {}),
                    "tokens_match": s["tokens_match"], "token_agreement": s["token_agreement"],
                    "cuda_graphs": s["cuda_graphs"], "reference": s["reference"], "new_tokens": args.new_tokens,
                    "reps": args.reps, "runs": r["runs"], **err,
                })
        finally:
            h.off()
    try:
        commit = os.environ.get("WB_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    doc = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "date": _dt.date.today().isoformat(), "commit": commit,
        "command": "PYTHONPATH=$PWD python3 benchmarks/bench_decode_plain.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "transformers": tf.__version__,
        "model": {"config": "OPT", **SHAPE, "layers": args.layers, "dtype": "bf16", "weights": "random (HF init)",
                  "sparsity_rule": "fc1 bias lowered by the per-layer quantile", "fc1_bias_shifts": shifts,
                  "weight_bytes_dense": dense_b, "weight_bytes_accel": acc_b},
        "rows": rows,
    }
    path = out / ("decode_plain_smoke.json" if args.smoke_cpu else "decode_plain.json")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    log("wrote", path)


if __name__ == "__main__":
    main()
