"""Megatron's tensor-parallel layers (Shoeybi et al. 2019, Sec. 3), made from the
ordinary layers HF builds.

A layer built at its local shard shape (HF's own class, from a config whose heads
and intermediate size are divided by the tensor size) becomes parallel by swapping
its class, as :mod:`pp_ext.autograd.split_backward` does: parameters stay the same
objects under the same ``state_dict`` names, so HF key mappings, loading and
checkpoints keep working.

* column-parallel (q, k, v, gate, up): ``f`` then the local GEMM; output heads or
  intermediate features stay on this rank (Sec. 3: no communication between the two
  GEMMs of the MLP or attention block);
* row-parallel (o, down): the local GEMM, ``g`` (all-reduce of the partial sums),
  then the bias, added once after the reduction as the paper's Fig. 3 places it;
* vocabulary-parallel embedding (Sec. 3, "input embedding"): each rank holds a
  contiguous block of the vocabulary (padded to divide, :mod:`pp_ext.tp.vocab`), looks
  up the ids that fall in it, zeros the others and ``g`` sums the blocks.

transformers' ``Conv1D`` (GPT-2's linear layer, weight stored transposed as
[in, out]) is cut the same way on the transposed dimensions: column-parallel along
its weight's dim 1, row-parallel along dim 0 (:class:`ColumnParallelConv1D`,
:class:`RowParallelConv1D`).

Both linear kinds subclass :class:`~pp_ext.autograd.split_backward.Deferrable`, so in a
zero-bubble schedule their weight GEMM moves to the W pass, which needs no
communication (the saved input and output gradient are local); the all-reduce of
``f`` stays in the input-gradient (I) pass, where autograd meets it.

Every sharded parameter carries ``tp_split`` (:class:`~pp_ext.tp.split.Split`), which
loading and export read; the others are replicated (:func:`mark_replicated`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pp_ext.autograd.split_backward import Deferrable
from pp_ext.tools.mixin import mixed
from pp_ext.tp.axis import TensorAxis, copy_to_region, reduce_from_region, sum_over_axis
from pp_ext.tp.split import Split
from pp_ext.tp.vocab import padded_vocab_size, vocab_split


def axis_of(module: nn.Module) -> TensorAxis:
    """The axis a layer was made parallel on (one rank for an ordinary layer)."""
    return getattr(module, "tensor_axis", TensorAxis())


class ColumnParallelLinear(Deferrable, nn.Linear):
    """y_r = f(x) W_r^T + b_r: this rank's block of output features."""

    tensor_axis: TensorAxis

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.dense(copy_to_region(input, self.tensor_axis), self.bias)


class RowParallelLinear(Deferrable, nn.Linear):
    """y = g(x_r W_r^T) + b: this rank's block of input features, summed over the axis."""

    tensor_axis: TensorAxis

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = reduce_from_region(self.dense(input, None), self.tensor_axis)
        return out if self.bias is None else out + self.bias


class ColumnParallelConv1D(Deferrable, Conv1D):
    """:class:`ColumnParallelLinear` for ``Conv1D`` (weight [in, out_r])."""

    tensor_axis: TensorAxis
    _weight_in_out = True
    forward = ColumnParallelLinear.forward


class RowParallelConv1D(Deferrable, Conv1D):
    """:class:`RowParallelLinear` for ``Conv1D`` (weight [in_r, out])."""

    tensor_axis: TensorAxis
    _weight_in_out = True
    forward = RowParallelLinear.forward


def _in_out(layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, weight stored [in, out])`` of a linear or ``Conv1D``."""
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf, True
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(layer).__name__} is neither nn.Linear nor Conv1D")
    return layer.in_features, layer.out_features, False


def column_parallel(
    linear: nn.Module, axis: TensorAxis, sections: tuple[int, ...] | None = None
) -> nn.Module:
    """Make ``linear`` (an ``nn.Linear`` or ``Conv1D`` built with this rank's share of
    output features) column-parallel. ``sections``: whole lengths of fused outputs
    ([q; k; v]), default one section."""
    if axis.size > 1:
        _, out_features, in_out = _in_out(linear)
        sections = sections or (out_features * axis.size,)
        linear.__class__ = ColumnParallelConv1D if in_out else ColumnParallelLinear
        # setattr: attributes torch's Module and Parameter types do not declare
        setattr(linear, "tensor_axis", axis)
        split = Split(1 if in_out else 0, sections, axis.size, axis.rank)
        setattr(linear.get_parameter("weight"), "tp_split", split)
        if linear.bias is not None:
            setattr(
                linear.get_parameter("bias"), "tp_split", Split(0, sections, axis.size, axis.rank)
            )
    return linear


def row_parallel(linear: nn.Module, axis: TensorAxis) -> nn.Module:
    """Make ``linear`` (an ``nn.Linear`` or ``Conv1D`` built with this rank's share of
    input features) row-parallel; its bias stays whole (replicated)."""
    if axis.size > 1:
        in_features, _, in_out = _in_out(linear)
        linear.__class__ = RowParallelConv1D if in_out else RowParallelLinear
        setattr(linear, "tensor_axis", axis)  # attributes torch's types do not declare
        split = Split(0 if in_out else 1, (in_features * axis.size,), axis.size, axis.rank)
        setattr(linear.get_parameter("weight"), "tp_split", split)
    return linear


def shard_rows(param: nn.Parameter, axis: TensorAxis) -> nn.Parameter:
    """Mark ``param`` (built with this rank's rows: one value per local head, gpt-oss's
    attention sinks) as this rank's contiguous block of the whole tensor's rows; a head's
    values meet only its own head, so their gradient is local (no collective)."""
    if axis.size > 1:
        rows = param.shape[0] * axis.size
        setattr(param, "tp_split", Split(0, (rows,), axis.size, axis.rank))
    return param


class _AxisRMSNorm(nn.Module):
    """Mixed into an RMSNorm class (``weight``, ``variance_epsilon``; first in its bases)
    that normalises a column-parallel output over its whole width (Zhang and Sennrich
    2019, RMSNorm: y = w x / sqrt(mean(x^2) + eps)) while this rank holds ``width`` of its
    ``whole_width`` = N features (OLMoE's q/k norms over all heads). With s = sum_r s_r,
    s_r = sum_i x_ri^2 over rank r's features and rho = (s/N + eps)^-1/2, y_ri = w_ri x_ri
    rho, so dL/dx_ri = g_ri w_ri rho + 2 x_ri dL/ds with dL/ds = -rho^3/(2N) sum_r sum_i
    g_ri w_ri x_ri: rank r holds only its own term of that sum. So s is summed over the
    axis forward and its gradient backward (:func:`~pp_ext.tp.axis.sum_over_axis`), one
    all-reduce of a [tokens, 1] statistic each way. The weight is cut with the features:
    its gradient, g_ri x_ri rho, is local and needs no sum."""

    tensor_axis: TensorAxis
    whole_width: int
    weight: nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype  # computed in fp32 and cast back, as HF's RMSNorm
        hidden = hidden_states.to(torch.float32)
        squares = sum_over_axis(hidden.pow(2).sum(-1, keepdim=True), self.tensor_axis)
        hidden = hidden * torch.rsqrt(squares / self.whole_width + self.variance_epsilon)
        return self.weight * hidden.to(input_dtype)


def rms_norm_over_axis(norm: nn.Module, width: int, axis: TensorAxis) -> nn.Module:
    """Make ``norm`` (an RMSNorm of a whole column-parallel output) normalise this rank's
    ``width`` features of it with the whole width's statistic (:class:`_AxisRMSNorm`),
    holding this rank's rows of its weight (loaded, or initialised whole and cut,
    :func:`load_parts`)."""
    if axis.size > 1:
        norm.weight = nn.Parameter(norm.get_parameter("weight").new_ones(width))  # RMSNorm's init
        norm.__class__ = mixed(
            _AxisRMSNorm,
            type(norm),
            "Axis",
            "over a width cut across the axis.",
        )
        setattr(norm, "tensor_axis", axis)  # attributes torch's types do not declare
        setattr(norm, "whole_width", width * axis.size)
        shard_rows(norm.weight, axis)
    return norm


class _SharedRopeKey(nn.Module):
    """Mixed into DeepSeek's multi-head latent attention (first in its bases; HF's
    ``expand_kv(kv_nope, k_rot)`` builds the heads' keys and values from the latents).
    The rotary key part k_rot (the paper's k^R, ``k_pe``) is one head shared by all heads,
    made whole on every rank by the replicated ``kv_a_proj_with_mqa``, and each rank's
    heads read it: it passes f, so its gradient is summed over the axis (the compressed
    latent's is summed by ``kv_b_proj``'s own f)."""

    tensor_axis: TensorAxis

    def expand_kv(self, kv_nope: torch.Tensor, k_rot: torch.Tensor):
        parent = super()
        return parent.expand_kv(kv_nope, copy_to_region(k_rot, self.tensor_axis))  # type: ignore[attr-defined]


def shared_rope_key(attention: nn.Module, axis: TensorAxis) -> nn.Module:
    """Make ``attention`` (DeepSeek's, built at this rank's heads) sum its shared rotary
    key's gradient over the axis (:class:`_SharedRopeKey`)."""
    if axis.size > 1:
        attention.__class__ = mixed(
            _SharedRopeKey,
            type(attention),
            "SharedRopeKey",
            "whose heads are cut.",
        )
        setattr(attention, "tensor_axis", axis)  # attributes torch's types do not declare
    return attention


class _VocabParallel(nn.Embedding):
    """Mixed into an ``nn.Embedding`` class holding rows ``[rank * n, (rank + 1) * n)``
    (first in its bases: ``super().forward`` is that class's lookup)."""

    tensor_axis: TensorAxis

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.tensor_axis.rank * self.num_embeddings
        outside = (local < 0) | (local >= self.num_embeddings)
        # the class's own lookup (Gemma's scales); a row's scale touches only its own ids
        out = super().forward(local.masked_fill(outside, 0))
        return reduce_from_region(out.masked_fill(outside.unsqueeze(-1), 0), self.tensor_axis)


def vocab_parallel_embedding(
    embedding: type[nn.Embedding],
    vocab_size: int,
    hidden_size: int,
    padding_idx: int | None,
    axis: TensorAxis,
    **kwargs,
) -> nn.Embedding:
    """``embedding(vocab_size, hidden_size, padding_idx, **kwargs)`` holding this rank's
    block of the (padded, :mod:`pp_ext.tp.vocab`) vocabulary's rows (the whole table
    with one rank and no padding)."""
    split = vocab_split(vocab_size, axis)
    if split is None:
        return embedding(vocab_size, hidden_size, padding_idx, **kwargs)
    rows = padded_vocab_size(vocab_size, axis) // axis.size
    start = axis.rank * rows
    local_pad = (
        padding_idx - start
        if padding_idx is not None and start <= padding_idx < start + rows
        else None
    )
    layer = embedding(rows, hidden_size, local_pad, **kwargs)
    layer.__class__ = mixed(
        _VocabParallel,
        embedding,
        "VocabParallel",
        "over a block of the vocabulary.",
    )
    setattr(layer, "tensor_axis", axis)  # attributes torch's types do not declare
    setattr(layer.weight, "tp_split", split)
    return layer


def vocab_parallel_head(hidden_size: int, vocab_size: int, axis: TensorAxis) -> nn.Linear:
    """An LM head without bias, column-parallel by (padded) vocabulary: this rank's block
    of its rows (all of them with one rank and no padding)."""
    split = vocab_split(vocab_size, axis)
    if split is None:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    rows = padded_vocab_size(vocab_size, axis) // axis.size
    head = nn.Linear(hidden_size, rows, bias=False)
    column_parallel(head, axis)  # marks it in place
    setattr(head.weight, "tp_split", split)  # the vocabulary's cut, padding included
    return head


def vocab_parallel_logits(
    hidden: torch.Tensor, weight: torch.Tensor, axis: TensorAxis
) -> torch.Tensor:
    """This rank's block of logits from its block of the vocabulary matrix (a tied head):
    a column-parallel GEMM whose output stays sharded for the parallel cross-entropy."""
    return torch.nn.functional.linear(copy_to_region(hidden, axis), weight)


def _summed(grad: torch.Tensor, axis: TensorAxis) -> torch.Tensor:
    return axis.all_reduce(grad.clone())


def sum_gradients(module: nn.Module, axis: TensorAxis) -> None:
    """Sum the gradients of ``module``'s replicated parameters over the axis as autograd
    makes them (Megatron's f applied to the weight). For a weight shared by all heads
    but applied by each rank to its own heads only (Qwen3's and Gemma3's per-head q/k
    norm), each rank's gradient covers its heads; the sum is the whole gradient, so
    the replicas stay equal."""
    if axis.size > 1:
        for param in module.parameters():
            param.register_hook(functools.partial(_summed, axis=axis))


def splits(layer: nn.Module) -> dict[str, Split]:
    """``state_dict`` name -> :class:`Split` of each sharded parameter of ``layer`` (on
    the tensor axis, ``tp_split``, or the expert axis, ``expert_split``: an expert group's
    part of the fused experts, :mod:`pp_ext.moe.dispatch`)."""
    return {
        name: split
        for name, param in layer.named_parameters()
        if (split := getattr(param, "tp_split", None) or getattr(param, "expert_split", None))
    }


def load_parts(layer: nn.Module, state: Mapping, strict: bool = True) -> None:
    """``layer.load_state_dict`` from whole tensors (or safetensors slices): each
    sharded parameter takes only its part. ``strict`` False: ``state`` may leave some
    of the layer's tensors out (never name one it lacks)."""
    cut = splits(layer)
    result = layer.load_state_dict(
        {
            name: cut[name].take(source) if name in cut else source[...]
            for name, source in state.items()
        },
        strict=strict,
    )
    if result.unexpected_keys:  # strict raised already; without it, still a wrong name
        raise KeyError(f"{type(layer).__name__} has no tensor {result.unexpected_keys[0]}")


def mark_replicated(module: nn.Module, axis: TensorAxis) -> None:
    """Mark the parameters every tensor rank holds whole (norms, row-parallel biases,
    q/k norms) ``ds_pipe_replicated`` on all but tensor rank 0, and the sharded ones
    ``tensor_model_parallel`` (Megatron's attribute, which DeepSpeed's
    ``is_model_parallel_parameter`` reads) on every rank, so gradient norms (pp-ext's
    fp32 clipping, DeepSpeed's bf16 and ZeRO paths, which count only tensor rank 0's
    parameters unless so marked) count every part once and each replica once."""
    if axis.size > 1:
        for param in module.parameters():
            # Megatron's and DeepSpeed's marks, attributes torch's Parameter does not declare
            if hasattr(param, "tp_split"):
                setattr(param, "tensor_model_parallel", True)
            elif axis.rank > 0:
                setattr(param, "ds_pipe_replicated", True)
