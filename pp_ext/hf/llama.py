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
* the decoder layers of a chunk build rotary ``(cos, sin)`` (Gemma3: one table per
  layer type, local or global) and their causal or sliding masks from those two int
  tensors once, with the mask functions the HF model itself calls, and share them
  (:mod:`pp_ext.hf.context`), so no float mask or rotary table crosses a stage;
* the final norm drops the int tensors and the LM head returns logits, soft-capped
  where the config sets ``final_logit_softcapping`` (Gemma2/3); a tied head
  (``config.tie_word_embeddings``) is a ``TiedLayerSpec`` sharing the embedding.

The parts every family shares (the int tensors, the per-layer mask, the head, the
choice of attention) are :mod:`pp_ext.hf.common`'s. Each layer class has
``hf_keys()``: its ``state_dict`` names mapped to the HF checkpoint keys, which
:func:`pp_ext.hf.weights.copy_hf_weights` (and per-stage loading) uses.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from deepspeed.pipe import LayerSpec
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from pp_ext import tp
from pp_ext.hf.common import (
    FinalNorm,
    HFDecoderLayer,
    Stream,
    embedding_and_head,
    stage_inputs,
    state_keys,
    with_attention,
)


@dataclass(frozen=True)
class Family:
    """Where a family's HF classes live and what their model code does differently.

    ``scaled_embedding``: the model embeds with HF's ``<prefix>TextScaledWordEmbedding``
    scaled by sqrt(hidden_size) (GemmaModel, Gemma2Model, Gemma3TextModel).
    ``rope_per_layer_type``: the rotary module holds one table per layer type and is
    called with it (Gemma3TextModel: local rope for sliding layers, global for full).
    ``packed_documents``: the model gives its mask functions the position ids, so packed
    documents attend only to themselves; GptOssModel gives none, and they see each other.
    """

    model_type: str
    prefix: str  # class name prefix in ``transformers.models.<package>.modeling_<package>``
    sliding: Callable[[PretrainedConfig, int], bool]
    package: str = ""  # when not ``model_type`` (gemma3_text lives in gemma3)
    scaled_embedding: bool = False
    rope_per_layer_type: bool = False
    packed_documents: bool = True

    def hf_class(self, suffix: str) -> type:
        package = self.package or self.model_type
        module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
        return getattr(module, self.prefix + suffix)


@functools.cache
def without_positions(make_mask: Callable) -> Callable:
    """``make_mask`` called without position ids, as a model that passes none calls it
    (``GptOssModel.forward``): no packed-sequence mask. One function per mask kind, so the
    layers of a chunk share their masks (:class:`~pp_ext.hf.context.ChunkContext`)."""

    def mask(*args, position_ids=None, **kwargs):
        return make_mask(*args, **kwargs)

    return mask


def never(config: PretrainedConfig, layer_idx: int) -> bool:
    return False


def sliding_window_set(config: PretrainedConfig, layer_idx: int) -> bool:
    """Mistral, Phi3: every layer slides when ``sliding_window`` is set (MistralModel's and
    Phi3Model's choice)."""
    return config.sliding_window is not None


def layer_type_sliding(config: PretrainedConfig, layer_idx: int) -> bool:
    """Qwen2/Qwen3/Gemma2/Gemma3: ``config.layer_types`` names each layer's mask."""
    return config.layer_types[layer_idx] == "sliding_attention"


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "Llama", never),
        Family("mistral", "Mistral", sliding_window_set),
        Family("qwen2", "Qwen2", layer_type_sliding),
        Family("qwen3", "Qwen3", layer_type_sliding),
        Family("gemma", "Gemma", never, scaled_embedding=True),
        Family("gemma2", "Gemma2", layer_type_sliding, scaled_embedding=True),
        Family(
            "gemma3_text",
            "Gemma3",
            layer_type_sliding,
            package="gemma3",
            scaled_embedding=True,
            rope_per_layer_type=True,
        ),
        Family("phi3", "Phi3", sliding_window_set),
    )
}


class Embedding(nn.Module):
    """Token embedding (vocabulary-parallel with tensor parallelism); also makes the
    int64 positions and padding mask the later stages read."""

    def __init__(self, config: PretrainedConfig, family: Family) -> None:
        super().__init__()
        # HF's own class and scale, as the Gemma models build it: the factor is cast
        # to the weight dtype before multiplying (sqrt(3072) becomes 55.5 in bf16).
        scaled = {"embed_scale": config.hidden_size**0.5} if family.scaled_embedding else {}
        table = (
            family.hf_class("TextScaledWordEmbedding") if family.scaled_embedding else nn.Embedding
        )
        self.embed_tokens = tp.vocab_parallel_embedding(
            table,
            config.vocab_size,
            config.hidden_size,
            config.pad_token_id,
            tp.current(),
            **scaled,
        )

    def forward(self, inputs) -> Stream:
        input_ids, position_ids, attention_mask = stage_inputs(inputs)
        return self.embed_tokens(input_ids), position_ids, attention_mask

    def hf_keys(self) -> dict[str, str]:
        return state_keys(self, "embed_tokens.", "model.embed_tokens.")


class DecoderLayer(HFDecoderLayer):
    """The family's HF decoder layer with its rotary table and causal or sliding mask;
    with tensor parallelism built at this rank's share of heads and MLP features and
    sharded by the family's plan (:mod:`pp_ext.tp.plans`)."""

    def __init__(self, config: PretrainedConfig, family: Family, layer_idx: int) -> None:
        make_mask = (
            create_sliding_window_causal_mask
            if family.sliding(config, layer_idx)
            else create_causal_mask
        )
        if not family.packed_documents:
            make_mask = without_positions(make_mask)
        # Gemma3 keeps a local and a global table in one module; this layer asks for its own.
        rope_kwargs = (
            {"layer_type": config.layer_types[layer_idx]} if family.rope_per_layer_type else None
        )
        axis = tp.current()
        layer = family.hf_class("DecoderLayer")(tp.local_config(config, axis.size), layer_idx)
        super().__init__(
            config,
            tp.shard_layer(layer, config, axis),
            make_mask,
            f"model.layers.{layer_idx}.",
            family.hf_class("RotaryEmbedding")(config=config),
            rope_kwargs,
        )


def layer_specs(config: PretrainedConfig, attn_implementation: str | None = None) -> list:
    """Embedding, one spec per decoder layer, final norm, LM head.

    ``config`` is copied and its ``_attn_implementation`` set (None: HF's default for the
    family): left None, as on a bare config, HF's mask functions return no mask and
    attention is not causal.
    """
    return family_specs(config, FAMILIES[config.model_type], attn_implementation)


def family_specs(
    config: PretrainedConfig,
    family: Family,
    attn_implementation: str | None,
    embedding: type[nn.Module] = Embedding,
    decoder: type[nn.Module] = DecoderLayer,
    norm: type[nn.Module] = FinalNorm,
    norm_args: tuple = (),
) -> list:
    """:func:`layer_specs` of ``family``, with its own embedding, decoder layer and final
    norm classes (``norm_args`` first to the norm's): an MoE family's carry the router
    statistics (:mod:`pp_ext.hf.moe`)."""
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{family.model_type} config has use_bidirectional_attention=True (an encoder, e.g. "
            f"EmbeddingGemma): pp-ext splits causal LMs only; set it to False"
        )
    # HF's default when None: sdpa where the family supports it, else eager (Gemma2:
    # sdpa cannot soft-cap attention logits)
    config = with_attention(config, family.hf_class("PreTrainedModel"), attn_implementation)
    embed, head = embedding_and_head(config, embedding, family)
    decoders = [LayerSpec(decoder, config, family, i) for i in range(config.num_hidden_layers)]
    final = LayerSpec(
        norm,
        *norm_args,
        "model.norm.",
        family.hf_class("RMSNorm"),
        config.hidden_size,
        eps=config.rms_norm_eps,
    )
    return [embed, *decoders, final, head]
