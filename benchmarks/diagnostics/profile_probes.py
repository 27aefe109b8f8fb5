"""Where the routing and state probes spend their time on a GPU (issues 24, 25).

    python benchmarks/diagnostics/profile_probes.py --part routing --out DIR
    python benchmarks/diagnostics/profile_probes.py --part state --out DIR

routing: the Mixtral-8x7B-shape stack of bench_routing.py; per router call, the host time spent
in RoutingProbe.observe, the device time of the kernels it launched (torch.profiler, a
record_function range around each call), the host syncs it caused (sync debug mode), and the
profiler tables of one probed forward. state: one 512-token chunk of the 370M Mamba-2 shape;
profiler tables of the probed and the plain chunk. Prints tables; writes chrome traces to DIR.
"""

# ruff: noqa: B023 (the timed lambdas run inside their loop)
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _table(prof, key, n=25):
    return prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=60)


def _profile(fn):
    """torch.profiler (CPU and CUDA) over one call of fn, synchronised."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def routing(args):
    import bench_routing as br

    import workbench as wb
    from workbench.capture.routing import RoutingProbe

    model, cfg = br._mixtral_stack(args.layers, False, "cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def fwd():
        model(input_ids=ids, attention_mask=mask)

    def timed(reps):
        return br.cuda_timed(fwd, reps)

    for _ in range(3):
        fwd()
    host = []
    orig = RoutingProbe.observe

    def observe(self, site, call):
        t0 = time.perf_counter()
        with torch.profiler.record_function("routing_observe"):
            orig(self, site, call)
        host.append(time.perf_counter() - t0)

    RoutingProbe.observe = observe
    base = timed(20)
    with wb.capture(model, probes=[RoutingProbe(budget=args.budget)]):
        fwd()
        host.clear()
        probe = timed(20)
        per_call_host = statistics.median(host) * 1e3
        # syncs inside the probe
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fwd()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(x.message)[:200] for x in w]
        prof = _profile(fwd)
    b, p = statistics.median(base), statistics.median(probe)
    print(f"ROUTING base {b:.3f} ms  probe {p:.3f} ms  ratio {p / b:.4f}  extra per router call "
          f"{(p - b) / args.layers:.3f} ms; host time in observe per call {per_call_host:.3f} ms")
    print(f"syncs during one probed forward (whole forward, model too): {len(syncs)}")
    for s in syncs[:20]:
        print("  SYNC", s)
    ka = {e.key: e for e in prof.key_averages()}
    ro = ka.get("routing_observe")
    if ro is not None:
        dev = getattr(ro, "device_time_total", getattr(ro, "cuda_time_total", 0))
        print(f"routing_observe: count {ro.count} cpu_total {ro.cpu_time_total / 1e3:.3f} ms "
              f"device_total {dev / 1e3:.3f} ms")
    print(_table(prof, "self_cpu_time_total"))
    print(_table(prof, "self_cuda_time_total"))
    if args.out:
        prof.export_chrome_trace(str(Path(args.out) / "routing_trace.json"))
    RoutingProbe.observe = orig
    # the plain forward's own syncs (the eager MoE loop)
    prof2 = _profile(fwd)
    print("PLAIN FORWARD")
    print(_table(prof2, "self_cpu_time_total", 15))


def state(args):
    import bench_state as bs
    from transformers import DynamicCache

    from workbench._compat import cache_kwargs, output_cache
    from workbench.metrics.state import state_scan

    model = bs._model("random-370m", "cuda")
    n = args.state_tokens
    ids = torch.randint(2, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).cuda()

    @torch.no_grad()
    def plain():
        cache = DynamicCache(config=model.config)
        for s in range(0, n, args.chunk):
            out = model(input_ids=ids[:, s: s + args.chunk], use_cache=True,
                        **cache_kwargs(model, cache, old="cache_params"))
            cache = output_cache(out, old="cache_params")

    state_scan(model, ids[:, : 2 * args.chunk], bucket=128, chunk=args.chunk)
    plain()
    for name, fn in (("plain", plain), ("probe", lambda: state_scan(model, ids, bucket=128, chunk=args.chunk)),
                     ("probe, eigvalsh on the GPU", lambda: state_scan(model, ids, bucket=128, chunk=args.chunk,
                                                                       host_linalg=False))):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(f"STATE {name}: {time.perf_counter() - t:.3f} s for {n} tokens")
    prof = _profile(lambda: state_scan(model, ids, bucket=128, chunk=args.chunk))
    print(_table(prof, "self_cpu_time_total", 30))
    print(_table(prof, "self_cuda_time_total", 30))
    prof2 = _profile(plain)
    print("PLAIN")
    print(_table(prof2, "self_cuda_time_total", 15))


def linalg(args):
    """Singular values of many small state matrices on the GPU: which routine is fast."""
    def t(fn, reps=3):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1e3

    for batch, p, n in ((6144, 64, 128), (1536, 64, 128), (192, 32, 128)):
        x = torch.randn(batch, p, n, device="cuda")
        g64 = x.double() @ x.double().transpose(-1, -2)
        g32 = x @ x.transpose(-1, -2)
        rows = {"eigvalsh f64": lambda: torch.linalg.eigvalsh(g64),
                "eigvalsh f32": lambda: torch.linalg.eigvalsh(g32),
                "svdvals f32": lambda: torch.linalg.svdvals(x),
                "svd gesvdj f32": lambda: torch.linalg.svd(x, full_matrices=False, driver="gesvdj"),
                "svd gesvda f32 (n x p)": lambda: torch.linalg.svd(x.transpose(-1, -2), full_matrices=False,
                                                                  driver="gesvda"),
                "host eigvalsh f64 (copy + cpu)": lambda: torch.linalg.eigvalsh(g64.cpu())}
        for name, fn in rows.items():
            try:
                print(f"LINALG [{batch}, {p}, {n}] {name}: {t(fn):.2f} ms")
            except Exception as e:  # noqa: BLE001
                print(f"LINALG [{batch}, {p}, {n}] {name}: failed {type(e).__name__}: {str(e)[:100]}")
    print("torch threads", torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["routing", "state", "linalg"], required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--state-tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    {"routing": routing, "state": state, "linalg": linalg}[a.part](a)


if __name__ == "__main__":
    main()
