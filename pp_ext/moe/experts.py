"""Experts whose weight gradients wait for the zero-bubble W pass.

Transformers' MoE experts (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3, gpt-oss) hold every expert's projections stacked, ``gate_up_proj`` (experts, 2 * inter,
hidden) and ``down_proj`` (experts, hidden, inter), or transposed, (experts, hidden,
2 * inter) and (experts, inter, hidden), with per-expert biases ``gate_up_proj_bias`` /
``down_proj_bias`` (gpt-oss: ``is_transposed``, ``has_bias``, its gate and up columns
interleaved and split by its own clamped SwiGLU, ``GptOssExperts._apply_gate``). By
default (``grouped_mm``) they sort the token-expert pairs by expert and run each
projection as one grouped GEMM (``transformers.integrations.moe.grouped_mm_experts_forward``).
Autograd would compute both GEMMs of their backward in I; zero-bubble schedules (Qi et
al. 2024, "Zero Bubble Pipeline Parallelism", Sec. 2) want the weight GEMMs, about half
of an MoE layer's backward, in W. :func:`deferrable` swaps an experts module's class
(parameters and names unchanged) for one that, once bound to a store, runs the same
computation with the two projections through
:func:`pp_ext.autograd.split_backward.grouped_linear`; unbound it is transformers' own.

The biases are added after each grouped GEMM, as transformers adds them (each pair's
expert's row, ``bias[expert_ids]``), by autograd: their gradients, a scatter-add of
``grad_output``'s rows per expert, come in I, as a linear layer's bias gradient does
(:mod:`pp_ext.autograd.split_backward`): about 1/in_features of the weight GEMM's work,
and left to autograd they accumulate exactly as in transformers' model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pp_ext.autograd.split_backward import Bindable, grouped_linear
from pp_ext.tools.mixin import mixed


def sorted_pairs(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert_ids, perm, selected, sample_weights)``: the token-expert pairs sorted by
    expert, as ``grouped_mm_experts_forward`` sorts them."""
    num_top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    selected = hidden_states[perm // num_top_k]
    return expert_ids, perm, selected, top_k_weights.reshape(-1)[perm]


def grouped_experts(experts: Any, selected: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``down(gate(up_gate(x) + b)) + b`` of rows sorted by expert (expert g's ending at
    ``offsets[g]``; the biases where the experts have them, each row's expert's, as
    transformers adds them), each projection one grouped GEMM deferrable to ``experts``'
    store."""
    store, transposed = experts._wgrad_store, experts.is_transposed
    if experts.has_bias:
        rows = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
        expert_ids = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), rows)

    def project(x: torch.Tensor, name: str) -> torch.Tensor:
        out = grouped_linear(x, getattr(experts, name), offsets, store, transposed)
        return out + getattr(experts, f"{name}_bias")[expert_ids] if experts.has_bias else out

    return project(experts._apply_gate(project(selected, "gate_up_proj")), "down_proj")


def combine(
    projected: torch.Tensor,
    perm: torch.Tensor,
    sample_weights: torch.Tensor,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The sorted pairs' outputs scaled by their routing weights, put back in token order
    and summed over each token's ``top_k`` (``shape``: tokens, top_k, hidden)."""
    weighted = projected * sample_weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inverse].view(shape).sum(dim=1).to(dtype)


def split_experts_forward(
    experts: Any,  # a transformers experts module: its stacked weights, counts and gate
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Transformers' ``grouped_mm_experts_forward`` for gated experts, each grouped GEMM
    deferrable: pairs sorted by expert, the rows of each expert counted by ``histc``
    (float on CPU, int on GPU, as transformers counts them), ``down(gate(up_gate(x) + b)) + b``
    (the biases where the experts have them), scaled by the routing weights, summed per
    token."""
    num_tokens, hidden_dim = hidden_states.shape
    expert_ids, perm, selected, sample_weights = sorted_pairs(
        hidden_states, top_k_index, top_k_weights
    )
    counted = (
        expert_ids.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids.int()
    )
    rows = torch.histc(counted, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(rows, dim=0, dtype=torch.int32)
    projected = grouped_experts(experts, selected, offsets)
    shape = (num_tokens, top_k_index.size(-1), hidden_dim)
    return combine(projected, perm, sample_weights, shape, hidden_states.dtype)


class DeferrableExperts(Bindable):
    """Mixed into a transformers experts class: its forward while bound to a store
    (:func:`pp_ext.autograd.split_backward.enable_split_backward`) is
    :func:`split_experts_forward`, otherwise transformers' (whatever
    ``config._experts_implementation`` selects)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self._wgrad_store is None or torch.is_autocast_enabled(hidden_states.device.type):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        return split_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def deferrable(experts: nn.Module) -> nn.Module:
    """``experts`` (gated, with or without biases, weights (experts, out, in) or
    transposed) made deferrable in place."""
    if not experts.has_gate or experts.has_post_expert_norm:
        raise ValueError(
            f"{type(experts).__name__} has no gate or a norm after each expert: pp-ext defers "
            f"the weight GEMMs of gated experts without a post-expert norm only"
        )
    experts_class: type = type(experts)
    experts.__class__ = mixed(
        DeferrableExperts, experts_class, "Deferrable", "with deferrable GEMMs."
    )
    return experts
