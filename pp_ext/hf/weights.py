"""HF names: copying HF weights into built pipeline layers through each layer's
``hf_keys()`` (names of the HF model's ``state_dict``), and translating those names
to and from the keys of checkpoint files, which transformers may rename on load.

The mapping is the unit per-stage loading and export build on: a stage asks its own
layers which HF keys they need and reads only those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)

from pp_ext import tp


def copy_hf_weights(layers: Iterable[nn.Module], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state_dict`` (HF names, e.g. ``model.state_dict()``) into ``layers``.

    Values are whole tensors, or safetensors slices (``get_slice``) read here. A
    tensor-parallel layer's sharded parameters take only their part
    (:meth:`pp_ext.tp.Split.take`, which reads no more of a slice than that). Every entry of every layer's own ``state_dict`` must be mapped and present: a
    silently skipped tensor would leave a randomly initialised weight behind. A
    module listed twice (a tied embedding and head) is copied twice, harmlessly.
    """
    for layer in layers:
        keys, own = hf_keys(layer), layer.state_dict()
        if unmapped := sorted(set(own) - set(keys)):
            raise KeyError(f"{type(layer).__name__} has no HF key for {unmapped}")
        if missing := sorted(k for k in keys.values() if k not in state_dict):
            raise KeyError(f"HF state dict lacks {missing} needed by {type(layer).__name__}")
        tp.load_parts(layer, {local: state_dict[hf] for local, hf in keys.items()})


def hf_keys(layer: nn.Module) -> dict[str, str]:
    """``layer.hf_keys()``: every family's pipeline layer maps its ``state_dict`` names to
    HF checkpoint keys, a method the engine's layers (typed ``nn.Module``) do not declare."""
    keys: Callable[[], dict[str, str]] = getattr(layer, "hf_keys")
    return keys()


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The HF model of ``config`` on the meta device: its own names, shapes, ties and
    ``_init_weights``, for no memory and no initialisation."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _split(transforms: list) -> tuple[list, list]:
    return (
        [t for t in transforms if isinstance(t, WeightRenaming)],
        [t for t in transforms if isinstance(t, WeightConverter)],
    )


def _renamed(
    keys: Iterable[str], rename: Callable[[str], tuple[str, str | None]]
) -> dict[str, str]:
    names = {}
    for key in keys:
        name, converter = rename(key)
        if converter is not None:  # a tensor built from several (fused experts, split qkv...)
            raise ValueError(
                f"tensor {key!r} needs transformers' weight conversion ({converter!r}): pp-ext maps "
                f"checkpoint tensors one to one (renamed at most)"
            )
        names[key] = name
    return names


def model_names(checkpoint_keys: Iterable[str], model: PreTrainedModel) -> dict[str, str]:
    """Each checkpoint key -> the model's ``state_dict`` name, renamed as ``from_pretrained``
    renames it (transformers' conversion mapping: e.g. GPT-NeoX's ``embed_out`` is the
    model's ``lm_head``; a base-model checkpoint lacks the ``model.`` prefix)."""
    renamings, converters = _split(get_model_conversion_mapping(model))
    own = model.state_dict()

    def rename(key: str) -> tuple[str, str | None]:
        name, converter = rename_source_key(
            key, renamings, converters, model.base_model_prefix, own
        )
        return (key, None) if name not in own and key in own else (name, converter)

    return _renamed(checkpoint_keys, rename)


def checkpoint_names(names: Iterable[str], model: PreTrainedModel) -> dict[str, str]:
    """Each ``state_dict`` name of ``model`` -> the key ``save_pretrained`` writes for it:
    the conversion mapping reversed, without its legacy renamings and prefix changes
    (as transformers' ``revert_weight_conversion`` does for a model not loaded from disk)."""
    transforms = [
        t.reverse_transform()
        for t in get_model_conversion_mapping(model, add_legacy=False)[::-1]
        if not isinstance(t, PrefixChange)
    ]
    renamings, converters = _split(transforms)
    return _renamed(names, lambda key: rename_source_key(key, renamings, converters, reverse=True))
