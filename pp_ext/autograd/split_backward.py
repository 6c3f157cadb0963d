"""Split backward: input gradients now (I), weight gradients later (W).

Zero-bubble schedules (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", ICLR,
Sec. 2) split the backward of a stage into the part the previous stage waits for,
the input gradient (the paper's B, pp-ext's I), and the part nobody waits for, the
weight gradient (W), and place W in bubbles. For a linear layer y = x W^T + b the
backward is two GEMMs of equal cost, grad_x = grad_y W and grad_W = grad_y^T x, so
deferring the second one halves the layer's I time instead of computing the whole
backward twice.

How: :func:`enable_split_backward` turns each ``torch.nn.Linear`` (and transformers'
``Conv1D``, GPT-2's linear layer with its weight stored transposed) into a
:class:`DeferrableLinear` / ``DeferrableConv1D`` by swapping the instance's class:
parameters stay the same objects, ``state_dict`` keys stay the same, torch itself is
not patched. A mixture of experts' stacked weights (transformers' fused
``experts.gate_up_proj`` / ``experts.down_proj``, one (out, in) matrix per expert, or
(in, out) in gpt-oss) go the same way through :func:`grouped_linear`, one grouped GEMM over the tokens sorted by
expert (:mod:`pp_ext.moe.experts`), whose weight GEMM, ``grad_W_e = grad_y_e^T x_e`` for
each expert's rows, is deferred alike. Their backward is an autograd Function that, inside
``store.defer(key)``, returns the input gradient and the bias gradient and queues
(weight, saved input, grad_output) under ``key``; :meth:`WeightGradStore.run` does
the queued weight GEMMs. Outside ``defer`` it computes every gradient at once, so the
fused B pass and ordinary training are unchanged.

What stays in I (the generic fallback): every gradient that is not a patched layer's
weight GEMM -- norm weights, embeddings, biases, layers not patched (subclasses of
Linear, which may have their own forward; weights used directly, like
``nn.MultiheadAttention``'s ``out_proj``), non-leaf weights (parametrizations), and
patched layers running under autocast. Autograd computes and accumulates those during
the I backward as usual. They are elementwise work and reductions, small next to the
GEMMs. Bias gradients stay in I on purpose: a reduction over grad_output costs about
1/in_features of the weight GEMM, and leaving it to autograd keeps its accumulation
exactly the ordinary one.

A frozen weight (``requires_grad`` off: the base layer inside peft's ``lora.Linear``)
has no W work: I computes its input gradient, W only the trainable weights' GEMMs (for
LoRA two small ones per adapted layer, Hu et al. 2021, "LoRA", arXiv:2106.09685). Each
layer keeps for backward only what its gradients use, as autograd's own linear does:
a frozen weight keeps no input alive.

Contracts:
- The queue holds references, not copies, of each layer's saved input and of its
  grad_output (the chunk's last layer may get the very tensor passed as
  ``grad_tensors``). Neither may be changed in place before ``run(key)``; an in-place
  torch op is detected through the version counters and raises.
- The active key is a plain attribute, not thread-local: on CUDA autograd runs
  backward functions on a device thread, not on the thread that called backward.
- Activation checkpointing (``torch.utils.checkpoint``, reentrant or not) works when
  the recomputation happens inside ``defer``: the queue keeps the recomputed inputs
  alive until W, as the fused backward keeps them until the layer's backward.
- ``run`` sets or adds to ``.grad`` directly, as AccumulateGrad does (same
  results), and fires no gradient hooks. A deferred weight's AccumulateGrad node still
  runs during I, with no gradient: its tensor hooks (``register_hook``) get ``None``
  and its post-accumulate-grad hooks see ``.grad`` without the deferred part.
  Optimizers that move ``.grad`` elsewhere in such hooks must pick the W part up
  from ``.grad`` after the last W. A weight
  that also gets a gradient in I (shared with an embedding) is accumulated twice,
  equal to the fused result within rounding.
- A patched model is bound to its store; a deep copy gets a copy of the store, so
  call :func:`enable_split_backward` on the copy to bind it to the store you run.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Hashable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pp_ext.tools.mixin import mixed

__all__ = [
    "WeightGradStore",
    "Bindable",
    "Deferrable",
    "DeferrableLinear",
    "enable_split_backward",
    "grouped_linear",
]


class _Work(NamedTuple):
    weight: nn.Parameter
    input: torch.Tensor
    grad_output: torch.Tensor
    weight_in_out: bool  # Conv1D stores its weight as (in, out)
    versions: tuple[int, int]
    offsets: torch.Tensor | None = None  # a grouped weight: where each group's rows end


def _weight_grad(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    weight_in_out: bool,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight GEMM, leading dims flattened; the same products, in the same operand
    order, as autograd's backward of ``F.linear`` / ``torch.addmm``, so bit-exact. With
    ``offsets`` one GEMM per group of rows, (groups, out, in) or with ``weight_in_out``
    (groups, in, out), as autograd's backward of ``F.grouped_mm`` computes it."""
    if offsets is not None:
        if weight_in_out:
            return F.grouped_mm(input.t(), grad_output, offs=offsets)
        return F.grouped_mm(grad_output.t(), input, offs=offsets)
    x = input.reshape(-1, input.size(-1))
    g = grad_output.reshape(-1, grad_output.size(-1))
    return x.t().mm(g) if weight_in_out else g.t().mm(x)


class WeightGradStore:
    """Deferred weight-gradient work, keyed by an opaque hashable key (the engine uses
    (chunk, micro_batch)): the W passes of Qi et al. 2024, "Zero Bubble Pipeline
    Parallelism", Sec. 2."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, list[_Work]] = {}
        # a flag, not a sentinel key: None is a valid key, and a sentinel object would
        # not survive pickling or deepcopy of a patched model
        self._deferring = False
        self._key: Hashable = None

    @contextlib.contextmanager
    def defer(self, key: Hashable):
        """While active, deferrable layers' backward computes grad_input (and the bias
        grad) only and queues their weight-grad work under ``key``."""
        previous = self._deferring, self._key
        self._deferring, self._key = True, key
        try:
            yield self
        finally:
            self._deferring, self._key = previous

    def _queue(
        self,
        weight: nn.Parameter,
        input: torch.Tensor,
        grad_output: torch.Tensor,
        weight_in_out: bool,
        offsets: torch.Tensor | None = None,
    ) -> None:
        versions = (input._version, grad_output._version)
        self._queues.setdefault(self._key, []).append(
            _Work(weight, input, grad_output, weight_in_out, versions, offsets)
        )

    def run(self, key: Hashable) -> None:
        """The W pass: compute and accumulate all work queued under ``key``, in queue
        order. Nothing queued (a chunk without linear layers) is not an error."""
        work = deque(self._queues.pop(key, ()))
        while work:
            item = work.popleft()  # drop each saved input as soon as it is used
            if (item.input._version, item.grad_output._version) != item.versions:
                raise RuntimeError(
                    f"split backward: a tensor saved for the W pass of {key!r} was modified in "
                    "place after the I pass (a reused activation or gradient buffer?); keep it "
                    "unchanged until run() or use the fused backward"
                )
            with torch.no_grad():
                grad = _weight_grad(item.input, item.grad_output, item.weight_in_out, item.offsets)
                if item.weight.grad is None:
                    item.weight.grad = grad
                else:
                    item.weight.grad += grad

    def pending(self) -> list:
        """Keys with queued work (empty when every I has had its W)."""
        return list(self._queues)

    def clear(self) -> None:
        self._queues.clear()


class _SplitLinear(torch.autograd.Function):
    """y = x W^T + b (or x W + b for Conv1D) whose weight GEMM can be deferred."""

    @staticmethod
    def forward(ctx, input, weight, bias, store, weight_in_out):
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        # only what backward uses, as autograd's own linear saves: a frozen weight (LoRA's
        # base layer) keeps no input alive, an input without grad keeps no weight
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        ctx.input_shape, ctx.store, ctx.weight_in_out = input.shape, store, weight_in_out
        # the parameter itself, which W accumulates into: under non-reentrant checkpointing
        # the saved weight unpacks as a recomputed alias. A non-leaf weight is not deferred:
        # its gradient must flow on through the graph during I.
        ctx.param = weight if weight.is_leaf else None
        return dense(input, weight, bias, weight_in_out)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        g = grad_output.reshape(-1, grad_output.size(-1))
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            grad_input = g.mm(weight.t() if ctx.weight_in_out else weight).view(ctx.input_shape)
        if needs_bias:
            grad_bias = g.sum(0)
        if needs_weight:
            if ctx.store._deferring and ctx.param is not None:
                ctx.store._queue(ctx.param, input, grad_output, ctx.weight_in_out)
            else:
                grad_weight = _weight_grad(input, grad_output, ctx.weight_in_out)
        return grad_input, grad_weight, grad_bias, None, None


def _grouped(input: torch.Tensor, weight: torch.Tensor, offsets, weight_in_out: bool):
    """Group g's rows of ``input`` times its matrix: ``weight[g]`` stored (in, out), or
    ``weight[g]^T`` stored (out, in)."""
    return F.grouped_mm(input, weight if weight_in_out else weight.transpose(-2, -1), offs=offsets)


class _SplitGroupedLinear(torch.autograd.Function):
    """Rows of ``input`` sorted by group, group g's rows (up to ``offsets[g]``) times
    ``weight[g]^T`` (``weight`` stacked (groups, out, in); ``weight_in_out``: times
    ``weight[g]``, stacked (groups, in, out)), whose weight GEMM can be deferred."""

    @staticmethod
    def forward(ctx, input, weight, offsets, store, weight_in_out):
        ctx.save_for_backward(input, weight, offsets)
        ctx.store, ctx.weight_in_out = store, weight_in_out
        ctx.param = weight if weight.is_leaf else None  # as _SplitLinear's
        return _grouped(input, weight, offsets, weight_in_out)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, offsets = ctx.saved_tensors
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        grad_input = grad_weight = None
        if needs_input:
            # times each group's matrix transposed: (in, out) -> (out, in) and back
            grad_input = _grouped(grad_output, weight, offsets, not ctx.weight_in_out)
        if needs_weight:
            if ctx.store._deferring and ctx.param is not None:
                ctx.store._queue(ctx.param, input, grad_output, ctx.weight_in_out, offsets)
            else:
                grad_weight = _weight_grad(input, grad_output, ctx.weight_in_out, offsets)
        return grad_input, grad_weight, None, None, None


def grouped_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    store: WeightGradStore | None,
    weight_in_out: bool = False,
) -> torch.Tensor:
    """``input``'s rows, sorted by group, each times its group's ``weight[g]^T``
    (``weight`` (groups, out, in), group g's rows ending at ``offsets[g]``; with
    ``weight_in_out`` times ``weight[g]``, stored (groups, in, out) as gpt-oss's experts
    are, ``is_transposed`` in transformers): one grouped GEMM, as transformers'
    ``grouped_mm`` experts compute it; the weight GEMM goes to the W pass of ``store``
    (None: computed with the rest, as autograd would)."""
    input = input.to(weight.dtype)  # grouped_mm does not autocast (transformers casts too)
    if store is None:
        return _grouped(input, weight, offsets, weight_in_out)
    return _SplitGroupedLinear.apply(input, weight, offsets, store, weight_in_out)


def dense(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_in_out: bool
) -> torch.Tensor:
    """y = x W^T + b (``nn.Linear``) or x W + b (``Conv1D``, weight stored (in, out)),
    as those layers compute it; ``bias`` None adds nothing."""
    if not weight_in_out:
        return F.linear(input, weight, bias)
    flat = input.view(-1, input.size(-1))
    out = flat.mm(weight) if bias is None else torch.addmm(bias, flat, weight)
    return out.view(*input.shape[:-1], weight.size(1))


class Bindable:
    """A module whose weight GEMMs go to the W pass of the store
    :func:`enable_split_backward` binds it to (``_wgrad_store``; None: unbound)."""

    _wgrad_store: WeightGradStore | None = None


class Deferrable(Bindable):
    """A linear layer (mixed into ``nn.Linear`` or ``Conv1D``) whose weight GEMM goes
    to the W pass once :func:`enable_split_backward` binds it to a store; subclasses
    (pp-ext's tensor-parallel layers) compute through :meth:`dense`."""

    _weight_in_out = False
    # the linear's own, typed as torch types them (bias: None on a layer without one)
    weight: torch.Tensor
    bias: nn.Parameter

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.dense(input, self.bias)

    def dense(self, input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``input`` through this layer's weight and ``bias`` (None: no bias)."""
        # autocast would cast inside the Function and leave backward with mixed dtypes:
        # compute as the ordinary layer does instead (generic fallback)
        if self._wgrad_store is None or torch.is_autocast_enabled(input.device.type):
            return dense(input, self.weight, bias, self._weight_in_out)
        return _SplitLinear.apply(input, self.weight, bias, self._wgrad_store, self._weight_in_out)


class DeferrableLinear(Deferrable, nn.Linear):
    """``nn.Linear`` whose weight GEMM goes to the W pass inside ``store.defer``."""


def _deferrable_conv1d(conv1d: type) -> type:
    return mixed(
        Deferrable,
        conv1d,
        "Deferrable",
        "(transformers', weight stored (in, out)) with a deferrable weight GEMM.",
        _weight_in_out=True,
    )


def __getattr__(name: str):
    # DeferrableConv1D is built on first use so that importing this module does not
    # import transformers; resolving it here keeps patched GPT-2 models picklable
    if name == "DeferrableConv1D":
        from transformers.pytorch_utils import Conv1D

        return _deferrable_conv1d(Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable_split_backward(module: nn.Module, store: WeightGradStore) -> int:
    """Make every ``torch.nn.Linear`` (exact type) and transformers ``Conv1D`` inside
    ``module`` deferrable through ``store`` (Qi et al. 2024, "Zero Bubble Pipeline
    Parallelism", Sec. 2). Returns the number of deferrable layers in ``module``.

    Idempotent: layers already deferrable (pp-ext's tensor-parallel layers and MoE
    experts included: they subclass :class:`Bindable`) are counted and bound to ``store``
    again.
    Subclasses of Linear are left alone (their forward may differ); their gradients
    come in I.
    """
    classes: dict[type, type] = {nn.Linear: DeferrableLinear}
    # if transformers is not loaded, the module holds no Conv1D
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None:
        classes[conv1d] = _deferrable_conv1d(conv1d)
    count = 0
    for layer in module.modules():
        if type(layer) in classes:
            layer.__class__ = classes[type(layer)]
        if isinstance(layer, Bindable):
            layer._wgrad_store = store
            count += 1
    return count
