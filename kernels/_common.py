"""Shared plumbing of the kernels: input checks, backend choice, workspaces.

Everything here is host-side Python that runs before a launch; none of it reads device values,
so every launcher stays graph-capturable.
"""

from __future__ import annotations

import os

import torch

from workbench.errors import KernelError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_TOKENS = 64  # the Triton kernels pad the token axis to a power of two up to this


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """'triton' or 'torch' for these tensors.

    Default: Triton when every tensor is on CUDA (or the Triton interpreter is on) and Triton
    imports; the torch reference otherwise. An explicit backend='triton' that cannot run raises.
    """
    if backend not in (None, "triton", "torch", "reference"):
        raise KernelError(f"unknown backend {backend!r}: use None (automatic), 'triton' or 'torch'")
    if backend in ("torch", "reference"):
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = triton_available() and (on_cuda or interpreting())
    if backend == "triton":
        if not triton_available():
            raise KernelError(
                "backend='triton' was requested but triton does not import: "
                "install the [gpu] extra (pip install 'sparsity-workbench[gpu]') or pass backend=None"
            )
        if not runnable:
            raise KernelError(
                "backend='triton' was requested for tensors that are not on a CUDA device: move them "
                "with .cuda(), set TRITON_INTERPRET=1 to run the kernel on the CPU (slow), or pass "
                "backend=None to use the torch reference"
            )
        return "triton"
    return "triton" if runnable else "torch"


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelError(
            f"{name} has dtype {t.dtype}; the sparse kernels take float16 or bfloat16 "
            f"(cast with .half() or .bfloat16())"
        )
    if dtype is not None and t.dtype != dtype:
        raise KernelError(
            f"{name} has dtype {t.dtype} but the activations are {dtype}: cast the weights once "
            f"to the model dtype"
        )


def check_mult16(name: str, n: int) -> None:
    if n % 16 != 0:
        raise KernelError(
            f"{name} = {n} is not a multiple of 16; the sparse kernels need d_model and d_ff "
            f"divisible by 16 (pad the weights with zero rows/columns, or use the dense layer)"
        )


def check_2d(name: str, t: torch.Tensor, shape: tuple[int | None, int | None]) -> None:
    if t.dim() != 2:
        raise KernelError(f"{name} must be 2-D {shape}, got shape {tuple(t.shape)}")
    for want, got in zip(shape, t.shape):
        if want is not None and want != got:
            raise KernelError(
                f"{name} has shape {tuple(t.shape)} but {shape} was expected; weights of the "
                f"down projection must be stored [d_ff, d_model] (see workbench.kernels.layout)"
            )


def check_same_device(**tensors: torch.Tensor) -> None:
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise KernelError(f"tensors on different devices {devs}: move them to one device")


def as_tokens(x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, bool]:
    """[d] or [T, d] -> ([T, d] with unit stride on the last axis, was_1d)."""
    if x.dim() == 1:
        return x.unsqueeze(0).contiguous(), True
    if x.dim() != 2:
        raise KernelError(f"{name} must be [tokens, features] or [features], got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise KernelError(f"{name} has no tokens")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, False


def check_tokens(t: int) -> None:
    if t > MAX_TOKENS:
        raise KernelError(
            f"{t} tokens in one call; the sparse decode kernels take 1 to {MAX_TOKENS} tokens "
            f"(split the chunk, or use the dense layer for prefill)"
        )


def token_pad(t: int) -> int:
    """Token axis padded for the kernels: 1 stays a vector, otherwise tl.dot needs >= 16."""
    if t == 1:
        return 1
    p = 16
    while p < t:
        p *= 2
    return p


def dense_count(chunk: int, dense_fraction: float) -> int:
    """Active rows per block above which a program reads its whole block (dense fallback)."""
    if not 0.0 < dense_fraction <= 1.0:
        raise KernelError(f"dense_fraction={dense_fraction} must lie in (0, 1]")
    return int(chunk * dense_fraction)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def workspace(key: tuple, device: torch.device, specs: list[tuple[int, torch.dtype]]):
    """Zero-filled scratch buffers kept per (kernel, shape, device).

    The kernels leave them zeroed when they finish (the last program of each block resets what it
    used), so one allocation serves every later call and every graph replay. Calls that share a
    workspace must run one after the other on one stream (as the layers of a model do).
    """
    k = (key, str(device))
    ws = _WORKSPACES.get(k)
    if ws is None:
        if (
            torch.cuda.is_available()
            and device.type == "cuda"
            and torch.cuda.is_current_stream_capturing()
        ):
            raise KernelError(
                "the kernel's workspace would be allocated during CUDA graph capture: run the "
                "layer once before capturing (warm-up) so its buffers exist"
            )
        ws = tuple(torch.zeros(n, dtype=dt, device=device) for n, dt in specs)
        _WORKSPACES[k] = ws
    return ws


ACTIVATIONS = ("relu", "fatrelu")


def check_activation(activation: str, threshold: float) -> float:
    """Threshold of the gate's activation: relu -> 0, fatrelu -> threshold (>= 0)."""
    if activation not in ACTIVATIONS:
        raise KernelError(
            f"activation {activation!r} has no exact zeros to skip: the sparse FFN kernels take "
            f"{ACTIVATIONS} (for SiLU/GELU models use a predictor mask, sparse_ffn_predicted, or "
            f"threshold the activations first and call sparse_down)"
        )
    if activation == "relu":
        return 0.0
    if threshold < 0:
        raise KernelError(f"fatrelu threshold must be >= 0, got {threshold}")
    return float(threshold)


def check_bias(name: str, bias: torch.Tensor | None, n: int, like: torch.Tensor, what: str) -> None:
    """A bias of `n` values in `like`'s dtype and on its device, or None."""
    from workbench.errors import KernelError

    if bias is None:
        return
    if tuple(bias.shape) != (n,):
        raise KernelError(f"{name} has shape {tuple(bias.shape)}; {what} is [{n}]")
    if bias.dtype != like.dtype or bias.device != like.device:
        raise KernelError(
            f"{name} is {bias.dtype} on {bias.device}; give it the activations' dtype ({like.dtype}) "
            f"on their device ({like.device})"
        )


def check_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor | None = None,
    w_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """Validate an FFN call; returns x as [T, d_model] and whether it was 1-D."""
    x2, was_1d = as_tokens(x, "x")
    t, d = x2.shape
    check_dtype("x", x2)
    check_mult16("d_model", d)
    check_tokens(t)
    check_2d("w_up", w_up, (None, d))
    check_dtype("w_up", w_up, x2.dtype)
    r = w_up.shape[0]
    check_mult16("d_ff", r)
    tensors = {"x": x2, "w_up": w_up}
    if w_gate is not None:
        check_2d("w_gate", w_gate, (r, d))
        check_dtype("w_gate", w_gate, x2.dtype)
        tensors["w_gate"] = w_gate
    if w_down_t is not None:
        check_2d("w_down_t", w_down_t, (r, d))
        check_dtype("w_down_t", w_down_t, x2.dtype)
        tensors["w_down_t"] = w_down_t
    check_same_device(**tensors)
    for name, w in tensors.items():
        if name != "x" and w.stride(1) != 1:
            raise KernelError(
                f"{name} must have unit stride along d_model: pass {name}.contiguous()"
            )
    return x2, was_1d


def _pdl_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installed triton
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_PDL_CAPABLE: dict[str, bool] = {}


def use_pdl(device: torch.device, flag=None) -> bool:
    """Programmatic dependent launch (Hopper and newer): the kernel is launched with
    ``launch_pdl=True`` and waits (``gdc_wait``) before its first memory access, so that its
    launch and block scheduling overlap the previous kernel's tail. ``flag`` (a config's "pdl")
    decides; None reads WB_PDL (default on; WB_PDL=0 turns it off). Never under the interpreter,
    below sm_90 or with a Triton that lacks it. Measured on the H100 (KERNEL_NOTES v10): 0.5-0.9 us
    less per launch."""
    want = os.environ.get("WB_PDL", "1") not in ("", "0") if flag is None else bool(flag)
    if not want or device.type != "cuda" or interpreting() or torch.version.hip is not None:
        return False  # PDL is an NVIDIA (sm_90+) launch attribute; ROCm devices are "cuda" too
    key = str(device)
    if key not in _PDL_CAPABLE:
        _PDL_CAPABLE[key] = _pdl_supported() and torch.cuda.get_device_capability(device) >= (9, 0)
    return _PDL_CAPABLE[key]


def dot_f32(dtype: torch.dtype) -> bool:
    """Upcast tl.dot operands to fp32: only under the interpreter for bf16, whose bf16 dot is
    wrong in Triton 3.9's interpreter (compiled kernels keep the bf16 tensor-core dot)."""
    return interpreting() and dtype == torch.bfloat16
