"""Where a graph-replayed decode step of the P5 model spends its time, kernel by kernel.

    PYTHONPATH=$PWD python3 benchmarks/diagnostics/profile_decode.py --out $OUT [--layers 32] [--no-compile]

The dense P5 model of bench_decode.py (7B shape, bf16, FATReLU thresholds at the 0.9 quantile),
one decode step captured as a CUDA graph by decode_benchmark's _GraphDecoder, `--replays` replays
under torch.profiler (CUPTI sees each kernel of the graph). Kernels are attributed to modules by
an eager run of the same step with a profiler range per module (the eager step launches the same
kernels in the same order as the captured one; the script checks that the names line up).
Printed and written to OUT/profile_decode.json: per module kind (input_layernorm, self_attn, ...)
and per kernel, the GPU time per step and per layer, the step's wall time, and the idle time
between kernels. With compile (default: both), the same for the step whose non-FFN modules are
compiled (compiled_non_ffn); there kernels are grouped by name (no eager attribution).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_decode as bd  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from workbench.accel.decode import _GraphDecoder, compiled_non_ffn  # noqa: E402


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def kind_of(name: str) -> str:
    """model.layers.3.self_attn -> self_attn; model.norm -> norm."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[i + 2:]) or "layer(residual adds, glue)"
    return ".".join(parts[1:]) if parts[0] == "model" and len(parts) > 1 else (name or "model(glue)")


def gpu_events(prof):
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(evs, key=lambda e: e.time_range.start)


def replay_profile(dec, replays: int):
    """Kernels of `replays` graph replays: per position in the step, name and median duration (us);
    and the median wall time of one replay (us) from CUDA events."""
    for _ in range(3):
        dec.graph.replay()
    torch.cuda.synchronize()
    walls = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dec.graph.replay()
        e.record()
        e.synchronize()
        walls.append(s.elapsed_time(e) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            dec.graph.replay()
        torch.cuda.synchronize()
    evs = gpu_events(prof)
    if len(evs) % replays:
        raise RuntimeError(f"{len(evs)} GPU events for {replays} replays: not a whole number per replay")
    k = len(evs) // replays
    steps = [evs[i * k:(i + 1) * k] for i in range(replays)]
    names = [e.name for e in steps[0]]
    if any([e.name for e in st] != names for st in steps):
        raise RuntimeError("the replays launched different kernel sequences")
    dur = [statistics.median(st[j].time_range.elapsed_us() for st in steps) for j in range(k)]
    span = statistics.median(st[-1].time_range.end - st[0].time_range.start for st in steps)
    return names, dur, statistics.median(walls), span


def eager_labels(model, dec):
    """Kernel names of one eager decode step, in launch order, each with the module it ran in."""
    stack: list = []
    hooks = []
    for name, mod in model.named_modules():
        label = name or "model(glue)"
        hooks.append(mod.register_forward_pre_hook(
            lambda m, a, label=label: stack.append(record_function("wb::" + label).__enter__())))
        hooks.append(mod.register_forward_hook(lambda m, a, o: stack.pop().__exit__(None, None, None)))
    try:
        dec.prefill()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function("wb::step(argmax, buffers)"):
                dec._step()
            torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    seq = []
    cpu = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and e.kernels),
                 key=lambda e: e.time_range.start)
    for e in cpu:
        p, label = e, None
        while p is not None:
            if p.name.startswith("wb::"):
                label = p.name[4:]
                break
            p = p.cpu_parent
        for k in e.kernels:
            seq.append((k.name, label or "unlabelled"))
    return seq


def align(seq, names):
    """Labels for the graph's kernels from the eager sequence: kernels matched by name in order
    (difflib; the eager profile can list a kernel twice or two neighbours swapped), the ones left
    over take the label of the matched kernel before them."""
    import difflib

    if not seq:
        return None, 0
    sm = difflib.SequenceMatcher(None, [n for n, _ in seq], names, autojunk=False)
    labels: list = [None] * len(names)
    matched = 0
    for a, b, size in sm.get_matching_blocks():
        for k in range(size):
            labels[b + k] = seq[a + k][1]
        matched += size
    last = seq[0][1]
    for j, lab in enumerate(labels):
        if lab is None:
            labels[j] = last
        last = labels[j]
    return labels, matched


def summarise(names, dur, labels, layers):
    by_kind: dict[str, float] = defaultdict(float)
    n_kind: dict[str, int] = defaultdict(int)
    by_kernel: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    for j, (n, d) in enumerate(zip(names, dur, strict=True)):
        kind = kind_of(labels[j]) if labels else "?"
        by_kind[kind] += d
        n_kind[kind] += 1
        by_kernel[(kind, n)][0] += 1
        by_kernel[(kind, n)][1] += d
    kinds = [{"kind": k, "kernels_per_step": n_kind[k], "us_per_step": round(v, 1),
              "us_per_layer": round(v / layers, 2)} for k, v in sorted(by_kind.items(), key=lambda x: -x[1])]
    kernels = [{"kind": k, "kernel": n[:120], "per_step": c, "us_per_step": round(t, 1),
                "us_per_layer": round(t / layers, 2), "us_each": round(t / c, 2)}
               for (k, n), (c, t) in sorted(by_kernel.items(), key=lambda x: -x[1][1])]
    return kinds, kernels


def profile_variant(model, prompt, layers, compiled, replays, doc):
    tag = "compiled" if compiled else "eager_modules"
    t0 = time.time()
    with compiled_non_ffn(model) if compiled else contextlib.nullcontext():
        dec = _GraphDecoder(model, prompt, prompt.shape[1] + 64, 2, compiled)
        setup = time.time() - t0
        names, dur, wall, span = replay_profile(dec, replays)
        labels = None
        if not compiled:
            try:
                seq = eager_labels(model, dec)
            except Exception as e:  # noqa: BLE001
                seq = []
                log(f"eager attribution failed: {type(e).__name__}: {e}")
            labels, matched = align(seq, names)
            log(f"eager attribution: {matched} of {len(names)} graph kernels matched by name and order "
                f"({len(seq)} eager kernels)")
            doc.setdefault("attribution", {})[tag] = {"graph_kernels": len(names), "eager_kernels": len(seq),
                                                      "matched": matched}
        del dec
    kinds, kernels = summarise(names, dur, labels, layers)
    busy = sum(dur)
    doc[tag] = {"setup_s": round(setup, 1), "kernels_per_step": len(names), "step_wall_us": round(wall, 1),
                "gpu_busy_us": round(busy, 1), "first_to_last_kernel_us": round(span, 1),
                "idle_between_kernels_us": round(span - busy, 1), "by_module_kind": kinds, "by_kernel": kernels,
                "sequence_first_layer": None}
    if labels:  # the kernels of layer 1, in order (layer 0 can differ in nothing, but 1 is plainly inside)
        i0 = next(j for j, lab in enumerate(labels) if lab.startswith("model.layers.1."))
        i1 = next(j for j, lab in enumerate(labels) if lab.startswith("model.layers.2."))
        doc[tag]["sequence_first_layer"] = [[kind_of(labels[j]), names[j][:100], round(dur[j], 2)] for j in range(i0, i1)]
    else:
        doc[tag]["sequence_first_layer"] = [[names[j][:100], round(dur[j], 2)] for j in range(min(len(names), 60))]
    log(f"== {tag}: setup {setup:.1f}s, {len(names)} kernels/step, step {wall:.0f} us (graph replay), "
        f"GPU busy {busy:.0f} us, idle between kernels {span - busy:.0f} us")
    for k in kinds:
        log(f"  {k['kind']:<32} {k['kernels_per_step']:>5} kernels {k['us_per_step']:>9.1f} us/step {k['us_per_layer']:>8.2f} us/layer")
    for k in kernels[:25]:
        log(f"  {k['kind']:<26} {k['per_step']:>4}x {k['us_each']:>7.2f} us = {k['us_per_layer']:>7.2f} us/layer  {k['kernel'][:90]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/wb_out"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args()
    model, prompt, *_ = bd.p5_setup(args.layers)
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": args.layers,
           "what": "one dense decode step of the P5 model (FATReLU q0.9), CUDA graph replays under "
                   "torch.profiler; us = median over replays of each kernel's duration"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for compiled in [False] + ([True] if args.compile else []):
            try:
                profile_variant(model, prompt, args.layers, compiled, args.replays, doc)
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                doc.setdefault("failures", []).append(f"compiled={compiled}: {type(e).__name__}: {e}")
            (out / "profile_decode.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
