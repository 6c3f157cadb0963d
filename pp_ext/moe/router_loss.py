"""The router's load-balancing loss, pooled over every MoE layer of every stage.

Switch Transformer's auxiliary loss (Fedus et al. 2022, "Switch Transformers", eqs. 4-6),
``E * sum_e f_e * P_e``, with ``f_e`` the fraction of top-k assignments routed to expert e
and ``P_e`` its mean router probability, is what transformers' MoE models compute in
``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss: one function,
from each router's first output, its logits: gpt-oss's with the router's bias, which
routes by top-k of the logits and a softmax over those k, while the loss takes the softmax
over all experts, then its top-k, as for the others). It pools
the statistics of all layers before it multiplies them, so it is not a sum of per-layer
losses (Megatron's per-layer form differs) and no stage can finish it alone.

What a stage needs of the layers before it is two vectors of ``E`` numbers: the summed
(padding-masked) assignment counts and router probabilities. The counts are whole
numbers and ride as int64, as the positions and the mask do (no gradient, and exact: HF
sums them in float32, which is exact below 2^24 assignments per micro-batch). They ride with the
activations as two more tensors of the stream (:func:`add_layer` on each MoE layer, from
zeros on the first stage), and :func:`pooled_loss` finishes the loss on the last stage.
The probabilities carry the gradient: it comes back with the activation gradients, so no
message is added and the point-to-point order stays the schedule's. The operations and
their order are ``load_balancing_loss_func``'s with an attention mask (pp-ext always has
one: all ones without padding, which gives the same sums as HF's unmasked branch), so
the result is HF's to the bit.
"""

from __future__ import annotations

import torch


def empty_statistics(num_experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, probabilities)`` before the first MoE layer: zeros, int64 and float32."""
    return (
        torch.zeros(num_experts, dtype=torch.int64, device=device),
        torch.zeros(num_experts, dtype=torch.float32, device=device),
    )


def add_layer(
    counts: torch.Tensor,
    probs: torch.Tensor,
    router_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer's ``router_logits`` (tokens x experts, batch-major as the router
    flattens them) added to the running sums: the top-k assignments and the router
    probabilities of the tokens ``attention_mask`` keeps (one step of HF's loop)."""
    flat_mask = attention_mask.reshape(-1).to(router_logits.device)
    routing_weights = torch.nn.functional.softmax(router_logits, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    assigned = torch.zeros_like(counts).scatter_add_(
        0, selected.reshape(-1), flat_mask.long().repeat_interleave(top_k)
    )
    weighted = (routing_weights.float() * flat_mask.float().unsqueeze(-1)).sum(dim=0)
    return counts + assigned, probs + weighted


def pooled_loss(
    counts: torch.Tensor, probs: torch.Tensor, attention_mask: torch.Tensor, layers: int
) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` from the sums of ``layers`` MoE layers: each layer counted
    the tokens ``attention_mask`` keeps, so the rows are its sum ``layers`` times."""
    flat_mask = attention_mask.reshape(-1).to(device=counts.device, dtype=torch.float32)
    rows: float | torch.Tensor = 0.0
    for _ in range(layers):  # summed layer by layer, as HF's loop does
        rows = rows + flat_mask.sum()
    tokens_per_expert = counts.float() / rows
    router_prob_per_expert = probs / rows
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * counts.numel()
