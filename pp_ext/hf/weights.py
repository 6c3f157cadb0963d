"""HF names: copying HF weights into built pipeline layers through each layer's
``hf_keys()`` (names of the HF model's ``state_dict``), and translating those names
to and from the keys of checkpoint files, which transformers may rename on load.

The mapping is the unit per-stage loading and export build on: a stage asks its own
layers which HF keys they need and reads only those.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.quantizers import AutoHfQuantizer, HfQuantizer
from transformers.utils.quantization_config import Mxfp4Config

from pp_ext import tp
from pp_ext.tp import Split


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


def dequantizer(config: PretrainedConfig) -> HfQuantizer | None:
    """Transformers' quantizer set to dequantize a checkpoint saved quantized, as
    ``from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))`` sets it: the
    hub's gpt-oss checkpoints store the experts' weights as MXFP4 (``*_blocks`` and
    ``*_scales``), which its converters turn into the model's bf16/fp32 tensors
    (``transformers.integrations.mxfp4.Mxfp4Dequantize``). None for plain tensors
    (no ``quantization_config``); another quantization is an error."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    method = stored.get("quant_method") if isinstance(stored, dict) else stored.quant_method
    if method != "mxfp4":
        raise ValueError(
            f"the checkpoint is quantized with {method!r}: pp-ext loads plain tensors or MXFP4 "
            f"(gpt-oss, dequantized); save the model unquantized (bf16) with transformers first"
        )
    merged = AutoHfQuantizer.merge_quantization_configs(stored, Mxfp4Config(dequantize=True))
    return AutoHfQuantizer.from_config(merged, pre_quantized=True)


def _converters(model: PreTrainedModel, quantizer: HfQuantizer | None = None) -> tuple[list, list]:
    transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    return (
        [t for t in transforms if isinstance(t, WeightRenaming)],
        [t for t in transforms if isinstance(t, WeightConverter)],
    )


@dataclass(frozen=True)
class Rows:
    """Rows ``start`` ... ``start + len(part) - 1`` (dim 0) of a tensor, the only ones read:
    an expert rank's experts, converted from the checkpoint's tensors of those experts
    alone. It stands for the whole tensor where :meth:`pp_ext.tp.Split.take` cuts this
    rank's part, and refuses any other rows (they were never read)."""

    part: torch.Tensor
    start: int

    def __getitem__(self, index) -> torch.Tensor:
        rows, *rest = index if isinstance(index, tuple) else (index,)
        stop = self.start + self.part.shape[0]
        if not (isinstance(rows, slice) and self.start <= rows.start and rows.stop <= stop):
            raise IndexError(f"rows {rows} of a tensor of which rows {self.start}:{stop} were read")
        return self.part[(slice(rows.start - self.start, rows.stop - self.start),) + tuple(rest)]


@dataclass
class Source:
    """The checkpoint tensors a model tensor is read from: one key, renamed at most
    (``converter`` None), or several that transformers' ``converter`` merges (one tensor
    per expert into the fused ``experts.gate_up_proj``), listed by the converter's source
    pattern they match, in transformers' key order (experts 0, 1, ..., 10)."""

    keys: dict[str | None, list[str]] = field(default_factory=dict)
    converter: WeightConverter | None = None

    def stored(self) -> list[str]:
        return [key for keys in self.keys.values() for key in keys]

    def read(
        self,
        name: str,
        get: Callable[[str, slice | None], torch.Tensor],
        model: PreTrainedModel,
        experts: Split | None = None,
    ) -> torch.Tensor | Rows:
        """The tensor ``name`` converted from the checkpoint's, ``get(key, rows)`` reading
        one checkpoint tensor (``rows`` None: whole). With ``experts`` (an expert rank's
        :class:`~pp_ext.tp.Split` of dim 0) only that rank's experts are read, as
        transformers' expert-parallel loading picks them (a tensor's place in its
        pattern's list is its expert, ``tensor_idx``): of one tensor per expert those of
        its experts, of one stored fused (gpt-oss's MXFP4 blocks and scales) its rows; the
        result is then their :class:`Rows`. Without a converter: the one tensor, whole."""
        if self.converter is None:
            return get(self.stored()[0], None)
        rows, whole = None, 0
        if experts is not None:
            whole = experts.sections[0]
            local = whole // experts.size
            rows = slice(experts.rank * local, (experts.rank + 1) * local)
        converter = copy.deepcopy(self.converter)  # collects this tensor's sources only
        for pattern, keys in self.keys.items():
            if rows is not None and len(keys) not in (1, whole):
                raise ValueError(
                    f"{name}: the checkpoint holds {len(keys)} tensors of {pattern!r} for "
                    f"{whole} experts: its weights do not match its config"
                )
            # one tensor per expert: this rank's; one fused tensor: its rows
            if rows is None or len(keys) == 1:
                chosen = [(key, rows) for key in keys]
            else:
                chosen = [(key, None) for key in keys[rows.start : rows.stop]]
            for key, part in chosen:  # a callable: transformers' synchronous loading calls it
                # patterns are str wherever there is a converter; the callable where
                # transformers annotates a Future is what its synchronous loading takes
                converter.add_tensor(name, key, pattern, functools.partial(get, key, part))  # type: ignore[arg-type]
        value = converter.convert(name, model=model, config=model.config)[name]
        return value if rows is None else Rows(value, rows.start)


def model_sources(
    checkpoint_keys: Iterable[str], model: PreTrainedModel, quantizer: HfQuantizer | None = None
) -> dict[str, Source]:
    """Each ``state_dict`` name of ``model`` that the checkpoint holds -> its :class:`Source`,
    renamed and converted as ``from_pretrained`` does (transformers' conversion mapping:
    GPT-NeoX's ``embed_out`` is the model's ``lm_head``; a base-model checkpoint lacks the
    ``model.`` prefix; an MoE checkpoint's per-expert tensors are the fused experts'; with
    a :func:`dequantizer`, gpt-oss's MXFP4 ``*_blocks`` and ``*_scales`` its experts')."""
    renamings, converters = _converters(model, quantizer)
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    own = model.state_dict()
    sources: dict[str, Source] = {}
    for key in sorted(checkpoint_keys, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if name not in own and key in own:
            name, pattern = key, None
        source = sources.setdefault(name, Source(converter=by_pattern.get(pattern)))
        source.keys.setdefault(pattern, []).append(key)
    return sources


def saved_form(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> dict:
    """``tensors`` (``state_dict`` names of ``model``) as ``save_pretrained`` writes them:
    transformers' ``revert_weight_conversion`` (renamed back, fused experts split into one
    tensor per expert), one model tensor at a time allowed."""
    return revert_weight_conversion(model, dict(tensors))


def checkpoint_names(names: Iterable[str], model: PreTrainedModel) -> dict[str, list[str]]:
    """Each ``state_dict`` name of ``model`` -> the keys ``save_pretrained`` writes for it
    (:func:`saved_form` of its meta tensor)."""
    own = model.state_dict()
    return {name: list(saved_form(model, {name: own[name]})) for name in names}
