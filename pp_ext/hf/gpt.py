"""GPT-2 and GPT-NeoX HF causal LMs as pipeline layers.

The blocks are transformers' own (``GPT2Block`` with its transposed ``Conv1D``
weights, ``GPTNeoXLayer`` with its fused ``query_key_value``, partial rotary and
parallel or sequential residual), so their math and state_dict names are HF's. What
differs from the Llama-like families (:mod:`pp_ext.hf.llama`) is around them, as
``GPT2Model.forward`` and ``GPTNeoXModel.forward`` (transformers 5.23) do it:

* GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners")
  adds learned absolute position embeddings ``wpe[position_ids]`` to the token
  embeddings; positions default to 0..length-1 whatever the padding, and packed
  documents (restarting ``position_ids``) restart their positions as well. No rotary.
* GPT-NeoX (Black et al. 2022, "GPT-NeoX-20B") has rotary positions rebuilt per layer.
* Both end in a LayerNorm (``transformer.ln_f`` / ``gpt_neox.final_layer_norm``) and
  an ``lm_head`` (tied to the token embedding when ``config.tie_word_embeddings``).
  GPT-NeoX hub checkpoints spell the untied head ``embed_out``; transformers renames it
  ``lm_head`` on load (``transformers.conversion_mapping``), and ``hf_keys()`` names
  the loaded model's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

from deepspeed.pipe import LayerSpec
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.gpt_neox import modeling_gpt_neox

from pp_ext.hf.common import FinalNorm, HFDecoderLayer, Stream, embedding_and_head, stage_inputs, with_attention


class GPT2Embedding(nn.Module):
    """``wte[input_ids] + wpe[position_ids]``, then the embedding dropout."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, inputs) -> Stream:
        input_ids, position_ids, attention_mask = stage_inputs(inputs)
        hidden = self.embed_tokens(input_ids) + self.embed_positions(position_ids)
        return self.drop(hidden), position_ids, attention_mask

    def hf_keys(self) -> dict[str, str]:
        return {"embed_tokens.weight": "transformer.wte.weight", "embed_positions.weight": "transformer.wpe.weight"}


class GPTNeoXEmbedding(nn.Module):
    """``embed_in[input_ids]``, then the embedding dropout."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout)

    def forward(self, inputs) -> Stream:
        input_ids, position_ids, attention_mask = stage_inputs(inputs)
        return self.drop(self.embed_tokens(input_ids)), position_ids, attention_mask

    def hf_keys(self) -> dict[str, str]:
        return {"embed_tokens.weight": "gpt_neox.embed_in.weight"}


class GPT2Layer(HFDecoderLayer):
    """HF's ``GPT2Block``: causal mask only, positions are already in the hidden states."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        # layer_idx matters: scale_attn_by_inverse_layer_idx divides by it
        super().__init__(config, modeling_gpt2.GPT2Block(config, layer_idx=layer_idx), create_causal_mask,
                         f"transformer.h.{layer_idx}.")


class GPTNeoXLayer(HFDecoderLayer):
    """HF's ``GPTNeoXLayer`` with its (partial) rotary table rebuilt from the positions."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__(config, modeling_gpt_neox.GPTNeoXLayer(config, layer_idx), create_causal_mask,
                         f"gpt_neox.layers.{layer_idx}.", modeling_gpt_neox.GPTNeoXRotaryEmbedding(config=config))


@dataclass(frozen=True)
class Architecture:
    """One family's layer classes, its HF model class (for attention support) and final norm."""
    model_class: type[PreTrainedModel]
    embedding: type[nn.Module]
    decoder: type[HFDecoderLayer]
    norm_prefix: str
    norm_eps: str  # the config attribute holding the final LayerNorm's epsilon


ARCHITECTURES = {
    "gpt2": Architecture(modeling_gpt2.GPT2PreTrainedModel, GPT2Embedding, GPT2Layer,
                         "transformer.ln_f.", "layer_norm_epsilon"),
    "gpt_neox": Architecture(modeling_gpt_neox.GPTNeoXPreTrainedModel, GPTNeoXEmbedding, GPTNeoXLayer,
                             "gpt_neox.final_layer_norm.", "layer_norm_eps"),
}


def layer_specs(config: PretrainedConfig, attn_implementation: str | None = None) -> list:
    """Embedding, one spec per block, final LayerNorm, LM head (tied or not).

    ``attn_implementation`` None takes HF's default for the model (sdpa); see
    :func:`pp_ext.hf.common.with_attention`.
    """
    arch = ARCHITECTURES[config.model_type]
    config = with_attention(config, arch.model_class, attn_implementation)
    embed, head = embedding_and_head(config, arch.embedding)
    blocks = [LayerSpec(arch.decoder, config, i) for i in range(config.num_hidden_layers)]
    norm = LayerSpec(FinalNorm, arch.norm_prefix, nn.LayerNorm, config.hidden_size, eps=getattr(config, arch.norm_eps))
    return [embed, *blocks, norm, head]
