"""P6: GPU cost of a capture with the default probes, prefill of 8 Llama layers of 7B shape.

    python benchmarks/capture_overhead.py --out benchmarks/results/capture_p6_DEVICE_DATE.json

Baseline: the plain forward of a LlamaModel (8 layers, hidden 4096, d_ff 11008, 32 heads, bf16,
random weights, ReLU so the statistics are not trivial) on one 2048-token sequence. Measured, in
the same run, timed alternately in rounds with CUDA events (medians of many repeats):
- capture-default-fused: `wb.capture(model)` (default probes = NeuronStats, rule zero, the fused
  Triton reduction) -- the P6 figure;
- capture-sketch-fused: the same plus the opt-in AbsSketch (DDSketch histogram);
- capture-default-torch: the default probes on the torch path (`fused=False`), for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from workbench._timing import timed_ms


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
    modes = {
        "capture-default-fused": dict(),
        "capture-sketch-fused": dict(probes=["neuron_stats", "abs_sketch"]),
        "capture-default-torch": dict(fused=False),
    }
    base: list[float] = []
    times: dict[str, list[float]] = {m: [] for m in modes}
    finalize = []
    for _ in range(args.rounds):
        base += timed_ms(fwd, args.reps, "cuda")
        for mode, kw in modes.items():
            with wb.capture(model, **kw) as run:
                fwd()  # warm-up inside the capture (Triton compiles on the first round)
                times[mode] += timed_ms(fwd, args.reps, "cuda")
                t0 = time.perf_counter()
            if mode == "capture-default-fused":
                finalize.append((time.perf_counter() - t0) * 1e3)
                summary = run.summary()
    b = statistics.median(base)
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
                "mode": mode,
                "sparsity": round(float(summary["token_sparsity"].mean()), 4),
                "tokens": args.tokens,
                "baseline_ms": b,
                "ms": statistics.median(t),
                "speedup": b / statistics.median(t),
                "overhead": statistics.median(t) / b,
                "target": 1.03 if mode == "capture-default-fused" else None,
                "ms_min_max": [min(t), max(t)],
                "baseline_ms_min_max": [min(base), max(base)],
            }
            for mode, t in times.items()
        ],
        "finalize_ms_median": statistics.median(finalize),
    }
    print(json.dumps(result, indent=2))
    print(
        f"baseline {b:.3f} ms | "
        + " | ".join(f"{r['mode']} {r['ms']:.3f} ms ({r['overhead']:.4f}x)" for r in result["rows"])
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
