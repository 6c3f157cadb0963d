"""Expert parallelism: each MoE layer's routed experts spread over ``E`` data ranks of a
stage, tokens sent to their experts and back by all-to-all (DeepSpeed-MoE, Rajbhandari
et al. 2022, Sec. 5; Megatron-Core's ``MoEAlltoAllTokenDispatcher``), dropless.

The groups are DeepSpeed's (``deepspeed.utils.groups._create_expert_data_and_model_parallel``,
what its own MoE layer creates): on the ``PipeModelDataParallelTopology`` grid an expert
group is ``E`` consecutive data ranks of one stage and tensor rank, the expert-data group
the ranks holding the same experts. Expert parameters are marked as DeepSpeed's MoE
layer marks them (``allreduce = False``, ``group_name``), so its engine broadcasts them
and reduces their gradients over the expert-data group only (divided by all data ranks,
which gives the mean over every data rank's tokens: the expert group's all-to-all already
summed the tokens of its ``E`` ranks into each expert's gradient).

A rank routes its own tokens with HF's router, unchanged; :func:`dispatched_forward`
then sends each token-expert pair to the rank holding its expert: the per-expert counts
first (one ``all_to_all_single`` of ``E x local`` numbers), then the rows with those
variable splits, the holder runs its local experts as one grouped GEMM per projection
(:func:`pp_ext.moe.experts.grouped_experts`, deferrable to the W pass), and the reverse
all-to-all brings the results back to be combined with the routing weights as HF's
``grouped_mm_experts_forward`` combines them. No capacity factor: nothing is dropped,
so the result is the single-process model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import groups

from pp_ext.engine import nccl_emulation, p2p
from pp_ext.moe.experts import DeferrableExperts, combine, grouped_experts, sorted_pairs
from pp_ext.tp import Split


@dataclass(frozen=True)
class ExpertAxis:
    """This rank's place among the ``size`` ranks of its expert group (``group``; None with
    one rank), DeepSpeed's group name ``ep_size_<size>``."""

    size: int = 1
    rank: int = 0
    group: Any = field(default=None, compare=False, repr=False)

    @property
    def group_name(self) -> str:
        return f"ep_size_{self.size}"

    def __deepcopy__(self, memo) -> ExpertAxis:
        return self  # a process group cannot be copied; the axis is immutable anyway


def expert_axis(grid, size: int) -> ExpertAxis:
    """The expert axis of ``size`` ranks on a pipeline ``grid`` (DeepSpeed's
    ``PipelineParallelGrid``), its groups created by DeepSpeed on every rank in one order."""
    if size == 1:
        return ExpertAxis()
    groups.mpu = grid  # what DeepSpeed's engine sets from its mpu; the groups read it
    name = f"ep_size_{size}"
    # DeepSpeed keeps the first groups of a name; a module built on another grid in this
    # process (tests) made them for other ranks
    for registry in (
        groups._EXPERT_PARALLEL_GROUP,
        groups._EXPERT_DATA_PARALLEL_GROUP,
        groups._EXPERT_PARALLEL_GROUP_RANKS,
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        registry.pop(name, None)
    groups._create_expert_data_and_model_parallel(size, mpu=grid)
    group = groups._get_expert_parallel_group(name)
    return ExpertAxis(size, dist.get_rank(group), group)


def _exchange(out, rows, out_splits, in_splits, group, what: str) -> None:
    """``all_to_all_single`` on the expert group; under ``PP_EXT_P2P=emulate-nccl`` with
    NCCL's rules for collectives emulated (:func:`pp_ext.engine.nccl_emulation.all_to_all`:
    ``what`` is the exchange, the names of :mod:`pp_ext.schedules.nccl`'s lowering)."""
    if p2p.emulating():
        nccl_emulation.all_to_all(
            out, rows, out_splits, in_splits, group, what, p2p.default_timeout()
        )
    else:
        dist.all_to_all_single(out, rows, out_splits, in_splits, group=group)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], receive: list[int], group, what: str):
        ctx.send, ctx.receive, ctx.group, ctx.what = send, receive, group, what
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        _exchange(out, rows.contiguous(), receive, send, group, what)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        _exchange(back, grad.contiguous(), ctx.send, ctx.receive, ctx.group, f"{ctx.what} grad")
        return back, None, None, None, None


def dispatched_forward(
    experts: Any,
    axis: ExpertAxis,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts' output for this rank's tokens, ``experts`` holding the ``local`` experts
    ``axis.rank * local ...`` of ``axis.size * local``; every rank of the group calls it."""
    num_tokens, hidden_dim = hidden_states.shape
    local = experts.num_experts
    expert_ids, perm, selected, sample_weights = sorted_pairs(
        hidden_states, top_k_index, top_k_weights
    )
    counts = torch.bincount(expert_ids, minlength=axis.size * local)
    # counts first: what each source sends to each of this rank's experts (source-major)
    received = torch.empty_like(counts)
    _exchange(received, counts, None, None, axis.group, "counts")
    send = counts.view(axis.size, local).sum(dim=1).tolist()
    by_source = received.view(axis.size, local)
    rows = _AllToAll.apply(selected, send, by_source.sum(dim=1).tolist(), axis.group, "rows")
    # received rows are source-major then expert; the grouped GEMM wants them by expert
    local_ids = torch.repeat_interleave(
        torch.arange(local, device=rows.device).repeat(axis.size), by_source.reshape(-1)
    )
    local_ids, order = torch.sort(local_ids, stable=True)
    offsets = torch.cumsum(by_source.sum(dim=0), dim=0, dtype=torch.int32)
    projected = grouped_experts(experts, rows[order], offsets)
    back = torch.empty_like(projected)
    back[order] = projected
    returned = _AllToAll.apply(back, by_source.sum(dim=1).tolist(), send, axis.group, "back")
    shape = (num_tokens, top_k_index.size(-1), hidden_dim)
    return combine(returned, perm, sample_weights, shape, hidden_states.dtype)


class ShardedExperts(DeferrableExperts):
    """Mixed into a deferrable experts class: its forward is :func:`dispatched_forward`
    on its axis (bound to a W store or not)."""

    _expert_axis: ExpertAxis

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return dispatched_forward(
            self, self._expert_axis, hidden_states, top_k_index, top_k_weights
        )


def shard(experts: Any, axis: ExpertAxis) -> None:
    """Keep only this rank's ``num_experts / axis.size`` experts of ``experts`` (made
    deferrable), each fused tensor's part (and bias's, where the experts have them) marked for loading (``tp_split``'s
    :class:`~pp_ext.tp.Split` on the expert dimension, read as slices) and as DeepSpeed's
    MoE parameters; a no-op with one rank."""
    if axis.size == 1:
        return
    base = type(experts)
    experts.__class__ = type(
        f"Sharded{base.__name__}",
        (ShardedExperts, base),
        {"__module__": __name__, "__doc__": f"{base.__name__}, sharded over an expert group."},
    )
    experts._expert_axis = axis
    whole = experts.num_experts
    split = Split(0, (whole,), axis.size, axis.rank)
    # gpt-oss's per-expert biases too: a row per expert, indexed by local expert ids
    biases = ("gate_up_proj_bias", "down_proj_bias") if experts.has_bias else ()
    for name in ("gate_up_proj", "down_proj", *biases):
        whole_param = experts.get_parameter(name)
        param = torch.nn.Parameter(split.take(whole_param.detach()).clone())
        # experts are whole on every tensor rank: the replaced tensor's mark (counted in
        # gradient norms on tensor rank 0 only, pp_ext.tp.mark_replicated) carries over
        if getattr(whole_param, "ds_pipe_replicated", False):
            setattr(param, "ds_pipe_replicated", True)
        mark(param, split, axis)
        setattr(experts, name, param)
    experts.num_experts = whole // axis.size


def mark(param: torch.nn.Parameter, split: Split, axis: ExpertAxis) -> None:
    """DeepSpeed's marks of an expert parameter (``deepspeed.moe.experts.Experts``): its
    gradient reduced over the expert-data group only, the optimizer's expert groups; and
    ``expert_split``, this expert rank's part of the whole tensor (read as a slice,
    checkpointed by expert, :mod:`pp_ext.checkpoint.experts`)."""
    setattr(param, "allreduce", False)
    setattr(param, "group_name", axis.group_name)
    setattr(param, "expert_split", split)


def axis_of(experts: Any) -> ExpertAxis:
    """The expert axis ``experts`` are sharded over (one rank: not sharded)."""
    return getattr(experts, "_expert_axis", ExpertAxis())
