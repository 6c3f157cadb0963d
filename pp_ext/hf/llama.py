"""Llama-like HF causal LMs (Llama, Mistral, Qwen2, Qwen3) as pipeline layers.

The math stays transformers' own: each family's decoder layer, RMSNorm and rotary
embedding classes are built and called here, so family details (Qwen2's qkv bias,
Qwen3's q/k norm, Mistral's sliding window) come with them. What this module adds
is the split into DeepSpeed layer specs where only tensors cross stages:

* the embedding stage turns ``input_ids`` (optionally with a 2D ``attention_mask``
  and ``position_ids``) into ``(hidden, position_ids, attention_mask)``; positions
  and mask are int64 so DeepSpeed sends them without gradients, and the mask is
  always sent (all ones when none was given) so every micro-batch has the same
  tensor shapes;
* every decoder layer rebuilds rotary ``(cos, sin)`` and its causal or sliding mask
  from those two int tensors, with the mask functions the HF model itself calls, so
  no float mask or rotary table crosses a stage;
* the final norm drops the int tensors and the LM head returns logits; a tied head
  (``config.tie_word_embeddings``) is a ``TiedLayerSpec`` sharing the embedding.

Each layer class has ``hf_keys()``: its ``state_dict`` names mapped to the HF
checkpoint keys, which :func:`pp_ext.hf.weights.copy_hf_weights` (and per-stage
loading) uses.
"""
from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class Family:
    """Where a family's HF classes live and which of its layers use a sliding window."""
    model_type: str
    prefix: str  # class name prefix in ``transformers.models.<model_type>.modeling_<model_type>``
    sliding: Callable[[PretrainedConfig, int], bool]

    def hf_class(self, suffix: str) -> type:
        module = importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")
        return getattr(module, self.prefix + suffix)


def _never(config: PretrainedConfig, layer_idx: int) -> bool:
    return False


def _sliding_window_set(config: PretrainedConfig, layer_idx: int) -> bool:
    """Mistral: every layer slides when ``sliding_window`` is set (MistralModel's choice)."""
    return config.sliding_window is not None


def _layer_type_sliding(config: PretrainedConfig, layer_idx: int) -> bool:
    """Qwen2/Qwen3: ``config.layer_types`` names each layer's mask."""
    return config.layer_types[layer_idx] == "sliding_attention"


FAMILIES = {f.model_type: f for f in (
    Family("llama", "Llama", _never),
    Family("mistral", "Mistral", _sliding_window_set),
    Family("qwen2", "Qwen2", _layer_type_sliding),
    Family("qwen3", "Qwen3", _layer_type_sliding),
)}


def _state_keys(module: nn.Module, local: str, hf: str) -> dict[str, str]:
    """``state_dict`` names under submodule ``local`` mapped to the same names under ``hf``."""
    return {name: hf + name.removeprefix(local) for name in module.state_dict()}


class Embedding(nn.Module):
    """Token embedding; also makes the int64 positions and padding mask the later stages read."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(self, inputs):
        input_ids, attention_mask, position_ids = (*inputs, None, None)[:3] if isinstance(inputs, tuple) \
            else (inputs, None, None)
        batch, length = input_ids.shape
        if position_ids is None:  # as the HF model: 0..length-1, whatever the padding
            position_ids = torch.arange(length, device=input_ids.device)
        position_ids = position_ids.expand(batch, length).long()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.embed_tokens(input_ids), position_ids, attention_mask.long()

    def hf_keys(self) -> dict[str, str]:
        return _state_keys(self, "embed_tokens.", "model.embed_tokens.")


class DecoderLayer(nn.Module):
    """One HF decoder layer, with its rotary embedding and mask rebuilt from int tensors."""

    def __init__(self, config: PretrainedConfig, family: Family, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.make_mask = create_sliding_window_causal_mask if family.sliding(config, layer_idx) \
            else create_causal_mask
        self.rotary_emb = family.hf_class("RotaryEmbedding")(config=config)
        self.layer = family.hf_class("DecoderLayer")(config, layer_idx)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        hidden, position_ids, attention_mask = inputs
        # An all-ones mask is no mask: only then do HF's mask functions look for
        # packed documents (position ids restarting) in position_ids.
        padding = None if bool(attention_mask.all()) else attention_mask
        mask = self.make_mask(config=self.config, inputs_embeds=hidden, attention_mask=padding,
                              past_key_values=None, position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        hidden = self.layer(hidden, attention_mask=mask, position_ids=position_ids,
                            position_embeddings=position_embeddings)
        return hidden, position_ids, attention_mask

    def hf_keys(self) -> dict[str, str]:
        return _state_keys(self, "layer.", f"model.layers.{self.layer_idx}.")


class FinalNorm(nn.Module):
    """The model's last RMSNorm; the int tensors stop here."""

    def __init__(self, config: PretrainedConfig, family: Family) -> None:
        super().__init__()
        self.norm = family.hf_class("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.norm(inputs[0])

    def hf_keys(self) -> dict[str, str]:
        return _state_keys(self, "norm.", "model.norm.")


class LMHead(nn.Module):
    """An untied LM head."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def hf_keys(self) -> dict[str, str]:
        return _state_keys(self, "lm_head.", "lm_head.")


def tied_head(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head tied to the embedding: logits from the embedding matrix."""
    return F.linear(hidden, embedding.embed_tokens.weight)


def layer_specs(config: PretrainedConfig, attn_implementation: str = "sdpa") -> list:
    """Embedding, one spec per decoder layer, final norm, LM head.

    ``config`` is copied and its ``_attn_implementation`` set: left None (as on a bare
    config), HF's mask functions return no mask and attention is not causal.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                         f"got {attn_implementation!r}")
    family = FAMILIES[config.model_type]
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    if config.tie_word_embeddings:
        embed = TiedLayerSpec("embed", Embedding, config, tied_weight_attr=["embed_tokens.weight"])
        head = TiedLayerSpec("embed", Embedding, config, forward_fn=tied_head,
                             tied_weight_attr=["embed_tokens.weight"])
    else:
        embed, head = LayerSpec(Embedding, config), LayerSpec(LMHead, config)
    decoders = [LayerSpec(DecoderLayer, config, family, i) for i in range(config.num_hidden_layers)]
    return [embed, *decoders, LayerSpec(FinalNorm, config, family), head]
