"""Triton kernels vs float64 references: interpreter on CPU, compiled on CUDA (``-m gpu``).

Every case draws fresh random inputs from a generator seeded per case; token counts are odd
(plus 1 and 8 where the kernels switch paths); masks are random, all-zero and all-active.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
import workbench.kernels as K

from workbench.errors import KernelError

# The Triton interpreter evaluates masked-off lanes too (numpy on padding and NaN-poisoned
# weights): its overflow / invalid-value warnings are expected and never reach a stored result.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter"),
]

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2}

# small block shapes so that the tiny test problems still span several programs, chunks,
# d_model slices and partially filled tiles
CPU_DOWN = dict(CHUNK=64, BK=16, BN=32)
CPU_ROWS = dict(BR=32, BK=16, BD=16, DS=32)
CPU_EXPERTS = dict(BF=16, BD=16, RB=16, BN=16, S=3)  # several programs per expert and column
CPU_SHAPE = (48, 208)  # d_model, d_ff: multiples of 16, neither a power of two
GPU_SHAPE = (512, 1376)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _setup(device):
    if device == "cpu":
        return CPU_SHAPE, CPU_DOWN, CPU_ROWS
    return GPU_SHAPE, None, None


def _rel(out, ref) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    ref = ref.double()
    den = ref.norm().item()
    err = (out.double() - ref).norm().item()
    return err / den if den > 0 else err


def _mask(kind, shape, g, density=0.3):
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=g) < density


def _weights(g, rows, d, dtype, device, n=1, scale=None):
    scale = scale or d**-0.5
    return [(torch.randn(rows, d, generator=g) * scale).to(dtype).to(device) for _ in range(n)]


def _check_down_twice(a, w, device, cfg, kind):
    """sparse_down twice against the float64 product (the second call checks that the workspace
    and scratch list were left reusable); all-zero activations must give exact zeros."""
    ref = a.double() @ w.double()
    for _ in range(2):
        y = K.sparse_down(a.to(device), w.to(device), backend="triton", config=cfg)
        assert y.shape == (a.shape[0], w.shape[1])
        if kind == "zero":
            assert (y == 0).all()
        else:
            assert _rel(y.cpu(), ref) < TOL[a.dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,kind",
    [(1, "rand"), (3, "rand"), (5, "zero"), (7, "full"), (1, "zero"), (1, "full"), (8, "rand")],
)
def test_sparse_down(device, dtype, tokens, kind):
    """Library paths: one token through the scratch list, several through the rank tile."""
    (d, f), cdown, _ = _setup(device)
    g = _gen("down", device, dtype, tokens, kind)
    a = torch.randn(tokens, f, generator=g) * _mask(kind, (tokens, f), g, density=0.15)
    a = a.to(dtype).to(device)
    (w,) = _weights(g, f, d, dtype, device)
    ref = a.double().cpu() @ w.double().cpu()
    for _ in range(2):  # the second call checks that the workspace was left zeroed
        y = K.sparse_down(a, w, backend="triton", config=cdown)
        assert y.shape == (tokens, d) and y.dtype == dtype
        if kind == "zero":
            assert (y == 0).all()
        else:
            assert _rel(y.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rand", "zero", "full"])
def test_sparse_down_one_token_rank_tile(device, dtype, kind):
    """config list=False: one token through the rank tile and its dense fallback ("full")."""
    (d, f), cdown, _ = _setup(device)
    cfg = dict(cdown or {}, list=False)
    g = _gen("down-rank", device, dtype, kind)
    a = torch.randn(1, f, generator=g) * _mask(kind, (1, f), g, density=0.15)
    a = a.to(dtype)
    (w,) = _weights(g, f, d, dtype, "cpu")
    _check_down_twice(a, w, device, cfg, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rand", "full"])
def test_sparse_down_one_token_through_dot(device, dtype, kind):
    """config t_pad=16: one token padded to 16 so that the rows go through tl.dot (pipelined)."""
    (d, f), cdown, _ = _setup(device)
    g = _gen("down-dot", device, dtype, kind)
    a = (torch.randn(1, f, generator=g) * _mask(kind, (1, f), g, density=0.15)).to(dtype)
    (w,) = _weights(g, f, d, dtype, "cpu")
    ref = a.double() @ w.double()
    cfg = dict(cdown or dict(CHUNK=256, BK=16, BN=512), t_pad=16, num_stages=3)
    for _ in range(2):
        y = K.sparse_down(a.to(device), w.to(device), backend="triton", config=cfg)
        assert y.shape == (1, d) and _rel(y.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_down_one_token_dot_fraction(device, dtype):
    """config dot_fraction: each program picks tl.dot or FMAs by its own active-row count. The
    chunks get different densities so that one call takes all three loops (dense fallback, dot
    over the ranked rows, FMAs over the ranked rows) and skips an empty chunk."""
    (d, f), cdown, _ = _setup(device)
    cfg = dict(cdown or dict(CHUNK=256, BK=16, BN=512), dot_fraction=0.2)
    chunk = cfg["CHUNK"]
    g = _gen("down-dotfrac", device, dtype)
    dens = torch.tensor([1.0, 0.45, 0.1, 0.0])[torch.arange(f) // chunk % 4]
    for trial in range(2):
        # torch.where, not a product: -0.0 would count as active in the interpreter's bf16
        # (it compares bf16 bit patterns), and the branches under test would not be the intended ones
        keep = torch.rand(1, f, generator=g) < dens
        a = torch.where(keep, torch.randn(1, f, generator=g), 0.0).to(dtype)
        (w,) = _weights(g, f, d, dtype, "cpu")
        ref = a.double() @ w.double()
        y = K.sparse_down(a.to(device), w.to(device), backend="triton", config=cfg)
        assert y.shape == (1, d) and _rel(y.cpu(), ref) < TOL[dtype], trial
    zero = torch.zeros(1, f, dtype=dtype)
    y = K.sparse_down(zero.to(device), w.to(device), backend="triton", config=cfg)
    assert (y == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kind", [(1, "rand"), (1, "full"), (3, "rand"), (1, "zero")])
@pytest.mark.parametrize(
    "extra", [{}, {"list": False}, {"dot_fraction": 0.2}, {"compact": False}]
)
def test_sparse_down_rows_per_chunk(device, dtype, tokens, kind, extra):
    """config rows_per_chunk: programs own fewer rows than the CHUNK-wide rank tile (here 40 of
    64, so chunks straddle tile boundaries and the last one is partial)."""
    (d, f), cdown, _ = _setup(device)
    cfg = dict(cdown or dict(CHUNK=256, BK=16, BN=512), **extra)
    cfg["rows_per_chunk"] = cfg["CHUNK"] * 5 // 8
    g = _gen("down-rows", device, dtype, tokens, kind, tuple(extra))
    keep = _mask(kind, (tokens, f), g, density=0.3)
    a = torch.where(keep, torch.randn(tokens, f, generator=g), 0.0).to(dtype)
    (w,) = _weights(g, f, d, dtype, "cpu")
    _check_down_twice(a, w, device, cfg, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kind", [(1, "rand"), (1, "full"), (3, "rand"), (1, "zero"), (5, "full")])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"dense_fraction": 0.6},
        {"t_pad": 16, "num_stages": 3},
        {"rows_per_chunk": 40},
        {"list_prefetch": True},
        {"list_prefetch": True, "rows_per_chunk": 40},
        {"list_prefetch": False},
        {"w_evict": "evict_first"},
    ],
    ids=["list", "list-fallback", "list-dot", "list-rows", "pref", "pref-rows", "no-pref", "evict"],
)
def test_sparse_down_list(device, dtype, tokens, kind, extra):
    """config list: the active rows through a per-program scratch list (by default full chunks
    too; dense_fraction 0.6 compiles the dense fallback in); rows_per_chunk 40 (of a 64-wide
    tile) gives straddled and partial chunks; list_prefetch loads the row numbers a pass ahead
    (explicitly on and off, whatever the default for the shape); w_evict marks the weight-row
    loads evict_first. Two calls: the second reuses the scratch list."""
    (d, f), cdown, _ = _setup(device)
    cfg = dict(cdown or dict(CHUNK=256, BK=16, BN=512), list=True, **extra)
    if "rows_per_chunk" in extra:
        cfg["rows_per_chunk"] = cfg["CHUNK"] * 5 // 8
    g = _gen("down-list", device, dtype, tokens, kind, tuple(extra))
    keep = _mask(kind, (tokens, f), g, density=0.3)
    a = torch.where(keep, torch.randn(tokens, f, generator=g), 0.0).to(dtype)
    (w,) = _weights(g, f, d, dtype, "cpu")
    _check_down_twice(a, w, device, cfg, kind)


def test_sparse_down_list_with_dot_fraction_refused():
    a = torch.zeros(1, 64, dtype=torch.float16)
    w = torch.zeros(64, 32, dtype=torch.float16)
    with pytest.raises(KernelError, match="list"):
        K.sparse_down(
            a, w, backend="triton", config=dict(CHUNK=32, BK=16, BN=32, list=True, dot_fraction=0.2)
        )


def test_sparse_down_bad_eviction_policy_refused():
    a = torch.zeros(1, 64, dtype=torch.float16)
    w = torch.zeros(64, 32, dtype=torch.float16)
    with pytest.raises(KernelError, match="w_evict"):
        K.sparse_down(a, w, backend="triton", config=dict(list=True, w_evict="evict_early"))


def test_grid_rows_fills_idle_block_slots(monkeypatch):
    """The fp16 one-token default shrinks chunks only where the 256-row grid leaves more than 30 %
    of 4 blocks a SM idle, to about 96 % of them in one wave (132 SMs as on the H100)."""
    from workbench.kernels.sparse_gemv import triton as st

    monkeypatch.setitem(st._SM_COUNT, "cpu", 132)
    dev = torch.device("cpu")
    assert st.grid_rows(11008, 8, 256, dev) == 176  # 344 -> 504 programs
    assert st.grid_rows(14336, 8, 256, dev) == 256  # 448 programs already fill 85 %
    rows = st.grid_rows(2768, 8, 256, dev)
    assert rows % 16 == 0 and -(-2768 // rows) * 8 <= 0.96 * 528
    monkeypatch.setitem(st._SM_COUNT, "cpu", 16)  # a small GPU: the default grid is enough
    assert st.grid_rows(11008, 8, 256, dev) == 256


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rand", "full", "zero"])
def test_sparse_down_default_blocks_at_4096(dtype, kind):
    """d_model 4096, one token, library blocks (fp16: chunks sized by grid_rows; bf16: CHUNK)."""
    d, f = 4096, 2768
    g = _gen("down-4096", dtype, kind)
    keep = _mask(kind, (1, f), g, density=0.2)
    a = torch.where(keep, torch.randn(1, f, generator=g), 0.0).to(dtype)
    (w,) = _weights(g, f, d, dtype, "cpu")
    ref = a.double() @ w.double()
    for _ in range(2):
        y = K.sparse_down(a.cuda(), w.cuda(), backend="triton")
        if kind == "zero":
            assert (y == 0).all()
        else:
            assert _rel(y.cpu(), ref) < TOL[dtype]


def test_sparse_down_rows_per_chunk_bounds():
    a = torch.zeros(1, 64, dtype=torch.float16)
    w = torch.zeros(64, 32, dtype=torch.float16)
    with pytest.raises(KernelError, match="rows_per_chunk"):
        K.sparse_down(a, w, backend="triton", config=dict(CHUNK=32, BK=16, BN=32, rows_per_chunk=48))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_down_1d_and_reference(device):
    (d, f), cdown, _ = _setup(device)
    g = _gen("down1d", device)
    a = (torch.randn(f, generator=g) * _mask("rand", (f,), g)).half().to(device)
    (w,) = _weights(g, f, d, torch.float16, device)
    y = K.sparse_down(a, w, backend="triton", config=cdown)
    r = K.sparse_down(a, w, backend="torch")
    assert y.shape == (d,) and _rel(y.cpu(), r.cpu()) < 4e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,kind,cfg",
    [(1, "rand", None), (3, "rand", None), (8, "full", None), (1, "zero", None), (5, "zero", None),
     (1, "rand", {"list": False}), (4, "rand", {"dense_fraction": 0.1})],
)
def test_sparse_down_bias(device, dtype, tokens, kind, cfg):
    """A plain FFN's down bias, added in fp32 before the rounding, on every path (the one-token
    list, the rank tile, several tokens, the dense fallback); all-zero activations give the bias."""
    (d, f), cdown, _ = _setup(device)
    g = _gen("down_bias", device, dtype, tokens, kind, repr(cfg))
    a = (torch.randn(tokens, f, generator=g) * _mask(kind, (tokens, f), g, density=0.15)).to(dtype).to(device)
    (w,) = _weights(g, f, d, dtype, device)
    b = (torch.randn(d, generator=g) * 0.5).to(dtype).to(device)
    ref = a.double().cpu() @ w.double().cpu() + b.double().cpu()
    config = {**(cdown or {}), **(cfg or {})} or None
    for backend in ("triton", "torch"):
        for _ in range(2):
            y = K.sparse_down(a, w, bias=b, backend=backend, config=config)
            assert y.shape == (tokens, d) and y.dtype == dtype
            if kind == "zero":
                assert torch.equal(y, b.expand(tokens, d))
            else:
                assert _rel(y.cpu(), ref) < TOL[dtype]
    y1 = K.sparse_down(a[0], w, bias=b, backend="triton", config=cdown)
    assert y1.shape == (d,)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sparse_down_bad_bias_refused(backend):
    a = torch.zeros(2, 64, dtype=torch.float16)
    w = torch.zeros(64, 32, dtype=torch.float16)
    with pytest.raises(KernelError, match=r"bias has shape \(31,\).*\[32\]"):
        K.sparse_down(a, w, bias=torch.zeros(31, dtype=torch.float16), backend=backend)
    with pytest.raises(KernelError, match="bias is torch.float32.*float16"):
        K.sparse_down(a, w, bias=torch.zeros(32), backend=backend)


def _controlled_gate(g, x, rows, mask, dtype, margin=0.5):
    """W_gate [rows, d] with sign(x_t . W_gate[i]) = +1 exactly where mask[t, i]."""
    t, d = x.shape
    w0 = torch.randn(rows, d, generator=g, dtype=torch.float64) * d**-0.5
    xf = x.double()
    g0 = w0 @ xf.t()  # [rows, t]
    target = (g0.abs() + margin) * torch.where(mask.t(), 1.0, -1.0)
    corr = torch.linalg.solve(xf @ xf.t(), (target - g0).t()).t() @ xf
    return (w0 + corr).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,kind,act",
    [
        (1, "rand", "relu"),
        (3, "rand", "fatrelu"),
        (5, "zero", "relu"),
        (1, "full", "relu"),
        (7, "full", "fatrelu"),
    ],
)
def test_gated_up_and_ffn_exact(device, dtype, tokens, kind, act):
    (d, f), cdown, crows = _setup(device)
    g = _gen("exact", device, dtype, tokens, kind, act)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wg = _controlled_gate(g, x, f, _mask(kind, (tokens, f), g, 0.2), dtype).to(device)
    wu, wdt = _weights(g, f, d, dtype, device, n=2)
    x = x.to(device)
    thr = 0.05 if act == "fatrelu" else 0.0
    gate = F.linear(x, wg)
    a = K.gated_up(x, gate, wu, activation=act, threshold=thr, backend="triton", config=crows)
    gf = gate.double().cpu()
    a_ref = torch.where(gf > thr, gf, 0.0) * (x.double().cpu() @ wu.double().cpu().t())
    assert a.shape == (tokens, f)
    if kind == "zero":
        assert (a == 0).all()
    else:
        assert _rel(a.cpu(), a_ref) < TOL[dtype]
    cfg = None if cdown is None else {"rows": crows, "down": cdown}
    for _ in range(2):
        y = K.sparse_ffn(
            x, wg, wu, wdt, activation=act, threshold=thr, backend="triton", config=cfg
        )
        y_ref = a_ref.to(dtype).double() @ wdt.double().cpu()
        if kind == "zero":
            assert (y == 0).all()
        else:
            assert _rel(y.cpu(), y_ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kind", [(1, "rand"), (3, "rand"), (1, "zero"), (5, "full")])
def test_predicted_ffn(device, dtype, tokens, kind):
    (d, f), cdown, crows = _setup(device)
    width = d // 4
    g = _gen("pred", device, dtype, tokens, kind)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wg, wu, wdt = _weights(g, f, d, dtype, "cpu", n=3)
    (w1,) = _weights(g, width, d, dtype, "cpu")
    h = torch.relu(F.linear(x, w1)).to(dtype)
    if kind == "zero":
        w2 = (-torch.ones(f, width)).to(dtype)  # logits < 0 wherever h > 0
        h = h + 0  # keep
    else:
        w2 = _controlled_gate(g, h.float() + 1e-3, f, _mask(kind, (tokens, f), g, 0.25), dtype)
    dev = [t.to(device) for t in (x, wg, wu, wdt, w1, w2)]
    x, wg, wu, wdt, w1, w2 = dev
    logits = K.predictor_logits(x, w1, w2)
    a = K.gate_up_predicted(x, logits, wg, wu, backend="triton", config=crows)
    xf = x.double().cpu()
    gg = xf @ wg.double().cpu().t()
    a_ref = torch.relu(gg) * (xf @ wu.double().cpu().t()) * (logits.cpu() > 0)
    if kind == "zero":
        assert (a == 0).all() if (logits <= 0).all() else True
    assert _rel(a.cpu(), a_ref) < TOL[dtype] or (a_ref == 0).all()
    cfg = None if cdown is None else {"rows": crows, "down": cdown}
    y = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, backend="triton", config=cfg)
    y_ref = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, backend="torch")
    if (a_ref == 0).all():
        assert (y == 0).all()
    else:
        assert _rel(y.cpu(), y_ref.cpu()) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,kind,act,cfg",
    [(1, "rand", "relu", None), (1, "rand", "fatrelu", {"fuse_pred2": False}), (3, "rand", "relu", None),
     (1, "zero", "relu", None), (1, "full", "relu", None), (5, "full", "fatrelu", None),
     (1, "rand", "relu", {"bias": False})],
)
def test_plain_ffn_predicted(device, dtype, tokens, kind, act, cfg):
    """OPT-style FFN on a predictor's mask: act(x W_up^T + b_up) on predicted rows, then the down
    rows and b_down, against float64 on the same mask; one token takes the one-launch kernel
    (second predictor layer fused, or not), more tokens the row kernel and sparse_down; an
    all-off mask gives exactly b_down."""
    (d, f), cdown, crows = _setup(device)
    width = d // 4
    cfg = dict(cfg or {})
    bias = cfg.pop("bias", True)
    g = _gen("plain_pred", device, dtype, tokens, kind, act, bias, repr(cfg))
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wu, wdt = _weights(g, f, d, dtype, "cpu", n=2)
    (w1,) = _weights(g, width, d, dtype, "cpu")
    b1 = (torch.rand(width, generator=g) * 0.2).to(dtype)
    h = torch.relu(F.linear(x, w1, b1)).to(dtype)
    if kind == "zero":
        w2 = (-torch.ones(f, width)).to(dtype)  # logits < 0 wherever h > 0
    else:
        w2 = _controlled_gate(g, h.float() + 1e-3, f, _mask(kind, (tokens, f), g, 0.25), dtype)
    bu = (torch.randn(f, generator=g) * 0.3).to(dtype) if bias else None
    bd = (torch.randn(d, generator=g) * 0.3).to(dtype) if bias else None
    x, wu, wdt, w1, b1, w2 = (t.to(device) for t in (x, wu, wdt, w1, b1, w2))
    bu, bd = (t.to(device) if t is not None else None for t in (bu, bd))
    thr = 0.05 if act == "fatrelu" else 0.0
    on = (K.predictor_logits(x, w1, w2, b1).cpu() > 0)
    u = x.double().cpu() @ wu.double().cpu().t() + (bu.double().cpu() if bias else 0.0)
    a_ref = torch.where((u > thr) & on, u, 0.0)
    y_ref = a_ref @ wdt.double().cpu() + (bd.double().cpu() if bias else 0.0)
    if cdown is not None:
        cfg.update({"updown": dict(CHUNK=64, BK=4)} if tokens == 1 else {"rows": crows, "down": cdown})
    for _ in range(2):  # the second call checks the workspace was left zeroed
        y = K.plain_ffn_predicted(x, wu, wdt, w1, w2, b_up=bu, b_down=bd, b_pred1=b1, activation=act,
                                  threshold=thr, backend="triton", config=cfg or None)  # fmt: skip
        assert y.shape == (tokens, d) and y.dtype == dtype
        if not on.any():
            assert torch.equal(y, bd.expand(tokens, d)) if bias else (y == 0).all()
        else:
            assert _rel(y.cpu(), y_ref) < TOL[dtype]
    y_t = K.plain_ffn_predicted(x, wu, wdt, w1, w2, b_up=bu, b_down=bd, b_pred1=b1, activation=act,
                                threshold=thr, backend="torch")  # fmt: skip
    assert _rel(y_t.cpu(), y_ref) < TOL[dtype] or not on.any()
    y1 = K.plain_ffn_predicted(x[0], wu, wdt, w1, w2, b_up=bu, b_down=bd, b_pred1=b1, activation=act,
                               threshold=thr, backend="triton", config=cfg or None)  # fmt: skip
    assert y1.shape == (d,)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_ffn_predicted_default_blocks_at_opt_width(dtype):
    """d_model 4096 (OPT-6.7B's; d_ff cut to 2768 to keep the test small), one token, the library's
    blocks for the one-launch kernel (fp16 and bf16 defaults), biases and a width-1024 predictor."""
    d, f, width = 4096, 2768, 1024
    g = _gen("plain-4096", dtype)
    x = torch.randn(1, d, generator=g).to(dtype)
    wu, wdt = _weights(g, f, d, dtype, "cpu", n=2)
    (w1,) = _weights(g, width, d, dtype, "cpu")
    (w2,) = _weights(g, f, width, dtype, "cpu")
    b1 = (torch.rand(width, generator=g) * 0.1).to(dtype)
    b2 = (torch.randn(f, generator=g) * 0.5 - 0.6).to(dtype)
    bu, bd = (torch.randn(n, generator=g).mul(0.3).to(dtype) for n in (f, d))
    t = [v.cuda() for v in (x, wu, wdt, w1, w2, b1, b2, bu, bd)]
    on = (K.predictor_logits(t[0], t[3], t[4], t[5], t[6]).cpu() > 0)
    assert 0.05 < on.float().mean() < 0.6
    u = x.double() @ wu.double().t() + bu.double()
    y_ref = torch.where((u > 0) & on, u, 0.0) @ wdt.double() + bd.double()
    for _ in range(2):
        y = K.plain_ffn_predicted(t[0], t[1], t[2], t[3], t[4], b_pred1=t[5], b_pred2=t[6], b_up=t[7], b_down=t[8],
                                  backend="triton")  # fmt: skip
        assert _rel(y.cpu(), y_ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_plain_ffn_predicted_bad_bias_refused(backend):
    x = torch.zeros(1, 32, dtype=torch.float16)
    wu = torch.zeros(64, 32, dtype=torch.float16)
    w1, w2 = torch.zeros(8, 32, dtype=torch.float16), torch.zeros(64, 8, dtype=torch.float16)
    with pytest.raises(KernelError, match=r"b_up has shape \(32,\).*\[64\]"):
        K.plain_ffn_predicted(x, wu, wu, w1, w2, b_up=torch.zeros(32, dtype=torch.float16), backend=backend)
    with pytest.raises(KernelError, match="b_down is torch.float32.*float16"):
        K.plain_ffn_predicted(x, wu, wu, w1, w2, b_down=torch.zeros(32), backend=backend)


def _union_mask(g, tokens, f, cls):
    """Controlled union: (1 - cls) * f neurons form the union, each token inside it, every union
    neuron used by at least one token."""
    n_u = max(1, round((1 - cls) * f))
    union = torch.randperm(f, generator=g)[:n_u]
    m = torch.zeros(tokens, f, dtype=torch.bool)
    inside = torch.rand(tokens, n_u, generator=g) < 0.5
    inside[torch.randint(0, tokens, (n_u,), generator=g), torch.arange(n_u)] = True
    m[:, union] = inside
    return m


# gather path (chunk_ffn/gather.py) on CPU: small blocks, several programs, splits and tiles;
# S = 1 stores directly, S > 1 goes through the split reduction
CPU_GATHER = dict(BR=32, BM=16, BKD=32, BKR=16, BN=16, S=3)  # BKD does not divide d = 48


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["gather", "rows"])
@pytest.mark.parametrize(
    "tokens,cls,frac", [(3, 0.7, 0.6), (9, 0.5, 0.6), (5, 0.8, 1.0), (17, 0.0, 0.3)]
)
def test_chunk_ffn(device, dtype, impl, tokens, cls, frac):
    (d, f), cdown, crows = _setup(device)
    g = _gen("chunk", device, dtype, impl, tokens, cls, frac)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    m = _union_mask(g, tokens, f, cls)
    wg = _controlled_gate(g, x, f, m, dtype).to(device)
    wu, wdt = _weights(g, f, d, dtype, device, n=2)
    x = x.to(device)
    if impl == "rows":
        cfg = {"rows": crows or {}, "down": cdown or {}}
    else:
        cfg = {"gather": CPU_GATHER} if device == "cpu" else None
    xf = x.double().cpu()
    a_ref = torch.relu(xf @ wg.double().cpu().t()) * (xf @ wu.double().cpu().t())
    y_ref = a_ref.to(dtype).double() @ wdt.double().cpu()
    for _ in range(2):  # the second call checks that the list length and workspaces were reset
        y = K.chunk_ffn(x, wg, wu, wdt, dense_fraction=frac, backend="triton", config=cfg)
        assert y.shape == (tokens, d)
        assert _rel(y.cpu(), y_ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,kind,act,blocks",
    [
        (2, "rand", "relu", dict(S=1)),
        (7, "zero", "relu", {}),
        (11, "full", "fatrelu", dict(S=1, BN=32, split_below=1)),  # KS = 2 but never split
        (33, "rand", "fatrelu", dict(BM=32, BKR=32, S=4, KS=2)),  # d_model split unevenly
        (64, "rand", "relu", dict(BKD=16, KS=3)),  # d_model split evenly over 3 programs
    ],
)
def test_gather_ffn_matches_reference(device, dtype, tokens, kind, act, blocks):
    """The default 2..64-token path of sparse_ffn and chunk_ffn against the torch reference
    (same rounding as the dense FFN): every token count up to the maximum, empty and full unions,
    FATReLU thresholds, direct stores and split reductions (down: S, up: KS over d_model);
    repeated calls (state is reset)."""
    (d, f), _, _ = _setup(device)
    g = _gen("gather", device, dtype, tokens, kind, act)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wg = _controlled_gate(g, x, f, _mask(kind, (tokens, f), g, 0.1), dtype)
    wu, wdt = _weights(g, f, d, dtype, "cpu", n=2)
    thr = 0.05 if act == "fatrelu" else 0.0
    ref = K.sparse_ffn(x, wg, wu, wdt, activation=act, threshold=thr, backend="torch")
    x, wg, wu, wdt = (t.to(device) for t in (x, wg, wu, wdt))
    cfg = {"gather": dict(CPU_GATHER, **blocks) if device == "cpu" else blocks}
    for _ in range(2):
        for fn in (K.sparse_ffn, K.chunk_ffn):
            y = fn(x, wg, wu, wdt, activation=act, threshold=thr, backend="triton", config=cfg)
            assert y.shape == (tokens, d) and y.dtype == dtype
            if kind == "zero":
                assert (y == 0).all()
            else:
                assert _rel(y.cpu(), ref) < TOL[dtype] / 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kind", [(1, "rand"), (3, "rand"), (5, "zero"), (7, "full")])
def test_moe_blocks(device, dtype, tokens, kind):
    (d, f), cdown, crows = _setup(device)
    n_exp = 13
    d_e = 16
    g = _gen("moe", device, dtype, tokens, kind)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wr = _controlled_gate(g, x, n_exp, _mask(kind, (tokens, n_exp), g, 0.3), dtype)
    nw = (torch.rand(n_exp, generator=g) + 0.5).to(dtype)
    wu, wdt = _weights(g, n_exp * d_e, d, dtype, "cpu", n=2)
    x, wr, nw, wu, wdt = (t.to(device) for t in (x, wr, nw, wu, wdt))
    cfg = None if device == "cuda" else CPU_EXPERTS
    for _ in range(2):
        y = K.moe_blocks(x, wr, nw, wu, wdt, backend="triton", config=cfg)
        xf = x.double().cpu()
        a1 = torch.relu(xf @ wr.double().cpu().t())
        sc = a1 * torch.rsqrt(a1.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double().cpu()
        h = F.silu(xf @ wu.double().cpu().t()) * sc.repeat_interleave(d_e, 1)
        y_ref = h.to(dtype).double() @ wdt.double().cpu()
        if kind == "zero":
            assert (y == 0).all()
        else:
            assert _rel(y.cpu(), y_ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 9, 33])  # 33: above 16 tokens (the split router)
def test_moe_expert_kernels_read_only_active_experts(device, dtype, tokens):
    """Expert width not a multiple of the blocks; inactive experts' weights are NaN, so any read
    of them would show in the output; the result equals the module-rounded torch reference."""
    d = CPU_SHAPE[0] if device == "cpu" else GPU_SHAPE[0]
    n_exp, d_e = 6, 24
    g = _gen("moe-nan", device, dtype, tokens)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    mask = _mask("rand", (tokens, n_exp), g, 0.25)
    mask[:, 0] = False  # expert 0 is off for every token of the chunk
    mask[0, 1] = True
    wr = _controlled_gate(g, x, n_exp, mask, dtype)
    nw = (torch.rand(n_exp, generator=g) + 0.5).to(dtype)
    wu, wdt = _weights(g, n_exp * d_e, d, dtype, "cpu", n=2)
    off = ~mask.any(0)
    assert off[0]
    ref = K.moe_blocks(x, wr, nw, wu, wdt, backend="torch")
    rows_off = off.repeat_interleave(d_e)
    wu[rows_off] = float("nan")
    wdt[rows_off] = float("nan")
    x, wr, nw, wu, wdt = (t.to(device) for t in (x, wr, nw, wu, wdt))
    if device == "cpu":
        cfgs = [dict(CPU_EXPERTS, BF=16, RB=16), dict(CPU_EXPERTS, BF=16, RB=16, KS=3),
                dict(CPU_EXPERTS, BF=16, RB=16, KS=3, up_partials=True, down_prefetch=False)]
    else:  # KS: the d_model axis split over programs; up_partials: no split reduction in up
        cfgs = [None, dict(KS=4, BF=64), dict(KS=4, BF=64, up_partials=True),
                dict(up_partials=True, up_early_release=True, down_prefetch=False)]
    for cfg in cfgs:
        for xi in ([x[0]] if tokens == 1 else []) + [x]:
            y = K.moe_blocks(xi, wr, nw, wu, wdt, backend="triton", config=cfg)
            assert y.shape == xi.shape
            r = ref[0] if xi.dim() == 1 else ref
            assert _rel(y.cpu(), r) < TOL[dtype] / 4, cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_moe_router_logits_variants(device, dtype, tokens):
    """The router kernel's variants (plain loop, unrolled, d_model split over programs with a
    split reduction) equal x @ w_router^T in float64, twice in a row (the split's workspace is
    left zeroed); the tile does not divide d_model."""
    from workbench.kernels.moe_blocks.triton import router_logits

    d = CPU_SHAPE[0] if device == "cpu" else GPU_SHAPE[0]
    g = _gen("router", dtype, tokens)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wr = _weights(g, 13, d, dtype, "cpu")[0]
    ref = x.double() @ wr.double().t()
    x, wr = x.to(device), wr.to(device)
    bd = 32 if device == "cpu" else 128
    cfgs = [{}, {"router_unroll": True, "router_bd": bd}, {"router_split": 3, "router_bd": bd // 2},
            {"router_split": 4}]  # fmt: skip
    for cfg in cfgs:
        for _ in range(2):
            a0 = router_logits(x, wr, config=cfg)
            assert a0.shape == (tokens, 13) and a0.dtype == torch.float32
            assert _rel(a0.cpu(), ref) < 1e-5, cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rand", "zero", "full"])
def test_updown_one_launch_matches_reference(device, dtype, kind):
    """config={"updown": ...}: up (and gate) rows, product and down rows in one launch (T = 1),
    exact and predicted; equal to the torch reference, stable over repeated calls."""
    (d, f), _, _ = _setup(device)
    g = _gen("updown", device, dtype, kind)
    x = torch.randn(1, d, generator=g).to(dtype)
    wg = _controlled_gate(g, x, f, _mask(kind, (1, f), g, 0.15), dtype)
    wu, wdt = _weights(g, f, d, dtype, "cpu", n=2)
    w1, w2 = _weights(g, 16, d, dtype, "cpu")[0], _weights(g, f, 16, dtype, "cpu")[0]
    x, wg, wu, wdt, w1, w2 = (t.to(device) for t in (x, wg, wu, wdt, w1, w2))
    cfg = {"updown": dict(CHUNK=64, BK=4) if device == "cpu" else {}}
    ref = K.sparse_ffn(x, wg, wu, wdt, backend="torch")
    for _ in range(2):
        y = K.sparse_ffn(x, wg, wu, wdt, backend="triton", config=cfg)
        if kind == "zero":
            assert (y == 0).all()
        else:
            assert _rel(y.cpu(), ref.cpu()) < TOL[dtype] / 4
    y1 = K.sparse_ffn(x[0], wg, wu, wdt, backend="triton", activation="fatrelu", threshold=0.05, config=cfg)
    r1 = K.sparse_ffn(x[0], wg, wu, wdt, backend="torch", activation="fatrelu", threshold=0.05)
    assert y1.shape == (d,) and _rel(y1.cpu(), r1.cpu()) < TOL[dtype] / 4
    yp = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, backend="triton", config=cfg)
    rp = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, backend="torch")
    assert _rel(yp.cpu(), rp.cpu()) < TOL[dtype] / 4
    # the library's default blocks (predicted: two rows a pass, all three tiles loaded early); on
    # random masks only (the all-zero / all-active edge cases are covered by the blocks above)
    for c in () if kind != "rand" else (
        {"updown": {}},
        {"updown": {"early_gate": True, "BK": 4}},
        {"updown": {}, "fuse_pred2": False},
        {"updown": {}, "fuse_pred2": True},
    ):
        yd = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, backend="triton", config=c)
        assert _rel(yd.cpu(), rp.cpu()) < TOL[dtype] / 4
        ye = K.sparse_ffn(x, wg, wu, wdt, backend="triton", config=c)
        assert _rel(ye.cpu(), ref.cpu()) < TOL[dtype] / 4 or kind == "zero"


def test_errors_name_cause_and_fix(monkeypatch):
    a = torch.zeros(1, 40, dtype=torch.float16)
    with pytest.raises(KernelError, match="multiple of 16"):
        K.sparse_down(a, torch.zeros(40, 32, dtype=torch.float16), backend="triton")
    with pytest.raises(KernelError, match="float16 or bfloat16"):
        K.sparse_down(torch.zeros(1, 32), torch.zeros(32, 32), backend="triton")
    with pytest.raises(KernelError, match="dtype"):
        K.sparse_down(
            torch.zeros(1, 32, dtype=torch.float16),
            torch.zeros(32, 32, dtype=torch.bfloat16),
            backend="triton",
        )
    with pytest.raises(KernelError, match=r"\[d_ff, d_model\]"):
        K.sparse_down(
            torch.zeros(1, 32, dtype=torch.float16),
            torch.zeros(48, 32, dtype=torch.float16),
            backend="triton",
        )
    with pytest.raises(KernelError, match="tokens"):
        K.sparse_down(
            torch.zeros(65, 32, dtype=torch.float16),
            torch.zeros(32, 32, dtype=torch.float16),
            backend="triton",
        )
    with pytest.raises(KernelError, match="exact zeros"):
        K.sparse_ffn(
            torch.zeros(1, 32, dtype=torch.float16),
            *[torch.zeros(32, 32).half()] * 3,
            activation="silu",
        )
    with pytest.raises(KernelError, match="unknown backend"):
        K.sparse_down(a, a.t(), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(KernelError, match="not on a CUDA device"):
            K.sparse_down(
                torch.zeros(1, 32, dtype=torch.float16),
                torch.zeros(32, 32, dtype=torch.float16),
                backend="triton",
            )
        # automatic choice falls back to the reference on CPU tensors
        y = K.sparse_down(
            torch.ones(1, 32, dtype=torch.float16), torch.ones(32, 16, dtype=torch.float16)
        )
        assert (y == 32).all()


def test_layout_helpers():
    g = _gen("layout")
    wd = torch.randn(32, 64, generator=g)
    assert torch.equal(K.layout.down_rows(wd), wd.t())
    ups = [torch.randn(16, 32, generator=g) for _ in range(3)]
    downs = [torch.randn(32, 16, generator=g) for _ in range(3)]
    wu, wdt = K.layout.stack_experts(ups, downs)
    assert wu.shape == (48, 32) and torch.equal(wdt[16:32], downs[1].t())
    wgu = torch.randn(64, 32, generator=g)
    wg_, wu_ = K.layout.split_gate_up(wgu, 32)
    assert torch.equal(wg_, wgu[:32]) and torch.equal(wu_, wgu[32:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_graph_capture_and_large_shape(dtype):
    """Compiled kernels at a real shape, captured in a CUDA graph and replayed on new inputs."""
    d, f = 4096, 11008
    g = _gen("graph", dtype)
    x_static = torch.zeros(1, d, dtype=dtype, device="cuda")
    xs = [torch.randn(1, d, generator=g).to(dtype).cuda() for _ in range(3)]
    wg, wu, wdt = _weights(g, f, d, dtype, "cuda", n=3)
    for x in xs[:1]:  # warm-up: compiles and allocates the workspaces
        x_static.copy_(x)
        K.sparse_ffn(x_static, wg, wu, wdt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = K.sparse_ffn(x_static, wg, wu, wdt)
    for x in xs:
        x_static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        xf = x.double()
        a = (torch.relu(xf @ wg.double().t()) * (xf @ wu.double().t())).to(dtype).double()
        assert _rel(y_static, a @ wdt.double()) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [8, 32])
def test_gpu_gather_chunk_graph_capture(tokens):
    """The chunk path (union list + gathered GEMMs) at a real shape inside a CUDA graph: replays on
    new inputs with different unions must each match, so the list length is reset every call."""
    d, f, dtype = 4096, 11008, torch.float16
    g = _gen("gather-graph", tokens)
    x_static = torch.zeros(tokens, d, dtype=dtype, device="cuda")
    xs = [torch.randn(tokens, d, generator=g).to(dtype) for _ in range(3)]
    wu, wdt = _weights(g, f, d, dtype, "cuda", n=2)
    wg = _controlled_gate(g, xs[0], f, _union_mask(g, tokens, f, 0.7), dtype).cuda()
    x_static.copy_(xs[0])
    K.chunk_ffn(x_static, wg, wu, wdt)  # warm-up: compiles, allocates the workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = K.chunk_ffn(x_static, wg, wu, wdt)
    for x in xs + xs[:1]:  # xs[0]: union 30 %; the others: about half of the rows each token
        x_static.copy_(x.cuda())
        graph.replay()
        torch.cuda.synchronize()
        ref = K.sparse_ffn(x.cuda(), wg, wu, wdt, backend="torch")
        assert _rel(y_static, ref.double()) < 2e-3


@pytest.mark.gpu
def test_gpu_repeated_calls_are_stable():
    """Same inputs, many calls: a race in the split-K tickets would move the result."""
    d, f = 2048, 8192
    g = _gen("stable")
    a = (torch.randn(3, f, generator=g) * (torch.rand(3, f, generator=g) < 0.1)).half().cuda()
    (w,) = _weights(g, f, d, torch.float16, "cuda")
    ref = a.double() @ w.double()
    outs = [K.sparse_down(a, w) for _ in range(20)]
    for y in outs:
        assert _rel(y, ref) < 4e-3
    a1 = a[:1].contiguous()
    outs = [K.sparse_down(a1, w) for _ in itertools.repeat(None, 20)]
    assert all(_rel(y, a1.double() @ w.double()) < 4e-3 for y in outs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3])
def test_masked_tile_variant(device, dtype, tokens):
    """compact=False: no row ranking, inactive rows' loads predicated off (same results)."""
    (d, f), cdown, crows = _setup(device)
    cdown = dict(cdown or {}, compact=False)
    crows = dict(crows or {}, compact=False)
    g = _gen("masked", device, dtype, tokens)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wg = _controlled_gate(g, x, f, _mask("rand", (tokens, f), g, 0.2), dtype).to(device)
    wu, wdt = _weights(g, f, d, dtype, device, n=2)
    x = x.to(device)
    y = K.sparse_ffn(x, wg, wu, wdt, backend="triton", config={"rows": crows, "down": cdown})
    xf = x.double().cpu()
    a_ref = torch.relu(xf @ wg.double().cpu().t()) * (xf @ wu.double().cpu().t())
    assert _rel(y.cpu(), a_ref.to(dtype).double() @ wdt.double().cpu()) < TOL[dtype]
    n_exp, d_e = 13, 16
    wr = _controlled_gate(g, x.cpu(), n_exp, _mask("rand", (tokens, n_exp), g, 0.3), dtype)
    nw = (torch.rand(n_exp, generator=g) + 0.5).to(dtype)
    wu2, wdt2 = _weights(g, n_exp * d_e, d, dtype, "cpu", n=2)
    wr, nw, wu2, wdt2 = (t.to(device) for t in (wr, nw, wu2, wdt2))
    y = K.moe_blocks(
        x, wr, nw, wu2, wdt2, backend="triton", config={"impl": "rows", "rows": crows, "down": cdown}
    )
    r = K.moe_blocks(x, wr, nw, wu2, wdt2, backend="torch")
    assert _rel(y.cpu(), r.cpu()) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("tokens", [1, 5])
def test_single_slice_row_kernel(device, compact, tokens):
    """DS >= d_model: one program per row block writes `a` directly (no atomics, no ticket)."""
    (d, f), _, _ = _setup(device)
    dtype = torch.float16
    crows = dict(
        BR=32,
        BK=16,
        BD=16 if device == "cpu" else 128,
        DS=64 if device == "cpu" else d,
        compact=compact,
    )
    g = _gen("single", device, compact, tokens)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wg = _controlled_gate(g, x, f, _mask("rand", (tokens, f), g, 0.2), dtype).to(device)
    wu, wdt = _weights(g, f, d, dtype, device, n=2)
    x = x.to(device)
    for _ in range(2):
        gate = F.linear(x, wg)
        a = K.gated_up(x, gate, wu, backend="triton", config=crows)
        gf = gate.double().cpu()
        a_ref = torch.relu(gf) * (x.double().cpu() @ wu.double().cpu().t())
        assert _rel(a.cpu(), a_ref) < TOL[dtype]
    logits = torch.randn(tokens, f, generator=g).to(dtype).to(device)
    a = K.gate_up_predicted(x, logits, wg, wu, backend="triton", config=crows)
    r = K.gate_up_predicted(x, logits, wg, wu, backend="torch")
    assert _rel(a.cpu(), r.cpu()) < TOL[dtype]
    n_exp, d_e = 13, 16
    wr = _controlled_gate(g, x.cpu(), n_exp, _mask("rand", (tokens, n_exp), g, 0.3), dtype)
    nw = (torch.rand(n_exp, generator=g) + 0.5).to(dtype)
    wu2, wdt2 = _weights(g, n_exp * d_e, d, dtype, "cpu", n=2)
    wr, nw, wu2, wdt2 = (t.to(device) for t in (wr, nw, wu2, wdt2))
    y = K.moe_blocks(x, wr, nw, wu2, wdt2, backend="triton", config={"impl": "rows", "rows": crows})
    r = K.moe_blocks(x, wr, nw, wu2, wdt2, backend="torch")
    assert _rel(y.cpu(), r.cpu()) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kind", [(1, "rand"), (3, "rand"), (1, "zero"), (5, "full")])
def test_fused_gate_up(device, dtype, tokens, kind):
    """Gate GEMV inside the row kernel (config fused_gate=True), whole FFN and chunk FFN."""
    (d, f), cdown, _ = _setup(device)
    g = _gen("fused", device, dtype, tokens, kind)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    wg = _controlled_gate(g, x, f, _mask(kind, (tokens, f), g, 0.2), dtype).to(device)
    wu, wdt = _weights(g, f, d, dtype, device, n=2)
    x = x.to(device)
    rows = {"BR": 16, "BD": 16} if device == "cpu" else {}
    y = K.sparse_ffn(
        x, wg, wu, wdt, backend="triton", config={"fused_gate": True, "rows": rows, "down": cdown}
    )
    xf = x.double().cpu()
    a_ref = torch.relu(xf @ wg.double().cpu().t()) * (xf @ wu.double().cpu().t())
    y_ref = a_ref.to(dtype).double() @ wdt.double().cpu()
    if kind == "zero":
        assert (y == 0).all()
    else:
        assert _rel(y.cpu(), y_ref) < TOL[dtype]
    if tokens > 1:
        y = K.chunk_ffn(
            x,
            wg,
            wu,
            wdt,
            backend="triton",
            config={"fused_gate": True, "rows": rows, "down": cdown},
        )
        assert _rel(y.cpu(), y_ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_of_wrong_length_is_a_clear_error(backend):
    """A gate / predictor-logit tensor (the mask source) not [T, d_ff]: KernelError on both paths."""
    x = torch.zeros(2, 32, dtype=torch.bfloat16)
    w = torch.zeros(64, 32, dtype=torch.bfloat16)
    bad = torch.zeros(2, 48, dtype=torch.bfloat16)
    with pytest.raises(KernelError, match=r"gate must be \[2, 64\]"):
        K.gated_up(x, bad, w, backend=backend)
    with pytest.raises(KernelError, match=r"logits must be \[2, 64\]"):
        K.gate_up_predicted(x, bad, w, w, backend=backend)


def test_reference_rounds_like_the_dense_ffn():
    """The reference's sparse FFN equals the dense bf16 FFN (act(g) * u in the model dtype, then
    the down projection) bit for bit on the CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).bfloat16()
    wg, wu, wd = (torch.randn(128, 64, generator=g).bfloat16() / 8 for _ in range(3))
    dense = F.linear(torch.relu(F.linear(x, wg)) * F.linear(x, wu), wd.t())
    sparse = K.sparse_ffn(x, wg, wu, wd, backend="torch")
    assert torch.equal(sparse, dense)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["exact", "predicted", "chunk", "down", "moe"])
def test_gpu_pdl_chained_layers_in_a_graph(path):
    """Programmatic dependent launch: four layers chained (each layer's output is the next one's
    input, all sharing their workspaces) inside one CUDA graph, PDL on, equal the same chain run
    eagerly with PDL off (predicted: logits far from 0, so that masks cannot flip)."""
    d, f, dtype = 1024, 2816, torch.float16
    g = _gen("pdl", path)
    tokens = 8 if path in ("chunk", "moe") else 1
    n_exp = f // 256
    routers = [(_weights(g, n_exp, d, dtype, "cuda")[0],
                (torch.rand(n_exp, generator=g) + 0.5).to(dtype).cuda()) for _ in range(4)]  # fmt: skip
    layers = [_weights(g, f, d, dtype, "cuda", n=3) for _ in range(4)]
    # predictor logits kept far from 0 (a +-4 bias over a small second layer), so that the last
    # bits of the fp32 split sums, whose order varies between runs, cannot flip a predicted mask
    preds = [(_weights(g, 256, d, dtype, "cuda")[0], _weights(g, f, 256, dtype, "cuda", scale=0.01)[0],
              ((torch.rand(f, generator=g) < 0.3).to(dtype) * 8 - 4).cuda()) for _ in range(4)]  # fmt: skip

    def chain(x, pdl):
        for (wg, wu, wdt), (w1, w2, b2), (wr, nw) in zip(layers, preds, routers):
            if path == "moe":
                x = K.moe_blocks(x, wr, nw, wu, wdt, config={"pdl": pdl})
            elif path == "exact":
                x = K.sparse_ffn(x, wg, wu, wdt, config={"pdl": pdl, "gemv": {"pdl": pdl},
                                                          "updown": {"pdl": pdl}})  # fmt: skip
            elif path == "predicted":
                x = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred2=b2, config={
                    "gemv": {"pdl": pdl}, "updown": {"pdl": pdl}})  # fmt: skip
            elif path == "chunk":
                x = K.chunk_ffn(x, wg, wu, wdt, config={"gather": {"pdl": pdl}})
            else:
                x = K.sparse_down(torch.relu(F.linear(x, wg)), wdt, config={"pdl": pdl})
        return x

    x0 = torch.randn(tokens, d, generator=g).to(dtype).cuda()
    ref = chain(x0, False)
    x_static = x0.clone()
    chain(x_static, True)  # warm-up: compile, workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = chain(x_static, True)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(y_static).all()
        assert _rel(y_static, ref.double()) < 1e-2


def test_pdl_never_on_cpu_interpreter_or_when_turned_off(monkeypatch):
    """use_pdl: off for CPU tensors, under the interpreter, with WB_PDL=0 or config pdl=False."""
    from workbench.kernels._common import use_pdl

    assert not use_pdl(torch.device("cpu"), True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_pdl(torch.device("cuda"), True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("WB_PDL", "0")
    assert not use_pdl(torch.device("cuda"))
    assert not use_pdl(torch.device("cuda"), False)
