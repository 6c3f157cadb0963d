"""GPT-2 and GPT-NeoX HF causal LMs as pipeline layers.

The blocks are transformers' own (``GPT2Block`` with its transposed ``Conv1D``
weights, ``GPTNeoXLayer`` with its fused ``query_key_value``, partial rotary and
parallel or sequential residual), so their math and state_dict names are HF's. What
differs from the Llama-like families (:mod:`pp_ext.hf.llama`) is around them, as
``GPT2Model.forward`` and ``GPTNeoXModel.forward`` (transformers 5.23) do it:

* GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners")
  adds learned absolute position embeddings ``wpe[position_ids]`` to the token
  embeddings (a layer of its own, after the token embedding, so that a tied head
  shares nothing but the token matrix); positions default to 0..length-1 whatever
  the padding, and packed documents (restarting ``position_ids``) restart their
  positions as well. No rotary.
* GPT-NeoX (Black et al. 2022, "GPT-NeoX-20B") has rotary positions, built once per chunk.
* Both end in a LayerNorm (``transformer.ln_f`` / ``gpt_neox.final_layer_norm``) and
  an ``lm_head`` (tied to the token embedding when ``config.tie_word_embeddings``).
  GPT-NeoX checkpoints (and ``save_pretrained``) spell the untied head ``embed_out``;
  transformers renames it ``lm_head`` on load (``transformers.conversion_mapping``).
  ``hf_keys()`` names the loaded model's tensors, as for every family; per-stage
  loading and export rename as transformers does.
"""

from __future__ import annotations

from collections.abc import Callable

from deepspeed.pipe import LayerSpec
from torch import nn
from transformers import GPTNeoXConfig, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.gpt_neox import modeling_gpt_neox

from pp_ext import tp
from pp_ext.hf.common import (
    FinalNorm,
    HFDecoderLayer,
    Stream,
    embedding_and_head,
    stage_inputs,
    with_attention,
)


class TokenEmbedding(nn.Module):
    """The token matrix (HF key ``hf_key``), then a dropout of probability ``dropout``.

    Nothing else: with a tied head, DeepSpeed keeps a second copy of this module on the
    last stage and syncs only ``embed_tokens``, so any other weight here (GPT-2's
    positions) would go stale there.
    """

    def __init__(self, config: PretrainedConfig, hf_key: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.hf_key = hf_key
        self.embed_tokens = tp.vocab_parallel_embedding(
            nn.Embedding, config.vocab_size, config.hidden_size, None, tp.current()
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, inputs) -> Stream:
        input_ids, position_ids, attention_mask = stage_inputs(inputs)
        return self.drop(self.embed_tokens(input_ids)), position_ids, attention_mask

    def hf_keys(self) -> dict[str, str]:
        return {"embed_tokens.weight": self.hf_key}


class GPT2Positions(nn.Module):
    """GPT-2's learned absolute positions: ``hidden + wpe[position_ids]``, then the
    embedding dropout (``GPT2Model.forward``)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, inputs: Stream) -> Stream:
        hidden, position_ids, attention_mask = inputs
        return self.drop(hidden + self.embed_positions(position_ids)), position_ids, attention_mask

    def hf_keys(self) -> dict[str, str]:
        return {"embed_positions.weight": "transformer.wpe.weight"}


class GPT2Layer(HFDecoderLayer):
    """HF's ``GPT2Block``: causal mask only, positions are already in the hidden states;
    tensor-parallel by :data:`pp_ext.tp.plans.GPT2` when built on a tensor axis (its
    ``Conv1D`` linears cut as Megatron cuts linears, Shoeybi et al. 2019, Sec. 3)."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        axis = tp.current()
        # layer_idx matters: scale_attn_by_inverse_layer_idx divides by it
        block = modeling_gpt2.GPT2Block(tp.local_config(config, axis.size), layer_idx=layer_idx)
        super().__init__(
            config,
            tp.shard_layer(block, config, axis),
            create_causal_mask,
            f"transformer.h.{layer_idx}.",
        )


class GPTNeoXLayer(HFDecoderLayer):
    """HF's ``GPTNeoXLayer`` with its (partial) rotary table rebuilt from the positions;
    tensor-parallel by :data:`pp_ext.tp.plans.GPT_NEOX` when built on a tensor axis."""

    def __init__(self, config: GPTNeoXConfig, layer_idx: int) -> None:
        axis = tp.current()
        layer = modeling_gpt_neox.GPTNeoXLayer(tp.local_config(config, axis.size), layer_idx)
        super().__init__(
            config,
            tp.shard_layer(layer, config, axis),
            create_causal_mask,
            f"gpt_neox.layers.{layer_idx}.",
            modeling_gpt_neox.GPTNeoXRotaryEmbedding(config=config),
        )


def _final_layer_norm(config: PretrainedConfig, hf_prefix: str, eps: float) -> LayerSpec:
    return LayerSpec(FinalNorm, hf_prefix, nn.LayerNorm, config.hidden_size, eps=eps)


def _gpt2_specs(config: PretrainedConfig) -> list:
    embed, head = embedding_and_head(config, TokenEmbedding, "transformer.wte.weight")
    blocks = [LayerSpec(GPT2Layer, config, i) for i in range(config.num_hidden_layers)]
    norm = _final_layer_norm(config, "transformer.ln_f.", config.layer_norm_epsilon)
    return [embed, LayerSpec(GPT2Positions, config), *blocks, norm, head]


def _gpt_neox_specs(config: PretrainedConfig) -> list:
    embed, head = embedding_and_head(
        config, TokenEmbedding, "gpt_neox.embed_in.weight", config.hidden_dropout
    )
    blocks = [LayerSpec(GPTNeoXLayer, config, i) for i in range(config.num_hidden_layers)]
    norm = _final_layer_norm(config, "gpt_neox.final_layer_norm.", config.layer_norm_eps)
    return [embed, *blocks, norm, head]


# model_type -> (HF model class, which says what attention it supports; spec builder)
ARCHITECTURES: dict[str, tuple[type[PreTrainedModel], Callable[[PretrainedConfig], list]]] = {
    "gpt2": (modeling_gpt2.GPT2PreTrainedModel, _gpt2_specs),
    "gpt_neox": (modeling_gpt_neox.GPTNeoXPreTrainedModel, _gpt_neox_specs),
}
# the model types whose positions are a learned table (GPT2Positions) rather than rotary
LEARNED_POSITIONS = ("gpt2",)


def layer_specs(config: PretrainedConfig, attn_implementation: str | None = None) -> list:
    """Token embedding (GPT-2: then its positions), one spec per block, final LayerNorm,
    LM head (tied or not).

    ``attn_implementation`` None takes HF's default for the model (sdpa); see
    :func:`pp_ext.hf.common.with_attention`.
    """
    model_class, build = ARCHITECTURES[config.model_type]
    return build(with_attention(config, model_class, attn_implementation))
