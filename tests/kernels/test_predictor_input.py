"""`x_pred`: the predicted FFN kernels read the predictor's input apart from the FFN input (a
ProSparse-recipe predictor reads the residual stream entering the FFN block, the FFN the normed
one), on the Triton kernels (interpreter on CPU) and the torch reference, against float64."""

from __future__ import annotations

import pytest
import torch
import workbench.kernels as K

from workbench.errors import KernelError

D, F_ = 48, 208  # multiples of 16, neither a power of two
DOWN = {"rows": dict(BR=32, BK=16, BD=16, DS=32), "down": dict(CHUNK=64, BK=16, BN=32)}
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _case(tokens, dtype, device, seed):
    """x, x_pred with independent signs; a predictor whose logit j is relu(x_pred[j % D]) - 0.5
    (so +-0.5 on x_pred = +-1: far from any rounding tie), and the masks on x_pred and on x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=g)
    xp = torch.randint(0, 2, (tokens, D), generator=g).float() * 2 - 1
    w1 = torch.eye(D)
    w2 = torch.zeros(F_, D)
    w2[torch.arange(F_), torch.arange(F_) % D] = 1.0
    b2 = torch.full((F_,), -0.5)
    wg, wu, wdt = (torch.randn(F_, D, generator=g) * D**-0.5 for _ in range(3))
    on_p = (torch.relu(xp) @ w2.t() + b2) > 0
    on_x = (torch.relu(x) @ w2.t() + b2) > 0
    t = [v.to(dtype).to(device) for v in (x, xp, w1, w2, b2, wg, wu, wdt)]
    return t, on_p, on_x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_gated_predicted_ffn_reads_x_pred(device, dtype, tokens):
    (x, xp, w1, w2, b2, wg, wu, wdt), on_p, on_x = _case(tokens, dtype, device, seed=tokens)
    assert (on_p != on_x).any()
    xd = x.double().cpu()
    a = torch.relu(xd @ wg.double().cpu().t()) * (xd @ wu.double().cpu().t()) * on_p
    y_ref = a @ wdt.double().cpu()
    for backend, cfg in (("torch", None), ("triton", DOWN if device == "cpu" else None)):
        y = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred2=b2, backend=backend, config=cfg, x_pred=xp)
        assert (y.cpu().double() - y_ref).norm() / y_ref.norm() < TOL[dtype]
    same = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred2=b2, backend="torch", x_pred=x)
    assert torch.equal(same, K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred2=b2, backend="torch"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_plain_predicted_ffn_reads_x_pred(device, dtype, tokens):
    (x, xp, w1, w2, b2, _, wu, wdt), on_p, _ = _case(tokens, dtype, device, seed=10 + tokens)
    u = x.double().cpu() @ wu.double().cpu().t()
    y_ref = torch.where((u > 0) & on_p, u, 0.0) @ wdt.double().cpu()
    for backend, cfg in (("torch", None), ("triton", None)):
        y = K.plain_ffn_predicted(x, wu, wdt, w1, w2, b_pred2=b2, backend=backend, config=cfg, x_pred=xp)
        assert (y.cpu().double() - y_ref).norm() / y_ref.norm() < TOL[dtype]


def test_x_pred_of_other_tokens_is_refused():
    (x, xp, w1, w2, b2, wg, wu, wdt), _, _ = _case(3, torch.bfloat16, "cpu", seed=0)
    with pytest.raises(KernelError, match="x_pred .* does not match the FFN input"):
        K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, b_pred2=b2, backend="torch", x_pred=xp[:2])
