"""The tensor-parallel axis and Megatron's conjugate operators f and g on it.

Shoeybi et al. 2019 ("Megatron-LM: Training Multi-Billion Parameter Language Models
Using Model Parallelism", Sec. 3, Fig. 3) make a transformer block tensor-parallel
with two operators placed around each pair of linear layers: ``f`` is the identity
in forward and an all-reduce of the input gradient in backward (before a
column-parallel layer, whose input every rank holds whole), ``g`` is an all-reduce
in forward and the identity in backward (after a row-parallel layer, whose outputs
are partial sums). A statistic summed over the axis and then used by every rank with
its own features (a norm over a cut width) is summed in both directions
(:func:`sum_over_axis`). They are autograd Functions, so the all-reduce of ``f`` runs
inside whichever backward pass reaches it: with a split backward, the input-gradient
(I) pass; the weight-gradient (W) pass of a parallel layer needs no communication.

The axis is the model axis of DeepSpeed's ``PipeModelDataParallelTopology``: its
process group is the pipeline grid's slice-parallel group
(``PipelineParallelGrid.get_slice_parallel_group()``), the only group used here.
Layers read the axis while they are built (:func:`using`, set by
:class:`~pp_ext.engine.module.ChunkedPipelineModule` around its build) and keep it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorAxis:
    """This rank's place on the tensor-parallel axis: ``size`` ranks, this one ``rank``,
    all-reducing over ``group`` (None with one rank, or where nothing runs: counting
    and exporting build layers on the meta device). The vocabulary is padded to a
    multiple of ``make_vocab_size_divisible_by x size`` (Megatron's rule,
    :mod:`pp_ext.tp.vocab`)."""

    size: int = 1
    rank: int = 0
    group: Any = field(default=None, compare=False, repr=False)
    make_vocab_size_divisible_by: int = 1

    def __deepcopy__(self, memo) -> TensorAxis:
        return self  # a process group cannot be copied; the axis is immutable anyway

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` reduced in place over the axis (nothing to do with one rank)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor


_current = TensorAxis()


def current() -> TensorAxis:
    """The axis layers built now belong to (one rank unless inside :func:`using`)."""
    return _current


@contextmanager
def using(axis: TensorAxis) -> Iterator[TensorAxis]:
    """Build layers on ``axis`` for the duration."""
    global _current
    previous, _current = _current, axis
    try:
        yield axis
    finally:
        _current = previous


def from_grid(grid, make_vocab_size_divisible_by: int = 1) -> TensorAxis:
    """The model axis of a DeepSpeed ``PipelineParallelGrid``."""
    size = grid.get_slice_parallel_world_size()
    return TensorAxis(
        size,
        grid.get_slice_parallel_rank(),
        grid.get_slice_parallel_group() if size > 1 else None,
        make_vocab_size_divisible_by,
    )


class _CopyToRegion(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, input, axis):
        ctx.axis = axis
        return input

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.all_reduce(grad.contiguous().clone()), None


class _ReduceFromRegion(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, input, axis):
        return axis.all_reduce(input.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_region(input: torch.Tensor, axis: TensorAxis) -> torch.Tensor:
    """f on ``axis``: ``input`` unchanged; its gradient summed over the axis."""
    return input if axis.size == 1 else _CopyToRegion.apply(input, axis)


def reduce_from_region(input: torch.Tensor, axis: TensorAxis) -> torch.Tensor:
    """g on ``axis``: ``input`` summed over the axis; its gradient passed through."""
    return input if axis.size == 1 else _ReduceFromRegion.apply(input, axis)


class _SumOverAxis(torch.autograd.Function):
    """All-reduce forward and backward: g's forward, f's backward."""

    @staticmethod
    def forward(ctx, input, axis):
        ctx.axis = axis
        return axis.all_reduce(input.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.all_reduce(grad.contiguous().clone()), None


def sum_over_axis(input: torch.Tensor, axis: TensorAxis) -> torch.Tensor:
    """``input`` summed over the axis, its gradient summed too: for a sum that every rank
    then uses with its own part of the activations (a norm's statistic over a width cut
    across the axis), each rank's gradient of it is partial, the sum's is their sum."""
    return input if axis.size == 1 else _SumOverAxis.apply(input, axis)


def gather_last_dim(input: torch.Tensor, axis: TensorAxis) -> torch.Tensor:
    """The shards of the axis concatenated along the last dimension, no gradient:
    whole logits for evaluation metrics and tests, never in training."""
    if axis.size == 1:
        return input
    parts = [torch.empty_like(input) for _ in range(axis.size)]
    dist.all_gather(parts, input.contiguous(), group=axis.group)
    return torch.cat(parts, dim=-1)
