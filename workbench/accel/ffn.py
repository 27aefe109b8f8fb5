"""SparseFFN / SparseDown / SparseMoE: FFN layers computed by the sparse kernels, swapped in by
accelerate().

SparseFFN replaces a gated ReLU/FATReLU FFN (Llama style); SparseDown replaces the down projection
of a plain (non-gated) ReLU FFN (OPT, GPT-2 or BERT style, biases allowed), whose input, the
activation, is already sparse: `kernels.sparse_down` reads only the rows of active neurons;
SparseMoE replaces a ReLU-routed MoE block layer (BlockFFN, workbench.models.blockffn) and runs
`kernels.moe_blocks`, which reads only the experts the router turned on for the call's tokens.

It holds no weights of its own: gate and up are the original modules' weights ([d_ff, d_model],
rows = neurons, already the kernels' layout); the down projection's weight is re-laid out once,
in place, so that its storage is [d_ff, d_model] (W_down^T contiguous) while the original
nn.Linear keeps a transposed *view* of it: no second copy stays on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench import kernels
from workbench.adapters import GATED, FFNSite
from workbench.errors import WorkbenchError

MODES = ("exact", "predictor", "chunk")


class _DownRelayout:
    """Down weight stored [d_ff, d_model] in place while swapped in (no lasting second copy)."""

    site: FFNSite

    @property
    def w_down_t(self) -> torch.Tensor:
        return self.site.down.weight.t()  # contiguous after relayout()

    def relayout(self) -> None:
        """Store W_down as [d_ff, d_model] in place (one layer at a time: no lasting copy)."""
        w = self.site.down.weight
        if not w.t().is_contiguous():
            w.data = w.data.t().contiguous().t()

    def restore_layout(self) -> None:
        w = self.site.down.weight
        if not w.is_contiguous():
            w.data = w.data.contiguous()


class SparseDown(_DownRelayout, nn.Module):
    """Drop-in replacement of the down projection of a plain ReLU FFN (down(act(up(x)))); see
    `accelerate`.

    The activation `a` it receives has exact zeros, so the input-sparse kernel
    (`kernels.sparse_down`, P1) reads only the down rows of active neurons; the up projection and
    the activation stay the model's own (dense). Calls of up to `decode_tokens` tokens (exact
    mode) or 64 (chunk mode: the union of the chunk's active neurons is read once, with a dense
    fallback past `dense_fraction`) take the kernel, longer ones the original module. A bias is
    added by the kernel in fp32 before its one rounding (as cuBLAS's epilogue does). Works for
    nn.Linear (weight re-laid out in place, as in SparseFFN) and transformers' Conv1D (GPT-2: its
    weight is [d_ff, d_model] already).
    """

    def __init__(self, site: FFNSite, original: nn.Module, mode: str, backend: str | None,
                 dense_fraction: float = 0.6, decode_tokens: int = 8):
        super().__init__()
        if mode not in ("exact", "chunk"):
            raise WorkbenchError(
                f"{site.name}: mode {mode!r} on a plain (non-gated) FFN: the predictor kernels skip gate and up "
                "rows of gated FFNs only; use mode='exact' or 'chunk', which skip the down rows of inactive "
                "neurons exactly (the up projection stays dense)")
        if site.activation not in ("relu", "fatrelu"):
            raise WorkbenchError(
                f"{site.name}: activation {site.activation!r} has no exact zeros for the kernels to skip; "
                "accelerate needs ReLU or FATReLU FFNs (e.g. OPT, or a ReLU-fied model)")
        w = original.weight
        self.conv1d = type(original).__name__ == "Conv1D"  # transformers' Conv1D: y = x @ W + b, W [in, out]
        if not self.conv1d and not isinstance(original, nn.Linear):
            raise WorkbenchError(f"{site.name}: the down projection is a {type(original).__name__}; "
                                 "accelerate takes nn.Linear or transformers' Conv1D")
        d_ff, d_model = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
        if d_ff % 16 or d_model % 16:
            raise WorkbenchError(f"{site.name}: d_model={d_model}, d_ff={d_ff}: the kernels need multiples of 16")
        self.site = site
        self.down_module = original
        self.original = [original]
        self.mode = mode
        self.backend = None if backend == "auto" else backend
        self.dense_fraction = dense_fraction
        self.decode_tokens = decode_tokens
        self.d_ff = d_ff
        self.predictor = None
        self.enabled = True
        self.track = False
        self.stats: dict[str, torch.Tensor] = {}

    @property
    def w_down_t(self) -> torch.Tensor:
        w = self.down_module.weight
        return w if self.conv1d else w.t()

    def relayout(self) -> None:
        if not self.conv1d:
            w = self.down_module.weight
            if not w.t().is_contiguous():
                w.data = w.data.t().contiguous().t()

    def restore_layout(self) -> None:
        if not self.conv1d:
            w = self.down_module.weight
            if not w.is_contiguous():
                w.data = w.data.contiguous()

    def _limit(self) -> int:
        return self.decode_tokens if self.mode == "exact" else 64

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        a2 = a.reshape(-1, shape[-1])
        if self.track:
            self._track(a2)
        if a2.shape[0] > self._limit():
            return self.down_module(a)
        cfg = {"dense_fraction": self.dense_fraction} if self.mode == "chunk" and a2.shape[0] > 1 else None
        y = kernels.sparse_down(a2, self.w_down_t, bias=getattr(self.down_module, "bias", None),
                                backend=self.backend, config=cfg)
        return y.reshape(*shape[:-1], y.shape[-1])

    @torch.no_grad()
    def _track(self, a2: torch.Tensor) -> None:
        """Active neurons and the down rows the kernel reads (the union, for a chunk)."""
        on = a2 != 0
        st = self.stats
        if not st:
            st.update({k: torch.zeros((), dtype=torch.int64, device=a2.device) for k in ("tokens", "active", "used", "hit")})
        n = a2.shape[0]
        st["tokens"] += n
        st["active"] += on.sum()
        st["hit"] += on.sum()
        if n == 1:
            st["used"] += on.sum()
        elif n <= self._limit():
            st["used"] += on.any(0).sum() * n  # the union is read for every token of the call
        else:
            st["used"] += n * self.d_ff  # dense path

    def extra_repr(self) -> str:
        return f"{self.site.name} (down projection), mode={self.mode}, activation={self.site.activation}"


class SparseFFN(_DownRelayout, nn.Module):
    """Drop-in replacement of one gated FFN module; see `accelerate`."""

    def __init__(self, site: FFNSite, original: nn.Module, mode: str, backend: str | None,
                 predictor: dict[str, torch.Tensor] | None = None, dense_fraction: float = 0.6,
                 decode_tokens: int = 8):
        super().__init__()
        if mode not in MODES:
            raise WorkbenchError(f"mode {mode!r}: use one of {MODES}")
        if site.kind != GATED or site.fused_gate_up:
            raise WorkbenchError(
                f"{site.name}: accelerate handles gated FFNs with separate gate/up/down projections "
                f"(Llama, Mistral, Qwen, Gemma style); this one is {site.kind}"
                f"{' with a fused gate_up projection' if site.fused_gate_up else ''}")
        if site.activation not in ("relu", "fatrelu"):
            raise WorkbenchError(
                f"{site.name}: activation {site.activation!r} has no exact zeros for the kernels to skip; "
                "accelerate needs ReLU or FATReLU FFNs (ProSparse-style models, e.g. zoo:relu-llama)")
        for m in (site.gate, site.up, site.down):
            if getattr(m, "bias", None) is not None:
                raise WorkbenchError(f"{site.name}: projections with a bias are not supported by the kernels")
        self.site = site
        self.original = [original]  # a list keeps it out of this module's children / state_dict
        self.mode = mode
        self.backend = None if backend == "auto" else backend
        self.activation = "fatrelu" if site.activation == "fatrelu" else "relu"
        # the dense FATReLU compares model-dtype values with a Python float, which torch rounds to
        # the model dtype first: use that same threshold so the masks agree on every value
        self.threshold = float(torch.tensor(float(site.threshold or 0.0), dtype=site.down.weight.dtype))
        self.dense_fraction = dense_fraction
        self.decode_tokens = decode_tokens
        self.predictor = predictor
        self.enabled = True
        self.track = False
        self.stats: dict[str, torch.Tensor] = {}

    # weights, always the live ones of the original modules
    @property
    def w_gate(self) -> torch.Tensor:
        return self.site.gate.weight

    @property
    def w_up(self) -> torch.Tensor:
        return self.site.up.weight

    def _route(self, n: int) -> str:
        if self.mode == "exact":
            return "sparse" if n <= self.decode_tokens else "dense"
        if self.mode == "chunk":
            return "sparse" if n == 1 else ("chunk" if n <= 64 else "dense")
        return "predicted" if n <= 64 else "predicted_ref"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        route = self._route(x2.shape[0])
        if self.track:
            self._track(x2)
        if route == "dense":
            return self.original[0](x)
        if route == "sparse":
            y = kernels.sparse_ffn(x2, self.w_gate, self.w_up, self.w_down_t, activation=self.activation,
                                   threshold=self.threshold, backend=self.backend)
        elif route == "chunk":
            y = kernels.chunk_ffn(x2, self.w_gate, self.w_up, self.w_down_t, activation=self.activation,
                                  threshold=self.threshold, dense_fraction=self.dense_fraction,
                                  backend=self.backend)
        else:
            p = self.predictor
            backend = "torch" if route == "predicted_ref" else self.backend
            ys = []
            for i in range(0, x2.shape[0], 64):  # the reference path too takes <= 64 tokens a call
                ys.append(kernels.sparse_ffn_predicted(
                    x2[i:i + 64], self.w_gate, self.w_up, self.w_down_t, p["w1"], p["w2"], b_pred1=p["b1"],
                    b_pred2=p["b2"], activation=self.activation, threshold=self.threshold, backend=backend))
            y = torch.cat(ys) if len(ys) > 1 else ys[0]
        return y.reshape(*shape[:-1], y.shape[-1])

    @torch.no_grad()
    def _track(self, x2: torch.Tensor) -> None:
        """Realised sparsity (and predictor recall) of this call, accumulated on the device."""
        g = torch.nn.functional.linear(x2, self.w_gate).float()
        true = g > self.threshold
        st = self.stats
        if not st:
            st.update(tokens=torch.zeros((), dtype=torch.int64, device=x2.device),
                      active=torch.zeros((), dtype=torch.int64, device=x2.device),
                      used=torch.zeros((), dtype=torch.int64, device=x2.device),
                      hit=torch.zeros((), dtype=torch.int64, device=x2.device))
        st["tokens"] += x2.shape[0]
        st["active"] += true.sum()
        if self.mode == "predictor":
            p = self.predictor
            logits = kernels.predictor_logits(x2.float(), p["w1"].float(), p["w2"].float(), p["b1"].float(),
                                              p["b2"].float())
            pred = logits > 0
            st["used"] += pred.sum()
            st["hit"] += (pred & true).sum()
        elif self.mode == "chunk" and 1 < x2.shape[0] <= 64:
            # the chunk kernel reads every row in the union of the chunk's active sets
            st["used"] += true.any(0).sum() * x2.shape[0]
            st["hit"] += true.sum()
        else:
            st["used"] += true.sum()
            st["hit"] += true.sum()

    def extra_repr(self) -> str:
        return f"{self.site.name}, mode={self.mode}, activation={self.activation}, threshold={self.threshold}"


def is_moe_blocks(module: nn.Module) -> bool:
    """A BlockFFN-style layer: ReLU+RMSNorm router and stacked non-gated experts."""
    r = getattr(module, "router", None)
    return (r is not None and hasattr(r, "proj") and hasattr(r, "norm") and hasattr(module, "n_experts")
            and hasattr(module, "expert_size") and hasattr(module, "up_proj") and hasattr(module, "down_proj"))


class SparseMoE(_DownRelayout, nn.Module):
    """Drop-in replacement of one BlockFFN layer (ReLU-routed MoE blocks); see `accelerate`.

    Calls of up to `decode_tokens` tokens (exact mode) or 64 tokens (chunk mode) run
    `kernels.moe_blocks`: the union of the active experts over the call's tokens is read once;
    longer calls (prefill) run the original module. The router's scores decide which experts are
    active, so exact and chunk modes compute the dense layer's function.
    """

    def __init__(self, site: FFNSite, original: nn.Module, mode: str, backend: str | None,
                 decode_tokens: int = 8):
        super().__init__()
        if mode not in ("exact", "chunk"):
            raise WorkbenchError(
                f"{site.name}: mode {mode!r} on a routed MoE layer: the router already decides which experts "
                "run, so there is no predictor to add; use mode='exact' (decode) or 'chunk' (2..64 tokens)")
        if getattr(original, "expert_act", "silu") != "silu":
            raise WorkbenchError(
                f"{site.name}: expert activation {original.expert_act!r} (DECO's NormSiLU) normalises across all "
                "experts' units, so inactive experts cannot be skipped exactly; the MoE kernel takes "
                "expert_act='silu' (BlockFFN)")
        if getattr(original.router, "scale", None) is not None:
            raise WorkbenchError(f"{site.name}: a per-expert router scale (router_scale=True) is not supported "
                                 "by the MoE kernel")
        for m in (original.router.proj, original.up_proj, original.down_proj):
            if getattr(m, "bias", None) is not None:
                raise WorkbenchError(f"{site.name}: projections with a bias are not supported by the kernels")
        self.site = site
        self.original = [original]
        self.mode = mode
        self.backend = None if backend == "auto" else backend
        self.decode_tokens = decode_tokens
        self.n_experts = int(original.n_experts)
        self.expert_size = int(original.expert_size)
        self.eps = float(original.router.norm.variance_epsilon)
        self.predictor = None
        self.track = False
        self.stats: dict[str, torch.Tensor] = {}

    @property
    def w_up(self) -> torch.Tensor:
        return self.original[0].up_proj.weight

    def _limit(self) -> int:
        return self.decode_tokens if self.mode == "exact" else 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.track:
            self._track(x2)
        if x2.shape[0] > self._limit():
            return self.original[0](x)
        r = self.original[0].router
        y = kernels.moe_blocks(x2, r.proj.weight, r.norm.weight, self.w_up, self.w_down_t, eps=self.eps,
                               backend=self.backend)
        return y.reshape(*shape[:-1], y.shape[-1])

    @torch.no_grad()
    def _track(self, x2: torch.Tensor) -> None:
        """Active neurons (expert_size per active expert) and the rows the kernel reads."""
        r = self.original[0].router
        on = kernels.router_scores(x2, r.proj.weight, r.norm.weight, eps=self.eps) != 0  # [T, E]
        st = self.stats
        if not st:
            st.update({k: torch.zeros((), dtype=torch.int64, device=x2.device) for k in ("tokens", "active", "used", "hit")})
        n = x2.shape[0]
        st["tokens"] += n
        st["active"] += on.sum() * self.expert_size
        st["hit"] += on.sum() * self.expert_size
        if n <= self._limit():
            st["used"] += on.any(0).sum() * self.expert_size * n  # the union is read for every token
        else:
            st["used"] += n * self.n_experts * self.expert_size  # dense path

    def extra_repr(self) -> str:
        return f"{self.site.name}, mode={self.mode}, experts={self.n_experts}x{self.expert_size}"
