"""Dense one-token GEMV (kernels/dense_gemv): Triton vs a float64 reference, interpreter on CPU,
compiled on CUDA (``-m gpu``); and the sparse FFN paths that now take their dense parts from it."""

from __future__ import annotations

import zlib

import pytest
import torch
import workbench.kernels as K

from workbench.errors import KernelError

DTYPES = [torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# one rounding of an fp32 sum: about half an ulp of the output dtype, relative RMS
TOL = {torch.float16: 1e-3, torch.bfloat16: 6e-3}


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _rel(out, ref) -> float:
    assert torch.isfinite(out).all()
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "k,n,cfg",
    [
        (37, 80, None),  # odd rows (a half-filled last program), a row shorter than the tile
        (208, 48, None),
        (9, 4112, None),  # a row longer than the 4096-wide tile: two tiles, the second masked
        (33, 96, dict(R=4, BN=32, num_warps=1)),  # several tiles per row, partial row block
        (37, 80, dict(prefetch=True)),  # weight tile read before the PDL wait (one tile a row)
        (9, 4112, dict(prefetch=True)),  # two tiles a row: prefetch does not apply, loop stays
    ],
)
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True), (True, False)])
def test_gemv_matches_float64(device, dtype, k, n, cfg, bias, relu):
    g = _gen("gemv", device, dtype, k, n, bias, relu)
    x = torch.randn(1, n, generator=g).to(dtype)
    w = (torch.randn(k, n, generator=g) * n**-0.5).to(dtype)
    b = torch.randn(k, generator=g).to(dtype) if bias else None
    ref = x.double() @ w.double().t() + (b.double() if bias else 0.0)
    if relu:
        ref = ref.clamp_min(0.0)
    dev = [t.to(device) if t is not None else None for t in (x, w, b)]
    y = K.gemv(*dev, relu=relu, backend="triton", config=cfg)
    assert y.shape == (1, k) and y.dtype == dtype
    assert _rel(y.cpu(), ref) < TOL[dtype]
    if relu:
        assert (y >= 0).all()
    yr = K.gemv(*dev, relu=relu, backend="torch")
    assert _rel(y.cpu(), yr.cpu().double()) < 2 * TOL[dtype]


def test_gemv_more_tokens_and_errors():
    g = _gen("gemv-more")
    x = torch.randn(3, 32, generator=g).half()
    w = torch.randn(16, 32, generator=g).half()
    y = K.gemv(x, w, backend="triton")  # T > 1: cuBLAS/torch path, same function
    assert y.shape == (3, 16) and _rel(y, x.double() @ w.double().t()) < 1e-3
    with pytest.raises(KernelError, match="do not chain"):
        K.gemv(x[:1], w[:, :16], backend="triton")
    with pytest.raises(KernelError, match="float16 or bfloat16"):
        K.gemv(x[:1].float(), w.float(), backend="triton")
    with pytest.raises(KernelError, match="dtype"):
        K.gemv(x[:1], w.bfloat16(), backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_ffn_gate_gemv_and_cublas_agree(device):
    """The one-token FFN paths with the Triton gate/predictor GEMV and with cuBLAS (config
    {"gemv": False}), the predictor's second layer fused into the updown kernel (default) or not,
    with and without its bias, compute the same function."""
    g = _gen("ffn-gemv", device)
    d, f, w_ = 48, 208, 16
    dt = torch.float16
    x = torch.randn(1, d, generator=g).to(dt)
    wg, wu, wdt = ((torch.randn(f, d, generator=g) * d**-0.5).to(dt) for _ in range(3))
    w1 = (torch.randn(w_, d, generator=g) * d**-0.5).to(dt)
    w2 = (torch.randn(f, w_, generator=g) * w_**-0.5).to(dt)
    b1 = torch.randn(w_, generator=g).to(dt)
    x, wg, wu, wdt, w1, w2, b1 = (t.to(device) for t in (x, wg, wu, wdt, w1, w2, b1))
    cfg = {"updown": dict(CHUNK=64, BK=4)} if device == "cpu" else {}
    ref = K.sparse_ffn(x, wg, wu, wdt, backend="torch")
    a = K.sparse_ffn(x, wg, wu, wdt, backend="triton", config=cfg)
    b = K.sparse_ffn(x, wg, wu, wdt, backend="triton", config={**cfg, "gemv": False})
    assert _rel(a.cpu(), ref.cpu()) < 4e-3 and _rel(b.cpu(), ref.cpu()) < 4e-3
    rp = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred1=b1, backend="torch")
    b2 = (torch.randn(f, generator=g) * 0.1).to(dt).to(device)
    rp2 = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred1=b1, b_pred2=b2, backend="torch")
    for c in (cfg, {**cfg, "fuse_pred2": True}, {**cfg, "fuse_pred2": False},
              {**cfg, "gemv": False, "fuse_pred2": False}):  # fmt: skip
        ap = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred1=b1, backend="triton", config=c)
        assert _rel(ap.cpu(), rp.cpu()) < 4e-3
        ap2 = K.sparse_ffn_predicted(
            x, wg, wu, wdt, w1, w2, b_pred1=b1, b_pred2=b2, backend="triton", config=c
        )
        assert _rel(ap2.cpu(), rp2.cpu()) < 4e-3
