"""State probe cost: peak memory and time of workbench.metrics.state.state_scan on a long input.

Measures, for a Mamba-2 model and one sequence of N tokens run chunk by chunk with the cache
carried over: the time of the plain chunked forward and of the same run under the StateProbe
(same chunking, same process; on the CPU the ratio is of process CPU times, as the wall clock of a
shared machine depends on its other jobs), and the peak memory of the probe run (CUDA: max allocated;
CPU: peak RSS of a fresh worker process). Each length runs in its own worker process.

Criteria (issue 25): peak memory at N within 10 % of the reference length; probe time at most
1.3x the plain chunked forward.

    # CPU (the CI machine): zoo:mamba2, 128k vs 16k tokens
    OMP_NUM_THREADS=1 python benchmarks/bench_state.py --model zoo:mamba2 --tokens 131072 --ref-tokens 16384
    # GPU: a random Mamba-2 of the 370M shape, 64k vs 8k tokens
    python benchmarks/bench_state.py --device cuda --model random-370m --tokens 65536 --ref-tokens 8192
    # smoke test (toy shape, CPU)
    python benchmarks/bench_state.py --smoke-cpu --out /tmp/x

Writes benchmarks/results/state_<device>_<date>.json (or --out DIR / state.json). No panel /
plotly / scipy at module level (the GPU machine has none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # the mamba2-370m shape (state-spaces/mamba2-370m): d_model 1024, 48 layers, d_state 128
    "random-370m": dict(hidden_size=1024, num_hidden_layers=48, state_size=128, expand=2, head_dim=64,
                        num_heads=32, n_groups=1, chunk_size=256, vocab_size=50288),
    "toy": dict(hidden_size=32, num_hidden_layers=2, state_size=16, expand=2, head_dim=8, num_heads=8,
                n_groups=1, chunk_size=16, vocab_size=256),
}


def _model(name: str, device: str):
    import torch
    import transformers as tf

    if name.startswith("zoo:"):
        from workbench.models.train import load_zoo_model

        return load_zoo_model(name[4:])[0].to(device).eval()
    torch.manual_seed(0)
    return tf.Mamba2ForCausalLM(tf.Mamba2Config(**SHAPES[name])).to(device).eval()


def _kernels() -> str:
    try:
        import mamba_ssm  # noqa: F401

        return "mamba-ssm fast kernels"
    except ImportError:
        return "torch path (no mamba-ssm / causal-conv1d kernels)"


def worker(a) -> dict:
    import resource

    import torch
    from transformers import DynamicCache

    from workbench._compat import cache_kwargs, output_cache
    from workbench.metrics.state import state_scan

    dev = a.device
    model = _model(a.model, dev)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (1, a.n), generator=torch.Generator().manual_seed(0)).to(dev)
    scan = torch.no_grad()
    if dev == "cpu" and a.model.startswith("zoo:"):
        from workbench.models.ssd import fast_scan

        scan = fast_scan()  # same math as transformers' reference scan, faster on CPU

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def plain():
        cache = DynamicCache(config=model.config)
        for s in range(0, a.n, a.chunk):
            out = model(input_ids=ids[:, s: s + a.chunk], use_cache=True, **cache_kwargs(model, cache, old="cache_params"))
            cache = output_cache(out, old="cache_params")

    with scan:
        state_scan(model, ids[:, : 2 * a.chunk], bucket=a.bucket, chunk=a.chunk)  # warm-up
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        probe_s = probe_cpu = plain_s = plain_cpu = float("inf")
        peak = 0
        for _ in range(a.repeats):  # alternate probe / plain runs, keep the fastest of each
            sync()
            t, c = time.perf_counter(), time.process_time()
            run = state_scan(model, ids, bucket=a.bucket, chunk=a.chunk, hist_positions=(a.bucket, a.n))
            sync()
            probe_s, probe_cpu = min(probe_s, time.perf_counter() - t), min(probe_cpu, time.process_time() - c)
            if not peak:  # the first probe run, before any plain run
                peak = (torch.cuda.max_memory_allocated() if dev.startswith("cuda")
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            sync()
            t, c = time.perf_counter(), time.process_time()
            plain()
            sync()
            plain_s, plain_cpu = min(plain_s, time.perf_counter() - t), min(plain_cpu, time.process_time() - c)
    # CPU: the ratio of process CPU times (the shared CI machine's wall clock depends on its
    # other jobs); CUDA: wall time after a synchronize
    ratio = probe_s / plain_s if dev.startswith("cuda") else probe_cpu / plain_cpu
    return {"tokens": a.n, "probe_s": round(probe_s, 3), "plain_s": round(plain_s, 3),
            "probe_cpu_s": round(probe_cpu, 3), "plain_cpu_s": round(plain_cpu, 3),
            "time_ratio": round(ratio, 4), "peak_bytes": int(peak),
            "buckets": run.meta["state"]["n_buckets"]}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="zoo:mamba2", help="zoo:NAME or a random shape: " + ", ".join(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--ref-tokens", type=int, default=16384)
    p.add_argument("--bucket", type=int, default=128)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="alternating probe / plain runs; the fastest of each")
    p.add_argument("--smoke-cpu", action="store_true", help="toy random model, 1024 vs 256 tokens, CPU")
    p.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    p.add_argument("--worker-n", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke_cpu:
        a.model, a.device, a.tokens, a.ref_tokens, a.bucket, a.chunk, a.repeats = "toy", "cpu", 1024, 256, 64, 128, 1
    if a.worker_n:
        a.n = a.worker_n
        print(json.dumps(worker(a)))
        return
    rows = []
    for n in (a.ref_tokens, a.tokens):
        cmd = [sys.executable, __file__, "--model", a.model, "--device", a.device, "--bucket", str(a.bucket),
               "--chunk", str(a.chunk), "--repeats", str(a.repeats), "--worker-n", str(n)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode:
            sys.exit(r.stdout[-2000:] + r.stderr[-4000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref, big = rows
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    doc = {
        "benchmark": "state_probe", "device": dev_name + (" (smoke test)" if a.smoke_cpu else ""),
        "date": datetime.date.today().isoformat(), "commit": commit,
        "command": "python benchmarks/bench_state.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": a.model, "path": _kernels(), "bucket": a.bucket, "chunk": a.chunk,
        "torch_threads": torch.get_num_threads(), "repeats": a.repeats, "rows": rows,
        "memory_ratio": round(big["peak_bytes"] / ref["peak_bytes"], 4),
        "time_ratio": big["time_ratio"],
        "criteria": {"memory_ratio_max": 1.10, "time_ratio_max": 1.3},
    }
    doc["pass"] = doc["memory_ratio"] <= 1.10 and max(r["time_ratio"] for r in rows) <= 1.3
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "state.json" if a.out else f"state_{'cpu' if a.device == 'cpu' else 'gpu'}_{doc['date']}.json"
    (out / name).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("memory_ratio", "time_ratio", "pass", "path")}))


if __name__ == "__main__":
    main()
