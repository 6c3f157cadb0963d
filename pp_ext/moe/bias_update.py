"""DeepSeek-V3's auxiliary-loss-free load balancing: the routers' bias update.

DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (arXiv 2412.19437), Sec. 2.1.2, and
Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
(arXiv 2408.15664), Algorithm 1: the router picks its top-k experts by ``s_i + b_i``
(``e_score_correction_bias``, added for the choice only), and at the end of each
training step each MoE layer's bias moves by the bias update speed ``gamma``:

    b_i <- b_i + gamma * sign(mean_load - load_i),

``load_i`` the number of the step's tokens the layer routed to expert i (every
micro-batch of every data rank), ``mean_load`` their mean over the experts.

A forward hook on each router counts its top-k picks (``topk_indices``, the router's
third output) into an int64 vector per router: only in a training forward, never in
eval (the module is in eval mode) nor in activation checkpointing's recompute, which
reruns the forward inside backward, while the autograd engine runs a graph task. The
counts of a stage's routers are then summed over its data-parallel group (the ranks
that route the other data shards through the same layers; under expert parallelism a
rank still routes its own tokens, so its expert group is inside that group): one
all-reduce per step, after the schedule's point-to-point has finished, issued in the
same order by every member, as NCCL requires. Megatron-Core pools its counts the same
way (``moe_router_enable_expert_bias``: an all-reduce over its tensor, context and
data ranks, whose sequence-parallel tensor ranks see different tokens; pp-ext's
tensor ranks see the same tokens, so its data group holds every token once). The
sign is taken in integers, ``sign(total - E * load_i)``, so a layer whose load equals
its mean is exactly left alone.

The bias is a buffer of the router: it travels in the layers' state dicts, so
checkpoints and the export carry it, and ``from_pretrained`` loads it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

BIAS = "e_score_correction_bias"


def biased_routers(module: nn.Module) -> list[nn.Module]:
    """The routers of ``module`` (a rank's layers) that choose with a correction bias,
    each once, in module order (the same on every rank of a stage)."""
    found = {id(m): m for m in module.modules() if isinstance(getattr(m, BIAS, None), torch.Tensor)}
    return list(found.values())


def in_backward() -> bool:
    """Whether the autograd engine is running a backward (where activation
    checkpointing recomputes a forward): torch.utils.checkpoint's own test."""
    return torch._C._current_graph_task_id() != -1


class BiasUpdate:
    """The per-step bias update of the biased routers of ``module`` at speed ``gamma``,
    their counts summed over ``group`` (the stage's data-parallel group)."""

    def __init__(self, module: nn.Module, gamma: float, group=None) -> None:
        self.gamma, self.group = gamma, group
        self.routers = biased_routers(module)
        self.counts = [
            torch.zeros(getattr(r, BIAS).numel(), dtype=torch.int64, device=getattr(r, BIAS).device)
            for r in self.routers
        ]
        for router, counts in zip(self.routers, self.counts):
            router.register_forward_hook(self._counter(counts))

    @staticmethod
    def _counter(counts: torch.Tensor):
        def count(router: nn.Module, args, output) -> None:
            if router.training and not in_backward():
                picks = output[2].reshape(-1)  # topk_indices: (tokens, top_k)
                counts.add_(torch.bincount(picks, minlength=counts.numel()).to(counts.device))

        return count

    @torch.no_grad()
    def step(self, apply: bool = True) -> torch.Tensor:
        """After the optimizer step: the step's loads pooled over the group, each bias
        moved (where ``apply``: a step the optimizer skipped moves none), the counts
        cleared. Returns the loads, routers x experts (no rows without routers)."""
        if not self.routers:
            return torch.zeros(0, 0, dtype=torch.int64)
        loads = torch.stack(self.counts)
        if dist.is_initialized():
            dist.all_reduce(loads, group=self.group)
        if apply:
            total = loads.sum(dim=1, keepdim=True)
            direction = torch.sign(total - loads.shape[1] * loads)  # sign(mean_load - load_i)
            for router, sign in zip(self.routers, direction):
                bias = getattr(router, BIAS)
                bias.add_(self.gamma * sign.to(bias.dtype))
        for counts in self.counts:
            counts.zero_()
        return loads


def max_imbalance(loads: torch.Tensor) -> float:
    """The largest ``max_load / mean_load`` over the rows of ``loads`` (routers x experts),
    the paper's MaxVio plus one; 0.0 without rows."""
    if not loads.numel():
        return 0.0
    mean = loads.sum(dim=1).double().clamp(min=1) / loads.shape[1]
    return float((loads.max(dim=1).values / mean).max())
