"""Llama-like HF causal LMs (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 text,
Phi3) as pipeline layers.

The math stays transformers' own: each family's decoder layer, RMSNorm, rotary and
(Gemma) scaled embedding classes are built and called here, so family details come
with them: Qwen2's qkv bias, Qwen3's and Gemma3's q/k norm, Mistral's sliding window,
Gemma's (1 + w) RMSNorm and sqrt(hidden_size) embedding scale, Gemma2/3's attention
soft-capping and pre/post feed-forward norms, Phi3's fused qkv/gate_up projections
and longrope/partial rotary. What this module adds is the split into DeepSpeed layer
specs where only tensors cross stages:

* the embedding stage turns ``input_ids`` (optionally with a 2D ``attention_mask``
  and ``position_ids``) into ``(hidden, position_ids, attention_mask)``; positions
  and mask are int64 so DeepSpeed sends them without gradients, and the mask is
  always sent (all ones when none was given) so every micro-batch has the same
  tensor shapes;
* every decoder layer rebuilds rotary ``(cos, sin)`` (Gemma3: the table of its own
  layer type, local or global) and its causal or sliding mask from those two int
  tensors, with the mask functions the HF model itself calls, so no float mask or
  rotary table crosses a stage;
* the final norm drops the int tensors and the LM head returns logits, soft-capped
  where the config sets ``final_logit_softcapping`` (Gemma2/3); a tied head
  (``config.tie_word_embeddings``) is a ``TiedLayerSpec`` sharing the embedding.

Each layer class has ``hf_keys()``: its ``state_dict`` names mapped to the HF
checkpoint keys, which :func:`pp_ext.hf.weights.copy_hf_weights` (and per-stage
loading) uses.
"""
from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# Each implementation with the HF ``PreTrainedModel`` flag that says a family supports it
# (eager always works).
ATTN_IMPLEMENTATIONS = {"sdpa": "_supports_sdpa", "eager": None, "flash_attention_2": "_supports_flash_attn"}


@dataclass(frozen=True)
class Family:
    """Where a family's HF classes live and what their model code does differently.

    ``scaled_embedding``: the model embeds with HF's ``<prefix>TextScaledWordEmbedding``
    scaled by sqrt(hidden_size) (GemmaModel, Gemma2Model, Gemma3TextModel).
    ``rope_per_layer_type``: the rotary module holds one table per layer type and is
    called with it (Gemma3TextModel: local rope for sliding layers, global for full).
    """
    model_type: str
    prefix: str  # class name prefix in ``transformers.models.<package>.modeling_<package>``
    sliding: Callable[[PretrainedConfig, int], bool]
    package: str = ""  # when not ``model_type`` (gemma3_text lives in gemma3)
    scaled_embedding: bool = False
    rope_per_layer_type: bool = False

    def hf_class(self, suffix: str) -> type:
        package = self.package or self.model_type
        module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
        return getattr(module, self.prefix + suffix)


def _never(config: PretrainedConfig, layer_idx: int) -> bool:
    return False


def _sliding_window_set(config: PretrainedConfig, layer_idx: int) -> bool:
    """Mistral, Phi3: every layer slides when ``sliding_window`` is set (MistralModel's and
    Phi3Model's choice)."""
    return config.sliding_window is not None


def _layer_type_sliding(config: PretrainedConfig, layer_idx: int) -> bool:
    """Qwen2/Qwen3/Gemma2/Gemma3: ``config.layer_types`` names each layer's mask."""
    return config.layer_types[layer_idx] == "sliding_attention"


FAMILIES = {f.model_type: f for f in (
    Family("llama", "Llama", _never),
    Family("mistral", "Mistral", _sliding_window_set),
    Family("qwen2", "Qwen2", _layer_type_sliding),
    Family("qwen3", "Qwen3", _layer_type_sliding),
    Family("gemma", "Gemma", _never, scaled_embedding=True),
    Family("gemma2", "Gemma2", _layer_type_sliding, scaled_embedding=True),
    Family("gemma3_text", "Gemma3", _layer_type_sliding, package="gemma3", scaled_embedding=True,
           rope_per_layer_type=True),
    Family("phi3", "Phi3", _sliding_window_set),
)}


def _state_keys(module: nn.Module, local: str, hf: str) -> dict[str, str]:
    """``state_dict`` names under submodule ``local`` mapped to the same names under ``hf``."""
    return {name: hf + name.removeprefix(local) for name in module.state_dict()}


class Embedding(nn.Module):
    """Token embedding; also makes the int64 positions and padding mask the later stages read."""

    def __init__(self, config: PretrainedConfig, family: Family) -> None:
        super().__init__()
        if family.scaled_embedding:
            # HF's own class and scale, as the Gemma models build it: the factor is cast
            # to the weight dtype before multiplying (sqrt(3072) becomes 55.5 in bf16).
            self.embed_tokens = family.hf_class("TextScaledWordEmbedding")(
                config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5)
        else:
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
        # Gemma3 keeps a local and a global table in one module; this layer asks for its own.
        self.rope_kwargs = {"layer_type": config.layer_types[layer_idx]} if family.rope_per_layer_type else {}
        self.layer = family.hf_class("DecoderLayer")(config, layer_idx)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        hidden, position_ids, attention_mask = inputs
        # An all-ones mask is no mask: only then do HF's mask functions look for
        # packed documents (position ids restarting) in position_ids.
        padding = None if bool(attention_mask.all()) else attention_mask
        mask = self.make_mask(config=self.config, inputs_embeds=hidden, attention_mask=padding,
                              past_key_values=None, position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids, **self.rope_kwargs)
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


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final logit soft-capping, ``cap * tanh(logits / cap)``, which keeps logits inside
    (-cap, cap) (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical
    Size", sec. 2.2); ``cap`` None leaves them alone. The operations run in the order of
    ``Gemma2ForCausalLM.forward`` so the result is HF's to the bit."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _final_softcap(config: PretrainedConfig) -> float | None:
    return getattr(config, "final_logit_softcapping", None)  # only Gemma2/3 configs have it


class LMHead(nn.Module):
    """An untied LM head."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cap = _final_softcap(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(hidden), self.cap)

    def hf_keys(self) -> dict[str, str]:
        return _state_keys(self, "lm_head.", "lm_head.")


def tied_head(embedding: Embedding, hidden: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """The LM head tied to the embedding: logits from the embedding matrix (unscaled, as
    HF's tied ``lm_head``), soft-capped at ``cap``."""
    return softcap(F.linear(hidden, embedding.embed_tokens.weight), cap)


def _attn_implementation(family: Family, requested: str | None) -> str:
    """HF's own default when ``requested`` is None: sdpa where the family's model supports
    it, else eager (``PreTrainedModel.get_correct_attn_implementation``; Gemma2 has no sdpa
    because sdpa cannot soft-cap attention logits). A requested one HF refuses is an error."""
    model_class = family.hf_class("PreTrainedModel")
    if requested is None:
        return "sdpa" if model_class._supports_sdpa else "eager"
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                         f"got {requested!r}")
    flag = ATTN_IMPLEMENTATIONS[requested]
    if flag is not None and not getattr(model_class, flag):
        raise ValueError(f"{family.model_type} models do not support attn_implementation {requested!r} "
                         f"(transformers' {model_class.__name__} refuses it): use 'eager' or leave it unset")
    return requested


def layer_specs(config: PretrainedConfig, attn_implementation: str | None = None) -> list:
    """Embedding, one spec per decoder layer, final norm, LM head.

    ``config`` is copied and its ``_attn_implementation`` set (None: HF's default for the
    family): left None, as on a bare config, HF's mask functions return no mask and
    attention is not causal.
    """
    family = FAMILIES[config.model_type]
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{family.model_type} config has use_bidirectional_attention=True (an encoder, e.g. "
                         f"EmbeddingGemma): pp-ext splits causal LMs only; set it to False")
    attn_implementation = _attn_implementation(family, attn_implementation)
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    if config.tie_word_embeddings:
        embed = TiedLayerSpec("embed", Embedding, config, family, tied_weight_attr=["embed_tokens.weight"])
        head = TiedLayerSpec("embed", Embedding, config, family,
                             forward_fn=functools.partial(tied_head, cap=_final_softcap(config)),
                             tied_weight_attr=["embed_tokens.weight"])
    else:
        embed, head = LayerSpec(Embedding, config, family), LayerSpec(LMHead, config)
    decoders = [LayerSpec(DecoderLayer, config, family, i) for i in range(config.num_hidden_layers)]
    return [embed, *decoders, LayerSpec(FinalNorm, config, family), head]
