"""LoRA adapters on a pipeline stage's own layers, with PEFT's layers and PEFT's names.

A stage holds a few of the model's layers, never the whole ``PreTrainedModel`` that
``peft.get_peft_model`` wraps, so the choice of modules is made on the full model
(:func:`~pp_ext.peft.config.target_names`, PEFT's rules) and each layer then gets PEFT's
own ``lora.Linear`` on the targets it holds (``inject_adapter_in_model`` with the
layer's local names), initialised under ``seed + global layer index`` so the adapters
do not depend on the layout. Every other parameter is frozen (``requires_grad=False``,
kept in the model's dtype): no gradient, no fp32 master copy, no optimizer state.
``modules_to_save`` (PEFT's name for modules trained in full, e.g. the LM head) stay
trainable in place. On tensor-parallel layers the factors are cut as Megatron cuts
them, with their own reductions (:mod:`pp_ext.peft.parallel`).

PEFT's keys (``adapter_model.safetensors``): a layer's HF module name ``m`` (from its
``hf_keys()``) gives ``base_model.model.m.lora_A.weight`` for the adapter PEFT names
``lora_A.default`` in memory, and ``base_model.model.m.weight`` for a module saved
whole. Hu et al. 2021, "LoRA", arXiv:2106.09685: ``h = W x + (lora_alpha / r) B A x``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.runtime.utils import set_random_seed
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from pp_ext import tp
from pp_ext.engine.module import ChunkedPipelineModule, layer_parameters
from pp_ext.hf.loading import indexed_layers, load_config
from pp_ext.peft.config import (
    PeftError,
    converted,
    lora_config,
    peft_model_warnings,
    saved_names,
    target_names,
    target_parameters,
)
from pp_ext.peft.experts import shard_factors
from pp_ext.peft.parallel import initialise_a, parallel_factors

PREFIX = "base_model.model."  # PEFT's prefix: PeftModel -> LoraModel -> the HF model
ADAPTER = "default"  # the adapter name PEFT gives when none is asked for
BASE = ".base_layer"  # where PEFT's lora layer keeps the wrapped one


def is_adapter(name: str) -> bool:
    """A ``state_dict`` / parameter name inside PEFT's lora layer that is the adapter's."""
    return ".lora_A." in name or ".lora_B." in name


def unwrapped(name: str) -> tuple[str, str]:
    """A module name seen through PEFT's wrapping, and the ``.base_layer`` suffixes it
    had: ``q_proj.base_layer`` is ``q_proj``; nested ``ParamWrapper`` s (one per adapted
    parameter of a module) give ``experts.base_layer.base_layer``."""
    bare = name.replace(BASE, "")
    return bare, name[len(bare) :] if name.endswith(BASE) else ""


def hf_modules(layer: nn.Module) -> dict[str, str]:
    """Local name of each submodule with a parameter -> its HF module name (from
    ``hf_keys``), seen through PEFT's wrapping (:func:`unwrapped`)."""
    names, hf_keys = {}, getattr(layer, "hf_keys")  # every family's layer has one (pp_ext/hf)
    for local, hf in hf_keys().items():
        module = local.rpartition(".")[0]
        if not is_adapter(local):
            names[unwrapped(module)[0]] = unwrapped(hf.rpartition(".")[0])[0]
    return names


def hf_parameters(layer: nn.Module) -> dict[str, str]:
    """Local name of each parameter, its module seen through PEFT's wrapping -> its HF
    name: what ``target_parameters`` match."""
    modules, names = hf_modules(layer), {}
    for local in getattr(layer, "hf_keys")():
        module, _, leaf = local.rpartition(".")
        if not is_adapter(local):
            bare = unwrapped(module)[0]
            names[f"{bare}.{leaf}"] = f"{modules[bare]}.{leaf}"
    return names


def peft_keys(layer: nn.Module) -> dict[str, str]:
    """Each trainable tensor of ``layer`` (``state_dict`` name) -> its key in PEFT's
    ``adapter_model.safetensors``."""
    modules = hf_modules(layer)
    keys = {}
    for name, param in layer.named_parameters():
        if not param.requires_grad:
            continue
        module, _, leaf = name.rpartition(".")
        if is_adapter(name):  # <m>.lora_A.default.weight -> <hf m>.lora_A.weight
            owner, part, _ = module.rsplit(".", 2)
            bare, wrapped = unwrapped(owner)  # an inner ParamWrapper keeps its .base_layer
            keys[name] = f"{PREFIX}{modules[bare]}{wrapped}.{part}.{leaf}"
        else:
            keys[name] = f"{PREFIX}{modules[unwrapped(module)[0]]}.{leaf}"
    return keys


def _indexed(layers: Iterable[tuple[int, nn.Module]]) -> list[tuple[int, nn.Module]]:
    """Each module once, at its first (lowest) global index (a tied embedding and head)."""
    first: dict[int, tuple[int, nn.Module]] = {}
    for idx, layer in sorted(layers, key=lambda pair: pair[0]):
        first.setdefault(id(layer), (idx, layer))
    return list(first.values())


@dataclass(frozen=True)
class Targets:
    """What a LoRA config selects on one model, by PEFT's rules on the full model: the
    HF module names to wrap (``lora``), to train whole (``whole``) and the HF parameter
    names adapted directly (``parameters``: ``target_parameters``, an MoE model's fused
    experts)."""

    config: LoraConfig
    lora: frozenset[str]
    whole: frozenset[str]
    parameters: frozenset[str] = frozenset()

    @classmethod
    def of(cls, lora: LoraConfig, config: PretrainedConfig) -> Targets:
        return cls(
            converted(lora, config),  # PEFT's ranks for fused experts (rank_pattern)
            frozenset(target_names(lora, config)),
            frozenset(saved_names(lora, config)),
            frozenset(target_parameters(lora, config)),
        )


def add_adapters(
    layers: Iterable[tuple[int, nn.Module]], targets: Targets, seed: int
) -> list[nn.Module]:
    """Wrap the targets among ``layers`` (``(global index, layer)`` pairs, a stage's own)
    in PEFT's lora layers and freeze all but the adapters and ``modules_to_save``. Returns
    the layers, each once."""
    out = []
    for idx, layer in _indexed(layers):
        modules = hf_modules(layer)
        local = sorted(name for name, hf in modules.items() if hf in targets.lora)
        params = sorted(n for n, hf in hf_parameters(layer).items() if hf in targets.parameters)
        if local or params:
            set_random_seed(seed + idx)  # PEFT draws from torch's generator (A, B at local shapes)
            config_here = LoraConfig(
                **{
                    **targets.config.to_dict(),
                    "target_modules": local,
                    "target_parameters": params or None,
                    "modules_to_save": None,
                }
            )
            with peft_model_warnings():
                inject_adapter_in_model(config_here, layer, adapter_name=ADAPTER)
            loras = [m for m in layer.modules() if isinstance(m, LoraLayer)]  # PEFT's order
            for lora in loras:
                parallel_factors(lora, ADAPTER)
                shard_factors(lora, ADAPTER)  # on an expert rank's experts: its part
            if targets.config.init_lora_weights is True:  # PEFT's default: A random, B zero
                initialise_a(loras, ADAPTER, seed + idx)
        for name, param in layer.named_parameters():
            module = name.rpartition(".")[0].removesuffix(BASE)
            param.requires_grad_(is_adapter(name) or modules.get(module) in targets.whole)
        out.append(layer)
    return out


def planned_parameters(specs: list, section, config: PretrainedConfig) -> list[tuple[int, int]]:
    """(frozen, trainable) parameters of each pipeline layer of ``specs`` under the
    recipe's ``peft`` section, counted on the meta device with the adapters each stage
    adds (:func:`add_adapters`); full fine-tuning (type none) freezes nothing."""
    if section.type != "lora":
        return layer_parameters(specs)
    targets = Targets.of(lora_config(section, config), config)
    return layer_parameters(specs, lambda index, layer: add_adapters([(index, layer)], targets, 0))


def adapter_layers(layers: Iterable[nn.Module]) -> int:
    """How many of PEFT's lora layers ``layers`` hold."""
    return sum(isinstance(m, BaseTunerLayer) for layer in layers for m in layer.modules())


@torch.no_grad()
def load_adapter(layers: Iterable[nn.Module], adapter_path: str | Path) -> int:
    """Copy into ``layers``' trainable tensors their values from the PEFT folder
    ``adapter_path``, reading only those keys; returns how many were read. A key the
    stage needs and the file lacks is a :class:`PeftError`."""
    path = Path(adapter_path) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        raise PeftError(
            f"peft.adapter_path {adapter_path} holds no {SAFETENSORS_WEIGHTS_NAME}: save the "
            f"adapter with save_pretrained (safetensors)"
        )
    read = 0
    with safe_open(path, framework="pt") as handle:
        stored = set(handle.keys())
        for layer in layers:
            keys = peft_keys(layer)
            for key in keys.values():
                if key not in stored:
                    raise PeftError(
                        f"peft.adapter_path {adapter_path} has no tensor {key}: the adapter "
                        f"targets other modules than peft.target_modules / modules_to_save; "
                        f"set them as the adapter was made"
                    )
            # a factor cut over tensor ranks reads only its part (pp_ext.peft.parallel)
            tp.load_parts(
                layer, {name: handle.get_slice(key) for name, key in keys.items()}, strict=False
            )
            read += len(keys)
    return read


def apply_lora(module: ChunkedPipelineModule, section, model: str | Path, seed: int) -> int:
    """The recipe's ``peft`` section (``section``, type lora) on this rank's layers of
    ``module``, built from ``model``: adapters added, initialised or read from
    ``adapter_path``, the rest frozen. Local to the rank (a :class:`PeftError` here may be
    one rank's alone); the caller then calls ``module.parameters_changed()``, a collective.
    Returns the number of trainable parameters on this rank."""
    config = load_config(model)
    targets = Targets.of(lora_config(section, config), config)
    layers = add_adapters(indexed_layers(module), targets, seed)
    if section.adapter_path is not None:
        load_adapter(layers, section.adapter_path)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:  # an optimizer needs something to step
        raise PeftError(
            f"pipeline rank {module.stage_id} holds no module that LoRA trains (peft.target_modules "
            f"{section.target_modules!r}): target more modules (all-linear) or use fewer stages"
        )
    return trainable
