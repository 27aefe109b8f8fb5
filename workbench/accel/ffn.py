"""SparseFFN: a gated ReLU/FATReLU FFN computed by the sparse kernels, swapped in by accelerate().

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


class SparseFFN(nn.Module):
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
