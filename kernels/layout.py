"""Weight re-layout helpers, run once when a model is accelerated (never per token).

The sparse kernels want every neuron's weights contiguous:
- gate and up: nn.Linear already stores them [d_ff, d_model] (row i = neuron i), kept as is;
- down: nn.Linear stores [d_model, d_ff]; the kernels take its transpose [d_ff, d_model];
- MoE blocks: experts stacked along the neuron axis, expert i owning rows i*d_e..(i+1)*d_e-1.
"""

from __future__ import annotations

import torch

from workbench.errors import KernelError


def down_rows(w_down: torch.Tensor) -> torch.Tensor:
    """nn.Linear(d_ff, d_model).weight [d_model, d_ff] -> [d_ff, d_model], contiguous copy."""
    if w_down.dim() != 2:
        raise KernelError(f"w_down must be 2-D [d_model, d_ff], got {tuple(w_down.shape)}")
    return w_down.t().contiguous()


def gate_up_rows(w: torch.Tensor) -> torch.Tensor:
    """nn.Linear(d_model, d_ff).weight, already [d_ff, d_model]: made contiguous if needed."""
    if w.dim() != 2:
        raise KernelError(f"weight must be 2-D [d_ff, d_model], got {tuple(w.shape)}")
    return w if w.is_contiguous() else w.contiguous()


def split_gate_up(w_gate_up: torch.Tensor, d_ff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused gate_up_proj weight [2*d_ff, d_model] (gate first) -> (w_gate, w_up) views."""
    if w_gate_up.shape[0] != 2 * d_ff:
        raise KernelError(
            f"fused gate/up weight has {w_gate_up.shape[0]} rows, expected {2 * d_ff}"
        )
    return w_gate_up[:d_ff], w_gate_up[d_ff:]


def stack_experts(
    ups: list[torch.Tensor], downs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert nn.Linear weights -> (w_up [E*d_e, d_model], w_down_t [E*d_e, d_model]).

    ups[i]: [d_e, d_model] (up_i.weight); downs[i]: [d_model, d_e] (down_i.weight).
    """
    if len(ups) != len(downs) or not ups:
        raise KernelError("stack_experts needs one up and one down weight per expert")
    shapes = {tuple(u.shape) for u in ups}
    if len(shapes) != 1:
        raise KernelError(
            f"experts have different up shapes {sorted(shapes)}: the blocks must be equal"
        )
    w_up = torch.cat([u.contiguous() for u in ups], dim=0)
    w_down_t = torch.cat([d.t() for d in downs], dim=0).contiguous()
    return w_up, w_down_t
