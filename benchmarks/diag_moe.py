"""Where the MoE-block layer's time goes (P4, 4096x11008 as 43 experts x 256, fp16): router, up
and down kernels timed alone and whole, for several block shapes, graph replays over rotated
weights as in bench_kernels.py, at T = 8 and 32 and CLS = 0.8.

    PYTHONPATH=$PWD python3 benchmarks/diag_moe.py
    PYTHONPATH=$PWD python3 benchmarks/diag_moe.py --ab '[{}, {"up_partials": false}]'

--baseline: the dense MoE baseline with each router (none, plain kernel, the default, cuBLAS).

--ab CFGS: the whole layer (and the up and down kernels alone) for each config of the JSON list, at T = 8
and 32 and CLS 0.5 / 0.7 / 0.8, beside the dense MoE baseline of bench_kernels.py, in one run;
with --resources, then the registers and shared memory of each compiled expert kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import K, bench, log, rand_w, rotating, solve_rows, union_mask  # noqa: E402
from workbench.kernels.moe_blocks.triton import (  # noqa: E402
    default_expert_config,
    launch_expert_down,
    launch_expert_up,
    router_logits,
)

UP = [
    {"BF": 16},
    {"BF": 32},
    {"BF": 64, "KS": 4},
    {"BF": 64, "KS": 8},
    {"BF": 128, "KS": 8, "up_warps": 8},
    {"BF": 32, "KS": 4},
    {"BF": 64, "KS": 4, "BD": 128, "up_stages": 4},
    {"BF": 64, "KS": 2, "BD": 512, "up_warps": 8},
]
DOWN = [
    {"S": 8},
    {"S": 16},
    {"S": 16, "BN": 256},
    {"S": 32, "RB": 32},
    {"S": 16, "down_warps": 8},
    {"S": 8, "RB": 128, "BN": 256},
    {"S": 16, "BN": 256, "down_stages": 3},
]


def main():
    d, f, d_e, nw, dt = 4096, 11008, 256, 3, torch.float16
    e = f // d_e
    wu = [rand_w(f, d, dt) for _ in range(nw)]
    wdt = [rand_w(f, d, dt) for _ in range(nw)]
    for t in (8, 32):
        xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        wr = [solve_rows(xs[i], union_mask(t, e, 0.8), dt) for i in range(nw)]
        nwt = [(torch.rand(e, device="cuda") + 0.5).to(dt) for _ in range(nw)]
        a0 = [router_logits(xs[i], wr[i]) for i in range(nw)]
        hs = [launch_expert_up(xs[i], a0[i], nwt[i], wu[i], e, d_e, 1e-6) for i in range(nw)]
        sets = list(zip(xs, wr, nwt, wu, wdt, a0, hs))
        active = int((a0[0] > 0).any(0).sum())
        mb = active * d_e * d * 2 / 1e6
        log(f"T={t}: {active}/{e} experts active, {mb:.1f} MB per matrix, "
            f"{mb / 2.5e6 * 1e6:.2f} us each at 2.5 TB/s")
        for rc in ({}, {"router_unroll": True}, {"router_split": 4}, {"router_split": 8}):
            ms = bench(rotating(lambda x, r, n, u, dd, a, h, rc=rc: router_logits(
                x, r, config=rc), sets), 10)
            log(f"  router kernel {rc}: {ms * 1e3:.2f} us")
        ms = bench(rotating(lambda x, r, n, u, dd, a, h: F.linear(x, r), sets), 10)
        log(f"  router cuBLAS: {ms * 1e3:.2f} us")
        for c in UP:
            ms = bench(rotating(lambda x, r, n, u, dd, a, h, c=c: launch_expert_up(
                x, a, n, u, e, d_e, 1e-6, c), sets), 10)
            log(f"  up {c}: {ms * 1e3:.2f} us ({mb / ms / 1e3:.2f} TB/s)")
        for c in DOWN:
            ms = bench(rotating(lambda x, r, n, u, dd, a, h, c=c: launch_expert_down(
                h, a, n, dd, e, d_e, 1e-6, c), sets), 10)
            log(f"  down {c}: {ms * 1e3:.2f} us ({mb / ms / 1e3:.2f} TB/s)")
        ms = bench(rotating(lambda x, r, n, u, dd, a, h: K.moe_blocks(x, r, n, u, dd), sets), 10)
        log(f"  whole (defaults): {ms * 1e3:.2f} us")
        ms = bench(rotating(lambda x, r, n, u, dd, a, h: K.moe_blocks(
            x, r, n, u, dd, config={"impl": "rows"}), sets), 10)
        log(f"  whole, neuron-granular v4 path (impl='rows'): {ms * 1e3:.2f} us")
        del xs, wr, a0, hs, sets
    torch.cuda.empty_cache()


def ab(cfgs):
    d, f, d_e, nw, dt = 4096, 11008, 256, 3, torch.float16
    e = f // d_e
    wu = [rand_w(f, d, dt) for _ in range(nw)]
    wdt = [rand_w(f, d, dt) for _ in range(nw)]
    wd = [w.t().contiguous() for w in wdt]
    for t in (8, 32):
        xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        wr0 = [rand_w(e, d, dt) for _ in range(nw)]

        rcfg = default_expert_config(t, d, d_e)

        def dense(x, r, u, dd, rcfg=rcfg):  # bench_kernels.py's dense MoE baseline
            router_logits(x, r, config=rcfg)
            return F.linear(F.silu(F.linear(x, u)), dd)

        base = bench(rotating(dense, list(zip(xs, wr0, wu, wd))), 10)
        log(f"T={t}: dense MoE {base * 1e3:.2f} us")
        for cls in (0.5, 0.7, 0.8):
            wr = [solve_rows(xs[i], union_mask(t, e, cls), dt) for i in range(nw)]
            nwt = [(torch.rand(e, device="cuda") + 0.5).to(dt) for _ in range(nw)]
            a0 = [router_logits(xs[i], wr[i]) for i in range(nw)]
            sets = list(zip(xs, wr, nwt, wu, wdt, a0))
            ref = K.moe_blocks(xs[0], wr[0], nwt[0], wu[0], wdt[0], backend="torch").float()
            for c in cfgs:
                ms = bench(rotating(lambda x, r, n, u, dd, a, c=c: K.moe_blocks(x, r, n, u, dd, config=c),
                                    sets), 10)
                up = bench(rotating(lambda x, r, n, u, dd, a, c=c: launch_expert_up(
                    x, a, n, u, e, d_e, 1e-6, c), sets), 10)
                # the down kernel alone, on h made by the up kernel of the same config
                hs = [launch_expert_up(x, a, n, u, e, d_e, 1e-6, c) for x, r, n, u, dd, a in sets]
                down = bench(rotating(lambda x, r, n, u, dd, a, h, c=c: launch_expert_down(
                    h, a, n, dd, e, d_e, 1e-6, c), [(*st, h) for st, h in zip(sets, hs)]), 10)
                y = K.moe_blocks(xs[0], wr[0], nwt[0], wu[0], wdt[0], config=c).float()
                err = ((y - ref).norm() / ref.norm()).item()
                log(f"  CLS {cls} {c}: layer {ms * 1e3:.2f} us (x{base / ms:.2f}, target "
                    f"{0.75 / (1 - cls):.2f}), up kernel {up * 1e3:.2f} us, down kernel "
                    f"{down * 1e3:.2f} us, rel err {err:.1e}")


def baseline():
    """The dense MoE baseline with each router: which part of the baseline is the router."""
    d, f, d_e, nw, dt = 4096, 11008, 256, 3, torch.float16
    e = f // d_e
    wu = [rand_w(f, d, dt) for _ in range(nw)]
    wd = [rand_w(f, d, dt).t().contiguous() for _ in range(nw)]
    for t in (8, 32):
        xs = [torch.randn(t, d, device="cuda").to(dt) for _ in range(nw)]
        wr = [rand_w(e, d, dt) for _ in range(nw)]
        sets = list(zip(xs, wr, wu, wd))
        routers = {
            "none": None,
            "kernel, plain loop": {},
            "kernel, library default for T": default_expert_config(t, d, d_e),
            "cuBLAS": "cublas",
        }
        for name, rc in routers.items():
            def dense(x, r, u, dd, rc=rc):
                if rc == "cublas":
                    F.linear(x, r)
                elif rc is not None:
                    router_logits(x, r, config=rc)
                return F.linear(F.silu(F.linear(x, u)), dd)

            ms = bench(rotating(dense, sets), 10)
            only = "" if rc is None else " (router alone: {:.2f} us)".format(bench(rotating(
                lambda x, r, u, dd, rc=rc: F.linear(x, r) if rc == "cublas" else router_logits(
                    x, r, config=rc), sets), 10) * 1e3)
            log(f"T={t}: dense MoE, router {name}: {ms * 1e3:.2f} us{only}")


def resources() -> None:
    """Registers and shared memory of every compiled variant of the expert kernels (which bounds
    how many of their programs an SM holds, and so whether the down kernel's programs can sit
    beside the up kernel's)."""
    from bench_kernels import kernel_resources
    from workbench.kernels.moe_blocks.triton import _expert_down_kernel, _expert_up_kernel

    log("\n".join(kernel_resources(_expert_up_kernel, _expert_down_kernel)))


if __name__ == "__main__":
    if "--baseline" in sys.argv:
        baseline()
    elif "--ab" in sys.argv:
        import json

        ab(json.loads(sys.argv[sys.argv.index("--ab") + 1]))
        if "--resources" in sys.argv:
            resources()
    else:
        main()
