"""P1 with few, long programs (attempt v13): each program compacts a large slice of d_ff once
(cumsum, active row numbers and values scattered into a global scratch list, one barrier) and then
streams the active rows of its column block from that list, the row loads software-pipelined
through tl.dot (token axis padded to 16) or plain FMAs. SPLIT slices of d_ff share a column block
through the library's split reduction; SPLIT 1 stores the output directly (no atomics, no ticket).

Also times the library kernel with other configs (--lib-cfgs). Against the library default (`K.sparse_down`) and cuBLAS, same run, rotated weights, graph replays:

    PYTHONPATH=$PWD python3 benchmarks/diag_stream.py [--shapes 4096x11008] [--cfgs JSON]
    PYTHONPATH=$PWD TRITON_INTERPRET=1 python3 benchmarks/diag_stream.py --check-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from workbench.kernels._tl import pdl_release, pdl_wait, split_reduce  # noqa: E402


@triton.jit
def _stream_down(
    A,
    W,
    Y,
    ACC,
    CNT,
    IDX,
    VAL,
    K,
    N,
    stride_w,
    NUM_NB,
    SPLIT,
    RPS: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    USE_DOT: tl.constexpr,
    PDL: tl.constexpr,
    ALOAD: tl.constexpr = False,
    DENSE_CNT: tl.constexpr = -1,
    I32: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pid_n = pid % NUM_NB
    pid_s = pid // NUM_NB
    pdl_wait(PDL)
    offs = tl.arange(0, RPS)
    rows_all = pid_s * RPS + offs
    a_all = tl.load(A + rows_all, mask=rows_all < K, other=0.0)
    act = (a_all != 0).to(tl.int32)
    pos = tl.cumsum(act, axis=0) - 1
    cnt = tl.sum(act, axis=0)
    slot = pid.to(tl.int64) * RPS
    tl.store(IDX + slot + pos, rows_all, mask=act > 0)
    tl.store(VAL + slot + pos, a_all, mask=act > 0)
    tl.debug_barrier()

    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    offs_b = tl.arange(0, BK)
    if USE_DOT:
        acc = tl.zeros([16, BN], dtype=tl.float32)
        t16 = tl.arange(0, 16)
    else:
        acc = tl.zeros([BK, BN], dtype=tl.float32)
    if DENSE_CNT >= 0 and cnt > DENSE_CNT:  # dense fallback (as the library kernel has)
        for i in range(0, RPS, BK):
            rows = pid_s * RPS + i + offs_b
            ok = rows < K
            a = tl.load(A + rows, mask=ok, other=0.0)
            w = tl.load(
                W + rows[:, None].to(tl.int64) * stride_w + offs_n[None, :],
                mask=ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if USE_DOT:
                a16 = tl.where(t16[:, None] == 0, a[None, :], 0.0).to(w.dtype)
                acc = tl.dot(a16, w, acc)
            else:
                acc += a[:, None].to(tl.float32) * w.to(tl.float32)
    else:
        for i in range(0, cnt, BK):
            j = i + offs_b
            ok = j < cnt
            rows = tl.load(IDX + slot + j, mask=ok, other=0)
            if ALOAD:  # the activation from A by row number
                a = tl.load(A + rows, mask=ok, other=0.0)
            else:
                a = tl.load(VAL + slot + j, mask=ok, other=0.0)
            if I32:
                wp = W + rows[:, None] * stride_w + offs_n[None, :]
            else:
                wp = W + rows[:, None].to(tl.int64) * stride_w + offs_n[None, :]
            w = tl.load(wp, mask=ok[:, None] & n_ok[None, :], other=0.0)
            if USE_DOT:
                a16 = tl.where(t16[:, None] == 0, a[None, :], 0.0).to(w.dtype)
                acc = tl.dot(a16, w, acc)
            else:
                acc += a[:, None].to(tl.float32) * w.to(tl.float32)
    pdl_release(PDL)
    if USE_DOT:
        part = tl.sum(tl.where(t16[:, None] == 0, acc, 0.0), axis=0)
    else:
        part = tl.sum(acc, axis=0)
    if SPLIT == 1:
        tl.store(Y + offs_n, part.to(Y.dtype.element_ty), mask=n_ok)
    else:
        last, total = split_reduce(ACC + offs_n, n_ok, part, CNT + pid_n, SPLIT, cnt > 0)
        if last:
            tl.store(Y + offs_n, total.to(Y.dtype.element_ty), mask=n_ok)


_WS: dict = {}


def stream_down(a: torch.Tensor, w: torch.Tensor, cfg: dict) -> torch.Tensor:
    """y [d_model] = a [d_ff] @ w [d_ff, d_model], one token."""
    k, n = w.shape
    rps, bn = cfg["RPS"], cfg["BN"]
    split = triton.cdiv(k, rps)
    num_nb = triton.cdiv(n, bn)
    grid = split * num_nb
    key = (k, n, rps, bn, str(a.device))
    if key not in _WS:
        _WS[key] = (
            torch.zeros(n, dtype=torch.float32, device=a.device),
            torch.zeros(num_nb, dtype=torch.int32, device=a.device),
            torch.zeros(grid * rps, dtype=torch.int32, device=a.device),
            torch.zeros(grid * rps, dtype=a.dtype, device=a.device),
        )
    acc, cnt, idx, val = _WS[key]
    y = torch.empty(n, dtype=a.dtype, device=a.device)
    pdl = cfg.get("pdl", False)
    _stream_down[(grid,)](
        a.reshape(-1),
        w,
        y,
        acc,
        cnt,
        idx,
        val,
        k,
        n,
        w.stride(0),
        num_nb,
        split,
        RPS=rps,
        BK=cfg["BK"],
        BN=bn,
        USE_DOT=cfg.get("dot", True),
        PDL=pdl,
        ALOAD=cfg.get("aload", False),
        DENSE_CNT=int(rps * cfg["dense"]) if cfg.get("dense") else -1,
        I32=cfg.get("i32", False),
        num_warps=cfg.get("warps", 4),
        num_stages=cfg.get("stages", 3),
        **({"launch_pdl": True} if pdl else {}),
    )
    return y


CFGS = [
    {"RPS": 4096, "BK": 32, "BN": 128, "warps": 4, "stages": 3},
    {"RPS": 4096, "BK": 64, "BN": 128, "warps": 4, "stages": 3},
    {"RPS": 4096, "BK": 32, "BN": 128, "warps": 4, "stages": 5},
    {"RPS": 4096, "BK": 64, "BN": 64, "warps": 4, "stages": 4},
    {"RPS": 2048, "BK": 32, "BN": 128, "warps": 4, "stages": 4},
    {"RPS": 2048, "BK": 32, "BN": 256, "warps": 4, "stages": 3},
    {"RPS": 2048, "BK": 16, "BN": 256, "warps": 4, "stages": 4},
    {"RPS": 16384, "BK": 64, "BN": 32, "warps": 8, "stages": 4},
    {"RPS": 16384, "BK": 128, "BN": 32, "warps": 8, "stages": 3},
    {"RPS": 4096, "BK": 32, "BN": 128, "warps": 4, "stages": 3, "dot": False},
    {"RPS": 2048, "BK": 16, "BN": 256, "warps": 4, "stages": 2, "dot": False},
]


def check_cpu():
    torch.manual_seed(0)
    for k, n, s in ((11008 // 16 * 16 // 4, 256, 0.9), (496, 96, 0.5), (304, 64, 1.0), (304, 64, 0.0)):
        w = (torch.randn(k, n) / k**0.5).half()
        a = torch.randn(k).half() * (torch.rand(k) >= s).half()
        ref = (a.double() @ w.double()).float()
        for cfg in (
            {"RPS": 128, "BK": 16, "BN": 32},
            {"RPS": 512, "BK": 32, "BN": 64},
            {"RPS": 128, "BK": 16, "BN": 32, "dot": False},
            {"RPS": 128, "BK": 16, "BN": 32, "dot": False, "aload": True},
            {"RPS": 128, "BK": 16, "BN": 32, "dot": False, "dense": 0.6, "i32": True},
        ):
            for _ in range(2):  # the workspace must be left clean for the next call
                y = stream_down(a, w, cfg).float()
                err = ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                assert err < 2e-3 or ref.norm() == 0 and y.abs().max() == 0, (k, n, s, cfg, err)
            print(f"ok k={k} n={n} s={s} {cfg} rel err {err:.1e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check-cpu", action="store_true")
    p.add_argument("--shapes", default="4096x11008")
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--cfgs", default=None, help="JSON list of stream-kernel configs ('[]': none)")
    p.add_argument("--lib-cfgs", default="[]", help="JSON list of K.sparse_down configs to time too")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--resources", action="store_true", help="print registers and spills")
    args = p.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    import torch.nn.functional as F
    from bench_kernels import (
        K,
        bench,
        exact_active,
        kernel_resources,
        log,
        n_copies,
        rand_w,
        rotating,
    )

    cfgs = json.loads(args.cfgs) if args.cfgs else CFGS
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    log(f"{torch.cuda.get_device_name(0)} torch {torch.__version__} triton {triton.__version__}")
    for shape in args.shapes.split(","):
        d, f = map(int, shape.split("x"))
        dt = torch.float16 if args.dtype == "fp16" else torch.bfloat16
        nw = n_copies(0.05 * d * f * 2, l2)
        wt = [rand_w(f, d, dt) for _ in range(nw)]
        wd = [w.t().contiguous() for w in wt]
        for s in map(float, args.sparsities.split(",")):
            acts = [torch.randn(1, f, device="cuda").to(dt) * exact_active(f, s).to(dt) for _ in wt]
            sets = list(zip(acts, wt))
            base = bench(rotating(lambda a_, w_: F.linear(a_, w_), list(zip(acts, wd))), args.rep)
            lib = bench(rotating(lambda a_, w_: K.sparse_down(a_, w_), sets), args.rep)
            line = [f"dense {base * 1e3:.2f}", f"lib {lib * 1e3:.2f} (x{base / lib:.2f})"]
            ref = F.linear(acts[0], wd[0]).float()
            for lc in json.loads(args.lib_cfgs):
                y = K.sparse_down(acts[0], wt[0], config=lc).float()
                err = ((y - ref).norm() / ref.norm()).item()
                ms = bench(rotating(lambda a_, w_, lc=lc: K.sparse_down(a_, w_, config=lc), sets), args.rep)
                line.append(f"lib {lc} {ms * 1e3:.2f} (x{base / ms:.2f}, err {err:.0e})")
            lib2 = bench(rotating(lambda a_, w_: K.sparse_down(a_, w_), sets), args.rep)
            line.append(f"lib again {lib2 * 1e3:.2f} (x{base / lib2:.2f})")
            for cfg in cfgs:
                for pdl in (True,):
                    c = dict(cfg, pdl=pdl and os.environ.get("WB_PDL", "1") != "0")
                    try:
                        y = stream_down(acts[0], wt[0], c).float()
                        err = ((y - ref).norm() / ref.norm()).item()
                        ms = bench(rotating(lambda a_, w_, c=c: stream_down(a_, w_, c), sets), args.rep)
                        line.append(f"{cfg} {ms * 1e3:.2f} (x{base / ms:.2f}, err {err:.0e})")
                    except Exception as e:  # noqa: BLE001
                        line.append(f"{cfg} FAILED {type(e).__name__}: {str(e)[:120]}")
            log(f"{shape} s={s}:\n    " + "\n    ".join(line))
        if args.resources:
            from workbench.kernels.sparse_gemv.triton import _sparse_down_kernel

            log("\n".join(kernel_resources(_sparse_down_kernel, _stream_down)))
        del wt, wd
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
