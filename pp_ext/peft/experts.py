"""LoRA on fused experts (PEFT's ``ParamWrapper``, ``peft.target_parameters``) under expert
parallelism (:mod:`pp_ext.moe.dispatch`: each rank of an expert group holds ``E / size``
of a layer's ``E`` routed experts).

PEFT adapts a fused ``[E, ...]`` tensor with one pair of factors for all of its experts
(``ParamWrapper.get_delta_weight`` reshapes ``lora_A`` [E r, in] to (E, r, in) and
``lora_B`` [out, r E] to (out, r, E)): expert e's A is rows ``e r ... e r + r - 1`` of
``lora_A``, its B columns ``e, e + E, ..., e + (r - 1) E`` of ``lora_B``. Built on a
rank's sharded experts PEFT makes the factors of its ``E / size`` experts in that
layout, which is exactly this rank's part of the whole adapter under
:func:`factor_cuts`: A's rows cut as the fused tensors are (one section of ``E r``), B's
columns section by section (``r`` sections of ``E``, each cut in ``size`` parts). The
factors are then expert parameters as the experts are (DeepSpeed's marks: their
gradients reduced over the expert-data group only, the optimizer's expert groups,
``expert_split`` for loading, checkpoints by expert and export).
"""

from __future__ import annotations

from collections.abc import Sequence

import peft
from packaging.version import Version
from peft.tuners.lora import LoraLayer, ParamWrapper
from torch import nn

from pp_ext.moe import dispatch
from pp_ext.moe.experts import DeferrableExperts
from pp_ext.tp import Split


def factor_cuts(wrapper: ParamWrapper, adapter: str, size: int, rank: int) -> tuple[Split, Split]:
    """``(lora_A's, lora_B's)`` cut into ``size`` parts by expert, of which part ``rank``
    holds experts ``rank * E / size ...`` (``E``: all the layer's experts)."""
    experts = wrapper.num_experts * dispatch.axis_of(wrapper.get_base_layer()).size
    r = wrapper.r[adapter]
    return Split(0, (experts * r,), size, rank), Split(1, (experts,) * r, size, rank)


def shard_factors(lora: LoraLayer, adapter: str) -> None:
    """Mark the factors of ``adapter`` on sharded experts as this expert rank's part of
    the whole adapter (:func:`factor_cuts`) and as expert parameters; nothing elsewhere."""
    if not isinstance(lora, ParamWrapper):
        return
    axis = dispatch.axis_of(lora.get_base_layer())
    if axis.size == 1:
        return
    cuts = factor_cuts(lora, adapter, axis.size, axis.rank)
    for factor, cut in zip((lora.lora_A[adapter], lora.lora_B[adapter]), cuts):
        dispatch.mark(getattr(factor, "weight"), cut, axis)


def expert_parts(layer: nn.Module, adapter: str) -> dict[str, Split]:
    """``state_dict`` name -> the cut into one part per expert (``size`` E, all the
    layer's experts) of each routed-expert tensor of ``layer``, sharded or not: the fused
    weights (and biases) by rows, PEFT's factors on them by :func:`factor_cuts`. What
    expert-parallel checkpoints are saved and merged by (:mod:`pp_ext.checkpoint.experts`)."""
    names = {id(param): name for name, param in layer.named_parameters(remove_duplicate=False)}
    parts = {}
    for module in layer.modules():
        if isinstance(module, DeferrableExperts):
            experts = int(getattr(module, "num_experts")) * dispatch.axis_of(module).size
            for param in module.parameters(recurse=False):
                parts[names[id(param)]] = Split(0, (experts,), experts, 0)
        elif isinstance(module, ParamWrapper) and adapter in module.lora_A:
            experts = int(module.num_experts) * dispatch.axis_of(module.get_base_layer()).size
            cuts = factor_cuts(module, adapter, experts, 0)
            for factor, cut in zip((module.lora_A[adapter], module.lora_B[adapter]), cuts):
                parts[names[id(getattr(factor, "weight"))]] = cut
    return parts


PARAMETERS_FIRST = Version(peft.__version__) >= Version("0.22")


def creation_order(loras: Sequence[LoraLayer]) -> list[LoraLayer]:
    """``loras`` (module order) in the order PEFT made them, so drew their random
    initialisation: its ``target_modules`` in module order and its ``target_parameters``
    (``BaseTuner._inject_parameters``), where the wrappers of one module's parameters
    nest, the first made innermost; peft 0.21 makes the modules' first, 0.22 the
    parameters' (measured: the draws replayed in each order, tests/test_peft_tensor_parallel.py)."""
    wrappers = [lora for lora in loras if isinstance(lora, ParamWrapper)]
    inner = {id(wrapper.base_layer) for wrapper in wrappers}
    modules = [lora for lora in loras if not isinstance(lora, ParamWrapper)]
    nested: list[LoraLayer] = []
    for wrapper in wrappers:
        if id(wrapper) in inner:
            continue
        nest: list[LoraLayer] = []
        module: nn.Module = wrapper
        while isinstance(module, ParamWrapper):  # outermost first
            nest.append(module)
            module = module.base_layer
        nested.extend(reversed(nest))
    return nested + modules if PARAMETERS_FIRST else modules + nested
