"""LoRA on tensor-parallel layers, as Megatron cuts it (Shoeybi et al. 2019, Sec. 3).

PEFT's ``lora.Linear`` wraps pp-ext's column- and row-parallel layers as it wraps any
``nn.Linear`` or ``Conv1D``: its forward, ``base(x) + B(A(dropout(x))) * scale`` (Hu et
al. 2021, arXiv:2106.09685), and its key names stay PEFT's. It builds the factors at the
base layer's local shapes, which already gives Megatron's layouts:

* column-parallel base (x whole, this rank's rows of W): ``A`` [r, in] whole (replicated),
  ``B_t`` [out / T, r] this rank's rows of B (section by section for a fused [q; k; v]);
* row-parallel base (x cut, this rank's columns of W): ``A_t`` [r, in / T] this rank's
  columns of A, ``B`` [out, r] whole (replicated).

What PEFT cannot do inside a tensor-parallel layer is written here, by hand:

* the reductions. ``B_t`` is made column-parallel: Megatron's ``f`` on its input ``A x``
  sums over the tensor ranks the gradient that reaches ``A x`` (each rank's
  ``B_t^T g_t`` covers its own rows only), so the replicated ``A``'s gradient
  ``(sum_t B_t^T g_t) x^T`` and the lora path's input gradient are whole, and equal on
  every tensor rank, before the base's ``f`` adds the base's part of the input gradient.
  ``A_t`` is made row-parallel: Megatron's ``g`` sums ``A x = sum_t A_t x_t`` over the
  tensor ranks, so the replicated ``B`` sees the whole ``A x``, its gradient
  ``g (A x)^T`` is whole on every rank, and the scale is applied once, after ``B``. Each
  costs one all-reduce of [tokens, r] (r << hidden) per adapted layer: backward for a
  column-parallel base, forward for a row-parallel one. Both factor kinds stay
  :class:`~pp_ext.autograd.split_backward.Deferrable`, so a W pass computes their weight
  gradients with no communication, as for the base layers.
* ``A``'s initialisation (PEFT's default, Kaiming-uniform with a = sqrt(5), B zero): PEFT
  draws at the local shapes, which for a cut ``A_t`` would use the local fan-in and give
  every tensor rank the same draw. On a tensor-parallel layer PEFT's draws are replayed
  at the whole shapes and this rank's part of A taken, so the adapters start as on one
  tensor rank, bit for bit, for any pipeline and tensor layout; so too for the factors of
  fused experts cut over expert ranks (:mod:`pp_ext.peft.experts`).
* dropout on a cut input: each tensor rank draws the whole input's mask (the ranks' random
  generators are in step: same seeds, same operations) and keeps its part, which is the
  dropout a single process applies to the whole input. On a whole (replicated) input
  PEFT's own ``nn.Dropout`` draws the same mask on every tensor rank already.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from pp_ext import tp
from pp_ext.peft.experts import creation_order

KAIMING_A = math.sqrt(5)  # PEFT's (and nn.Linear's) default for lora_A


class CutDropout(nn.Dropout):
    """Dropout of a tensor cut along its last dimension by ``split``: the whole tensor's
    mask, drawn on every tensor rank alike, of which this rank keeps its part."""

    def __init__(self, p: float, split: tp.Split) -> None:
        super().__init__(p)
        self.split = split

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return input
        last = tp.Split(input.dim() - 1, self.split.sections, self.split.size, self.split.rank)
        whole = input.new_ones(last.whole_shape(input.shape))
        return input * last.take(F.dropout(whole, self.p, training=True))


def _column(layer: nn.Module) -> bool:
    return isinstance(layer, (tp.ColumnParallelLinear, tp.ColumnParallelConv1D))


def _row(layer: nn.Module) -> bool:
    return isinstance(layer, (tp.RowParallelLinear, tp.RowParallelConv1D))


def parallel_factors(lora: LoraLayer, adapter: str) -> None:
    """Cut ``lora``'s factors of ``adapter`` as its base layer is cut (column- or
    row-parallel; nothing for an ordinary layer): Megatron's ``f`` / ``g`` on the lora
    path, ``tp_split`` on the cut factor for loading, export and checkpoints."""
    base: nn.Module = lora.get_base_layer()
    axis = tp.axis_of(base)
    if _column(base):
        tp.column_parallel(lora.lora_B[adapter], axis, _split(base).sections)
    elif _row(base):
        factor_a: nn.Module = lora.lora_A[adapter]
        tp.row_parallel(factor_a, axis)
        dropout = lora.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout):
            lora.lora_dropout[adapter] = CutDropout(dropout.p, _split(factor_a))


def _split(layer: nn.Module) -> tp.Split:
    return tp.splits(layer)["weight"]


def _cut(weight: torch.Tensor) -> tp.Split | None:
    """A factor's cut: over tensor ranks, or over expert ranks (:mod:`pp_ext.peft.experts`)."""
    return getattr(weight, "tp_split", None) or getattr(weight, "expert_split", None)


def _whole_shape(weight: torch.Tensor) -> torch.Size:
    split = _cut(weight)
    return weight.shape if split is None else split.whole_shape(weight.shape)


@torch.no_grad()
def initialise_a(loras: Sequence[LoraLayer], adapter: str, seed: int) -> None:
    """PEFT's initial ``lora_A`` of a layer's ``loras`` whose factors are cut over tensor
    or expert ranks, as one rank gets it: PEFT's draws replayed at the whole shapes from a
    generator seeded ``seed`` (the layer's: PEFT drew from torch's, so seeded), in the
    order PEFT drew them (:func:`~pp_ext.peft.experts.creation_order`), which for each
    target are ``nn.Linear``'s own initialisation of A and B (PEFT then overwrites them)
    and A's Kaiming-uniform (a = sqrt(5)); this rank keeps its part of A. B stays PEFT's
    zero. Nothing for a layer with no cut factor, or built on the meta device."""
    factors = [getattr(f[adapter], "weight") for lora in loras for f in (lora.lora_A, lora.lora_B)]
    if all(_cut(weight) is None for weight in factors):
        return
    generator = torch.Generator().manual_seed(seed)
    for lora in creation_order(loras):
        a: torch.Tensor = getattr(lora.lora_A[adapter], "weight")
        b: torch.Tensor = getattr(lora.lora_B[adapter], "weight")
        if a.is_meta:  # built to read a checkpoint's shapes (export, reshape)
            return
        for shape in (_whole_shape(a), _whole_shape(b)):  # nn.Linear's, overwritten by PEFT
            nn.init.kaiming_uniform_(torch.empty(shape), a=KAIMING_A, generator=generator)
        whole = torch.empty(_whole_shape(a))
        nn.init.kaiming_uniform_(whole, a=KAIMING_A, generator=generator)
        split = _cut(a)
        a.copy_(whole if split is None else split.take(whole))
