"""A faster pure-PyTorch SSD chunk scan for the transformers Mamba-2 class (CPU training).

transformers' reference ``mamba2_chunk_scan`` (used when the mamba_ssm kernels are absent, e.g.
on CPU) repeats B and C over the heads and contracts them per head through einsums that copy
large tensors. With ``n_groups == 1`` (the zoo's mamba2) B and C are shared by all heads, so the
C.B^T scores can be computed once per chunk and every contraction written as a batched matmul.
:func:`chunk_scan` computes the same quantity (same discretisation, same chunked SSD algorithm;
logits agree with the reference to float32 round-off) and falls back to the reference for
other group counts. :func:`fast_scan` swaps it in for a ``with`` block; the model stays the
native ``Mamba2ForCausalLM`` and checkpoints are unaffected.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """exp(sum_{k=j+1..i} a_k) for i >= j, 0 above the diagonal; a: (..., L) -> (..., L, L)."""
    cs = torch.cumsum(a, dim=-1)
    n = a.shape[-1]
    diff = cs[..., :, None] - cs[..., None, :]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device))
    return torch.exp(diff.masked_fill(~mask, -torch.inf))


def chunk_scan(
    hidden_states,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    dt_bias=None,
    initial_states=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    **kwargs,
):
    """Drop-in for transformers' ``mamba2_chunk_scan`` (shapes: x (b, T, h, p), dt (b, T, h),
    A (h,), B and C (b, T, g, n); returns y (b, T, h, p) float32 [, final state (b, h, p, n)])."""
    if B.shape[2] != 1:
        from transformers.models.mamba2 import modeling_mamba2 as mm

        ref = _reference if _reference is not None else mm.mamba2_chunk_scan
        return ref(
            hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
            initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=return_final_states, **kwargs,
        )
    b, T, h, p = hidden_states.shape
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
    x = hidden_states.float()
    Bm, Cm = B.float()[:, :, 0], C.float()[:, :, 0]  # (b, T, n)
    n = Bm.shape[-1]
    pad = (-T) % chunk_size
    xd = x * dt[..., None]
    adt = A.float() * dt  # (b, T, h)
    if pad:
        xd = F.pad(xd, (0, 0, 0, 0, 0, pad))
        adt = F.pad(adt, (0, 0, 0, pad))
        Bm = F.pad(Bm, (0, 0, 0, pad))
        Cm = F.pad(Cm, (0, 0, 0, pad))
    c = (T + pad) // chunk_size
    L = chunk_size
    xd = xd.view(b, c, L, h, p).permute(0, 3, 1, 2, 4)  # (b, h, c, l, p)
    adt = adt.view(b, c, L, h).permute(0, 3, 1, 2)  # (b, h, c, l)
    Bm = Bm.view(b, c, L, n)
    Cm = Cm.view(b, c, L, n)
    acum = torch.cumsum(adt, dim=-1)
    # 1. within-chunk (diagonal blocks)
    G = Cm @ Bm.transpose(-1, -2)  # (b, c, l, s), shared by the heads
    y = (G[:, None] * _segsum_exp(adt)) @ xd  # (b, h, c, l, p)
    # 2. each chunk's own final state
    decay = torch.exp(acum[..., -1:] - acum)  # (b, h, c, l)
    states = (xd * decay[..., None]).transpose(-1, -2) @ Bm[:, None]  # (b, h, c, p, n)
    # 3. inter-chunk recurrence
    if initial_states is None:
        init = states.new_zeros(b, h, 1, p, n)
    else:
        init = initial_states.to(states.dtype)[:, :, None]
    states = torch.cat([init, states], dim=2)  # (b, h, c+1, p, n)
    dchunk = _segsum_exp(F.pad(acum[..., -1], (1, 0)))  # (b, h, c+1, c+1)
    states = (dchunk @ states.flatten(-2)).view(b, h, c + 1, p, n)
    start, final = states[:, :, :-1], states[:, :, -1]
    # 4. contribution of each chunk's start state
    y = y + (Cm[:, None] @ start.transpose(-1, -2)) * torch.exp(acum)[..., None]
    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * L, h, p)[:, :T]
    if D is not None:
        y = y + D.float()[:, None] * x
    if return_final_states:
        return y, final
    return y


_reference = None


@contextlib.contextmanager
def fast_scan():
    """Use :func:`chunk_scan` in transformers' Mamba-2 mixer inside the block."""
    global _reference
    from transformers.models.mamba2 import modeling_mamba2 as mm

    prev = mm.mamba2_chunk_scan
    _reference = prev
    mm.mamba2_chunk_scan = chunk_scan
    try:
        yield
    finally:
        mm.mamba2_chunk_scan = prev
