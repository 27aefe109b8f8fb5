"""Where the one-token updown kernel's time goes (P2 exact mode, s = 0.9, fp16): the same kernel
body with different epilogues, timed alone in graph replays over rotated weights as in
bench_kernels.py.

EPI 0: the library's split reduction (fp32 atomics into one zeroed workspace, ticket, last
       program casts), optionally through REPL replicas of the workspace (program p adds into
       replica p % REPL; the last program sums the replicas), which spreads the same-address
       atomics over REPL times as many L2 lines.
EPI 1: timing only (wrong result): each program stores its fp32 partial into its own row, no
       atomics and no ticket: the cost of everything but the reduction.
EPI 2: timing only: atomics into the workspace, no ticket and no final cast.
EPI 3: timing only: one float per program stored (no output traffic at all).
NORELOAD: take the ranked rows' gate values from the chunk in registers instead of reloading them
       (one dependent L2 round trip less); EVICT: weight loads marked evict_first.

    PYTHONPATH=$PWD python3 benchmarks/diag_updown.py [--floors | --quick]
    PYTHONPATH=$PWD python3 benchmarks/diag_updown.py --predicted [--predicted2]   # MODE 1 blocks
    PYTHONPATH=$PWD python3 benchmarks/diag_updown.py --p3 [--bf16 --bias] [--cfgs JSON] [--ff 14336]   # whole P3 layer
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bench_kernels import K, bench, exact_active, log, rand_w, rotating, sign_rows  # noqa: E402
from workbench.kernels._tl import round_to as _rnd  # noqa: E402
from workbench.kernels.sparse_ffn.updown import updown  # noqa: E402


@triton.jit
def _updown_diag(
    X, SRC, WU, WD, Y, ACC, CNT, K, N, stride_w, thr, NUM_CHUNKS,
    CHUNK: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EPI: tl.constexpr,
    REPL: tl.constexpr, NORELOAD: tl.constexpr = False, EVICT: tl.constexpr = False,
):  # fmt: skip
    pid = tl.program_id(0)
    DT = X.dtype.element_ty
    offs_c = tl.arange(0, CHUNK)
    rows_c = pid * CHUNK + offs_c
    in_k = rows_c < K
    src = tl.load(SRC + rows_c, mask=in_k, other=0.0).to(tl.float32)
    act = (src > thr) & in_k
    acti = act.to(tl.int32)
    cnt = tl.sum(acti, axis=0)
    pos = tl.where(act, tl.cumsum(acti, axis=0) - 1, -1)
    offs_n = tl.arange(0, BN)
    n_ok = offs_n < N
    x = tl.load(X + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    yacc = tl.zeros([BN], dtype=tl.float32)
    offs_b = tl.arange(0, BK)
    for i in range(0, cnt, BK):
        j = i + offs_b
        r_ok = j < cnt
        local = tl.sum(tl.where(pos[None, :] == j[:, None], offs_c[None, :], 0), axis=1)
        rows = pid * CHUNK + local
        m = r_ok[:, None] & n_ok[None, :]
        if EVICT:
            wu = tl.load(
                WU + rows[:, None] * stride_w + offs_n[None, :],
                mask=m,
                other=0.0,
                eviction_policy="evict_first",
            )
            wd = tl.load(
                WD + rows[:, None] * stride_w + offs_n[None, :],
                mask=m,
                other=0.0,
                eviction_policy="evict_first",
            )
        else:
            wu = tl.load(WU + rows[:, None] * stride_w + offs_n[None, :], mask=m, other=0.0)
            wd = tl.load(WD + rows[:, None] * stride_w + offs_n[None, :], mask=m, other=0.0)
        u = _rnd(tl.sum(wu.to(tl.float32) * x[None, :], axis=1), DT)
        if NORELOAD:  # the gate values of the ranked rows from the chunk already in registers
            g = tl.sum(tl.where(pos[None, :] == j[:, None], src[None, :], 0.0), axis=1)
        else:
            g = tl.load(SRC + rows, mask=r_ok, other=0.0).to(tl.float32)
        a = _rnd(_rnd(tl.where(g > thr, g, 0.0), DT) * u, DT)
        a = tl.where(r_ok, a, 0.0)
        yacc += tl.sum(a[:, None] * wd.to(tl.float32), axis=0)
    if EPI == 1:
        tl.store(ACC + pid * N + offs_n, yacc, mask=n_ok)
    elif EPI == 3:  # one float per program: the loads and arithmetic without any output traffic
        tl.store(ACC + pid, tl.sum(yacc, axis=0))
    elif EPI == 2:
        if cnt > 0:
            tl.atomic_add(ACC + offs_n, yacc, mask=n_ok, sem="relaxed")
    else:
        if cnt > 0:
            tl.atomic_add(ACC + (pid % REPL) * N + offs_n, yacc, mask=n_ok, sem="relaxed")
        tl.debug_barrier()
        ticket = tl.atomic_add(CNT, 1, sem="acq_rel")
        if ticket == NUM_CHUNKS - 1:
            total = tl.zeros([BN], dtype=tl.float32)
            zero = tl.zeros([BN], dtype=tl.float32)
            for r in tl.static_range(REPL):
                total += tl.atomic_add(ACC + r * N + offs_n, zero, mask=n_ok, sem="relaxed")
            for r in tl.static_range(REPL):
                tl.store(ACC + r * N + offs_n, zero, mask=n_ok)
            tl.store(CNT, 0)
            tl.store(Y + offs_n, _rnd(total, DT).to(DT), mask=n_ok)


@triton.jit
def _empty(Y):
    if tl.program_id(0) == 0:
        tl.store(Y, 1.0)


@triton.jit
def _gather_rows(IDX, W, OUT, stride_w, N, R: tl.constexpr, BN: tl.constexpr):
    """Floor of a row gather: program p reads rows IDX[p*R:(p+1)*R], all N columns, and stores
    their fp32 sum into its own output row (no ranking, no atomics)."""
    pid = tl.program_id(0)
    rows = tl.load(IDX + pid * R + tl.arange(0, R))
    offs_n = tl.arange(0, BN)
    w = tl.load(W + rows[:, None] * stride_w + offs_n[None, :], mask=(offs_n < N)[None, :])
    tl.store(OUT + pid * N + offs_n, tl.sum(w.to(tl.float32), axis=0), mask=offs_n < N)


def floors(wdt, s):
    y = torch.zeros(1, device="cuda")
    ms = bench(lambda: _empty[(1,)](y), 10)
    log(f"  empty kernel, 1 program: {ms * 1e3:.2f} us")
    ms = bench(lambda: _empty[(344,)](y), 10)
    log(f"  empty kernel, 344 programs: {ms * 1e3:.2f} us")
    k, n = wdt[0].shape
    for r in (4, 8, 16):
        na = int(round((1 - s) * k)) // r * r
        idx = [torch.randperm(k, device="cuda")[:na].sort().values.to(torch.int32) for _ in wdt]
        out = torch.empty((na // r, n), device="cuda")
        sets = list(zip(idx, wdt))
        ms = bench(
            rotating(
                lambda i, w, r=r, na=na, out=out: _gather_rows[(na // r,)](
                    i, w, out, w.stride(0), n, R=r, BN=triton.next_power_of_2(n), num_warps=4
                ),
                sets,
            ),
            10,
        )
        mb = na * n * 2 / 1e6
        log(
            f"  gather {na} random rows x {n} (R={r}, {mb:.1f} MB): {ms * 1e3:.2f} us, "
            f"{mb / ms / 1e3:.2f} TB/s"
        )


def run_diag(x, src, wu, wdt, thr, chunk, warps, epi, repl, bk=4, noreload=False, evict=False):
    k, n = wu.shape
    chunks = triton.cdiv(k, chunk)
    rows = chunks if epi == 1 else repl
    acc = torch.zeros((rows, n), dtype=torch.float32, device=x.device)
    cnt = torch.zeros(1, dtype=torch.int32, device=x.device)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)

    def go():
        _updown_diag[(chunks,)](
            x, src, wu, wdt, y, acc, cnt, k, n, wu.stride(0), thr, chunks,
            CHUNK=chunk, BK=bk, BN=triton.next_power_of_2(n), EPI=epi, REPL=repl,
            NORELOAD=noreload, EVICT=evict, num_warps=warps, num_stages=1,
        )  # fmt: skip
        return y

    return go


VARIANTS = [  # (EPI, REPL, NORELOAD, EVICT)
    (0, 1, False, False), (3, 1, False, False), (2, 1, False, False),
    (0, 1, True, False), (0, 1, True, True), (3, 1, True, True),
]  # fmt: skip
CONFIGS = [(32, 4, 4), (64, 8, 4), (64, 4, 4), (16, 4, 2), (64, 8, 8)]  # (CHUNK, warps, BK)
if "--quick" in sys.argv:  # second run: one-iteration blocks (BK >= the active rows per chunk)
    VARIANTS = [(0, 1, False, False), (3, 1, False, False)]
    CONFIGS = [(32, 4, 4), (32, 8, 8), (32, 4, 8), (16, 4, 4), (16, 2, 4), (32, 8, 4)]


def main():
    # 10 weight copies: more than 3x the L2 (50 MB) is read between two uses of a copy
    d, f, nw, dt = 4096, 11008, 10, torch.float16
    wg = [rand_w(f, d, dt) for _ in range(nw)]
    wu = [rand_w(f, d, dt) for _ in range(nw)]
    wdt = [rand_w(f, d, dt) for _ in range(nw)]
    xs = [torch.randn(1, d, device="cuda").to(dt) for _ in range(nw)]
    for s in (0.9, 0.5):
        wgs = [sign_rows(wg[i], xs[i][0], exact_active(f, s)) for i in range(nw)]
        srcs = [torch.nn.functional.linear(xs[i], wgs[i]).reshape(-1) for i in range(nw)]
        mb = (1 - s) * f * d * 2 * 2 / 1e6
        log(f"s={s}: {mb:.1f} MB of up+down rows, {mb / 2.5e6 * 1e6:.2f} us at 2.5 TB/s")
        sets = list(zip(xs, srcs, wu, wdt))
        if FLOORS:
            floors(wdt, s)
        ms = bench(rotating(lambda x, g, u, w: updown(x, g, None, u, w, mode=0), sets), 10)
        log(f"  library updown (defaults): {ms * 1e3:.2f} us")
        ref = updown(xs[0], srcs[0], None, wu[0], wdt[0], mode=0).float()
        for chunk, warps, bk in CONFIGS:
            for epi, repl, nr, ev in VARIANTS:
                fns = [
                    run_diag(x, g, u, w, 0.0, chunk, warps, epi, repl, bk, nr, ev)
                    for x, g, u, w in sets
                ]
                ms = bench(rotating(lambda fn: fn(), [(fn,) for fn in fns]), 10)
                note = ""
                if epi == 0:
                    err = ((fns[0]().float() - ref).norm() / ref.norm()).item()
                    note = f", rel err vs library {err:.1e}"
                log(
                    f"  CHUNK={chunk} BK={bk} warps={warps} EPI={epi} REPL={repl} noreload={nr} "
                    f"evict={ev}: {ms * 1e3:.2f} us{note}"
                )


FLOORS = "--floors" in sys.argv

P3_CFGS = [
    {},
    {"fuse_pred2": True},
    {"fuse_pred2": True, "updown": dict(CHUNK=64, BK=2, num_warps=8, early_gate=True)},
    {"fuse_pred2": True, "updown": dict(CHUNK=16, BK=2, num_warps=8, early_gate=True)},
    {"fuse_pred2": True, "updown": dict(CHUNK=32, BK=2, num_warps=4, early_gate=True)},
]
P3_CFGS2 = [  # second run: around the first run's winner (fused, CHUNK 16, BK 2, 8 warps)
    {},
    {"fuse_pred2": False},
    {"fuse_pred2": True, "updown": dict(CHUNK=16, BK=2, num_warps=8, early_gate=True)},
    {"fuse_pred2": True, "updown": dict(CHUNK=16, BK=2, num_warps=4, early_gate=True)},
    {"fuse_pred2": True, "updown": dict(CHUNK=16, BK=1, num_warps=4, early_gate=True)},
    {"fuse_pred2": True, "updown": dict(CHUNK=8, BK=2, num_warps=4, early_gate=True)},
    {"fuse_pred2": True, "updown": dict(CHUNK=16, BK=4, num_warps=8, early_gate=True)},
]


def _cfgs_arg():
    """--cfgs JSON: a list of configs replacing the built-in ones of --p3 (e.g. persistent
    programs: '[{}, {"updown": {"persist": 2}}]')."""
    if "--cfgs" in sys.argv:
        import json

        return json.loads(sys.argv[sys.argv.index("--cfgs") + 1])
    return None


def p3():
    """The whole P3 layer (predictor + predicted updown), the predictor's second layer as a
    separate GEMV (default) or fused into the updown kernel (fuse_pred2), 4096x11008 (--ff: another
    d_ff), width 1024."""
    d, f, wd_, nw = 4096, 11008, 1024, 6
    if "--ff" in sys.argv:  # another d_ff (e.g. 14336, P3's second shape)
        f = int(sys.argv[sys.argv.index("--ff") + 1])
    dt = torch.bfloat16 if "--bf16" in sys.argv else torch.float16
    wg, wu, wdt = ([rand_w(f, d, dt) for _ in range(nw)] for _ in range(3))
    w1 = [rand_w(wd_, d, dt) for _ in range(nw)]
    w2r = [rand_w(f, wd_, dt) for _ in range(nw)]
    xs = [torch.randn(1, d, device="cuda").to(dt) for _ in range(nw)]
    hs = [torch.relu(torch.nn.functional.linear(xs[i], w1[i]))[0] for i in range(nw)]
    # --bias: predictor biases as wb.accelerate's predictors have them (b2 small: signs kept)
    b1 = [torch.zeros(wd_, device="cuda").to(dt) for _ in range(nw)]
    b2 = [(torch.rand(f, device="cuda") * 1e-3).to(dt) for _ in range(nw)]
    bias = "--bias" in sys.argv
    for s in (0.9, 0.8, 0.5):
        w2 = [sign_rows(w2r[i], hs[i], exact_active(f, s)) for i in range(nw)]
        sets = list(zip(xs, wg, wu, wdt, w1, w2, b1, b2))

        def call(x, a, b, c, p, q, pb1, pb2, cfg=None, backend=None):
            kw = dict(b_pred1=pb1, b_pred2=pb2) if bias else {}
            return K.sparse_ffn_predicted(x, a, b, c, p, q, config=cfg, backend=backend, **kw)

        ref = call(*sets[0], backend="torch").float()
        for cfg in _cfgs_arg() or (P3_CFGS2 if "--p3b" in sys.argv else P3_CFGS):
            ms = bench(rotating(lambda *a, cfg=cfg: call(*a, cfg=cfg), sets), 10)
            y = call(*sets[0], cfg=cfg).float()
            err = ((y - ref).norm() / ref.norm()).item()
            log(f"P3 s={s} {cfg or 'default'}: {ms * 1e3:.2f} us, rel err vs torch {err:.1e}")

PRED = [  # predicted mode (MODE 1): the library default, then early_gate (all three tiles at once)
    {},
    dict(early_gate=True),
    dict(early_gate=True, BK=2),
    dict(early_gate=True, CHUNK=32),
    dict(early_gate=True, num_warps=16),
    dict(early_gate=True, CHUNK=32, BK=2, num_warps=4),
    dict(early_gate=True, CHUNK=128, num_warps=16),
    dict(early_gate=True, CHUNK=32, BK=2, num_warps=8),
]

PRED2 = [  # second run: around the first run's winner (early_gate, CHUNK 32, BK 2, 8 warps)
    dict(early_gate=True, CHUNK=32, BK=2, num_warps=8),
    dict(CHUNK=32, BK=2, num_warps=8),
    dict(early_gate=True, CHUNK=16, BK=2, num_warps=8),
    dict(early_gate=True, CHUNK=16, BK=2, num_warps=4),
    dict(early_gate=True, CHUNK=32, BK=1, num_warps=8),
    dict(early_gate=True, CHUNK=64, BK=2, num_warps=16),
    dict(early_gate=True, CHUNK=32, BK=2, num_warps=16),
    dict(early_gate=True, CHUNK=16, BK=1, num_warps=4),
]


EXACT = [  # exact mode (MODE 0) in the same run
    {},
    dict(early_gate=True),
    dict(early_gate=True, BK=2, num_warps=8),
    dict(BK=2, num_warps=8),
    dict(early_gate=True, CHUNK=16, BK=2, num_warps=4),
]


def predicted():
    """The predicted-mode updown alone (P3's kernel after the predictor), rows where logit > 0."""
    d, f, nw, dt = 4096, 11008, 10, torch.float16
    wg, wu, wdt = ([rand_w(f, d, dt) for _ in range(nw)] for _ in range(3))
    xs = [torch.randn(1, d, device="cuda").to(dt) for _ in range(nw)]
    for s in (0.9, 0.5):
        lgs = []
        for _ in range(nw):
            act = exact_active(f, s).to("cuda")
            lgs.append((torch.rand(f, device="cuda") + 0.1) * torch.where(act, 1.0, -1.0))
        lgs = [lg.to(dt)[None] for lg in lgs]
        mb = (1 - s) * f * d * 2 * 3 / 1e6
        log(f"predicted s={s}: {mb:.1f} MB of gate+up+down rows, {mb / 2.5e6 * 1e6:.2f} us at 2.5 TB/s")
        sets = list(zip(xs, lgs, wg, wu, wdt))
        ref = updown(xs[0], lgs[0], wg[0], wu[0], wdt[0], mode=1).float()
        for cfg in PRED2 if "--predicted2" in sys.argv else PRED:
            ms = bench(rotating(lambda x, lg, a, b, c, cfg=cfg: updown(
                x, lg, a, b, c, mode=1, config=cfg), sets), 10)  # fmt: skip
            y = updown(xs[0], lgs[0], wg[0], wu[0], wdt[0], mode=1, config=cfg).float()
            err = ((y - ref).norm() / ref.norm()).item()
            log(f"  {cfg or 'default'}: {ms * 1e3:.2f} us, rel diff vs default {err:.1e}")
        if "--exact" in sys.argv:  # the logits serve as the dense gate (threshold 0)
            ref = updown(xs[0], lgs[0], None, wu[0], wdt[0], mode=0).float()
            for cfg in EXACT:
                ms = bench(rotating(lambda x, lg, a, b, c, cfg=cfg: updown(
                    x, lg, None, b, c, mode=0, config=cfg), sets), 10)  # fmt: skip
                y = updown(xs[0], lgs[0], None, wu[0], wdt[0], mode=0, config=cfg).float()
                err = ((y - ref).norm() / ref.norm()).item()
                log(f"  exact {cfg or 'default'}: {ms * 1e3:.2f} us, rel diff vs default {err:.1e}")


if __name__ == "__main__":
    if "--p3" in sys.argv:
        p3()
    else:
        predicted() if "--predicted" in sys.argv else main()
