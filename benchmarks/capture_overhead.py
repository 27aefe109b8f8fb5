"""P6: GPU cost of a capture with the default probes, prefill of 8 Llama layers of 7B shape.

    python benchmarks/capture_overhead.py --out benchmarks/results/capture_p6_DEVICE_DATE.json

Baseline: the plain forward of a LlamaModel (8 layers, hidden 4096, d_ff 11008, 32 heads, bf16,
random weights, ReLU so the statistics are not trivial) on one 2048-token sequence. Measured:
the same forward inside `wb.capture(model)` (default probes: NeuronStats + AbsSketch, rule zero,
fused Triton reduction), and for reference the torch-path probes (`fused=False`). Baseline and
capture are timed alternately in rounds with CUDA events (medians of many repeats), in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers as tf

    import workbench as wb

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        hidden_act="relu",
        max_position_embeddings=4096,
    )
    with torch.device("cuda"):
        model = tf.LlamaModel(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (1, args.tokens), device="cuda")
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def fwd():
        model(input_ids=ids, attention_mask=mask)

    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    base, fused_t, torch_t = [], [], []
    finalize = []
    for _ in range(args.rounds):
        base += _time(fwd, args.reps)
        with wb.capture(model) as run:
            fwd()  # warm-up inside the capture (Triton compile on the first round)
            fused_t += _time(fwd, args.reps)
            t0 = time.perf_counter()
        finalize.append((time.perf_counter() - t0) * 1e3)
        with wb.capture(model, fused=False):
            fwd()
            torch_t += _time(fwd, args.reps)
    summary = run.summary()
    b, f, t = statistics.median(base), statistics.median(fused_t), statistics.median(torch_t)
    dev = torch.cuda.get_device_name()
    commit = (
        subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        or None
    )
    result = {
        "device": dev,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "command": "python benchmarks/capture_overhead.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "rows": [
            {
                "measure": "P6",
                "shape": f"{args.layers}x4096x11008",
                "dtype": "bf16",
                "mode": "capture-default-fused",
                "sparsity": round(float(summary["token_sparsity"].mean()), 4),
                "tokens": args.tokens,
                "baseline_ms": b,
                "ms": f,
                "speedup": b / f,
                "overhead": f / b,
                "target": 1.03,
                "spread_ms": [min(fused_t), max(fused_t)],
                "baseline_spread_ms": [min(base), max(base)],
            },
            {
                "measure": "P6",
                "shape": f"{args.layers}x4096x11008",
                "dtype": "bf16",
                "mode": "capture-default-torch",
                "sparsity": None,
                "tokens": args.tokens,
                "baseline_ms": b,
                "ms": t,
                "speedup": b / t,
                "overhead": t / b,
                "target": None,
            },
        ],
        "finalize_ms_median": statistics.median(finalize),
    }
    print(json.dumps(result, indent=2))
    print(
        f"baseline {b:.3f} ms | capture fused {f:.3f} ms ({f / b:.4f}x) | torch probes {t:.3f} ms ({t / b:.4f}x)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
