"""Peak memory stays flat while a capture streams 1,000,000 tokens through a tiny model (CPU).

    python benchmarks/capture_memory.py [--tokens 1000000]

Prints the process's peak RSS (ru_maxrss) at checkpoints; with streaming probes it must not grow
with the token count once the first batches have allocated the probe state and the allocator's
working set.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    import transformers as tf

    import workbench as wb

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="relu",
        max_position_embeddings=512,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    per = args.batch * args.seq
    checkpoints = sorted({per * 4, 50_000, 100_000, 250_000, 500_000, args.tokens})
    rows, seen, t0 = [], 0, time.perf_counter()
    with wb.capture(model, probes=["neuron_stats", "abs_sketch", wb.ActivationSample(256)]) as run:
        while seen < args.tokens:
            ids = torch.randint(0, 512, (args.batch, args.seq), generator=g)
            mask = torch.ones_like(ids)
            mask[: args.batch // 2, -args.seq // 4 :] = (
                0  # some padding, excluded from the statistics
            )
            with torch.no_grad():
                model.model(
                    input_ids=ids, attention_mask=mask
                )  # no lm_head: the FFNs are what we watch
            seen += int(mask.sum())
            while checkpoints and seen >= checkpoints[0]:
                rows.append(
                    {
                        "tokens": seen,
                        "peak_rss_mib": round(peak_mib(), 1),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                print(rows[-1], flush=True)
                checkpoints.pop(0)
    s = run.summary()
    print(json.dumps({"tokens_counted": int(s["tokens"].iloc[0]), "rows": rows}, indent=1))
    growth = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
    print(
        f"peak RSS {rows[0]['peak_rss_mib']} MiB at {rows[0]['tokens']} tokens -> {rows[-1]['peak_rss_mib']} MiB "
        f"at {rows[-1]['tokens']} tokens (growth {growth:+.1f} MiB)"
    )


if __name__ == "__main__":
    main()
