"""What every HF family's pipeline layers share: the tensors that cross stages, the
per-layer mask, the decoder-layer wrapper, the LM head (tied or not), the HF key
mapping and the choice of attention implementation.

Only tensors cross stages (DeepSpeed sends nothing else), so the first stage turns
its input into ``(hidden, position_ids, attention_mask)``: positions and the 2D
padding mask are int64, sent without gradients, and the mask is always sent (all
ones when none was given) so every micro-batch has the same shapes. The first decoder
layer of a chunk builds the 4D masks and rotary tables from them with the functions
the HF model itself calls (``transformers.masking_utils``), once, and hands them on to
the chunk's later layers as a fourth element of the stream
(:class:`~pp_ext.hf.context.ChunkContext`), so no float mask or table crosses a stage
and none is built twice.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Protocol

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from pp_ext import tp
from pp_ext.hf.context import ChunkContext

# Each implementation with the HF ``PreTrainedModel`` flag that says a model supports it
# (eager always works).
ATTN_IMPLEMENTATIONS = {
    "sdpa": "_supports_sdpa",
    "eager": None,
    "flash_attention_2": "_supports_flash_attn",
}

# (hidden, position_ids, attention_mask), then, between the layers of one chunk, the
# ChunkContext the first decoder layer built from them
Stream = tuple


def state_keys(module: nn.Module, local: str, hf: str) -> dict[str, str]:
    """``state_dict`` names under submodule ``local`` mapped to the same names under ``hf``."""
    return {name: hf + name.removeprefix(local) for name in module.state_dict()}


def stage_inputs(inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids`` or ``(input_ids[, attention_mask[, position_ids]])`` as the int64
    ``(input_ids, position_ids, attention_mask)`` the first stage embeds and sends on.

    Default positions are 0..length-1 whatever the padding, as HF's models (Llama,
    GPT-2, GPT-NeoX) make them when ``position_ids`` is not given.
    """
    input_ids, attention_mask, position_ids = (
        (*inputs, None, None)[:3] if isinstance(inputs, tuple) else (inputs, None, None)
    )
    batch, length = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device)
    # contiguous: DeepSpeed's own engine sends stage outputs as they are, and torch.distributed
    # refuses a broadcast view (pp-ext's engine copies into its buffers either way)
    position_ids = position_ids.expand(batch, length).long().contiguous()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, position_ids, attention_mask.long()


class HFDecoderLayer(nn.Module):
    """One HF decoder layer (``layer``, called as the HF model calls it) with its mask
    (``make_mask``), and rotary ``(cos, sin)`` when ``rotary_emb`` is given (called with
    ``rope_kwargs`` too: Gemma3 asks for its layer type's table), from the chunk's
    :class:`~pp_ext.hf.context.ChunkContext`: the one it receives, or a new one built
    from the int tensors when it is the chunk's first decoder layer.

    A family subclasses it and builds ``layer`` in its own ``__init__``, so that a spec
    holds no weights until DeepSpeed builds it on its stage. ``hf_prefix`` is the
    layer's key prefix in the HF model, e.g. ``model.layers.3.``.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        layer: nn.Module,
        make_mask: Callable,
        hf_prefix: str,
        rotary_emb: nn.Module | None = None,
        rope_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.config, self.make_mask, self.hf_prefix = config, make_mask, hf_prefix
        self.rotary_emb, self.rope_kwargs, self.layer = rotary_emb, rope_kwargs or {}, layer

    def forward(self, inputs: Stream) -> Stream:
        hidden, position_ids, attention_mask, *shared = inputs
        context = shared[0] if shared else ChunkContext(position_ids, attention_mask)
        mask = context.mask(self.make_mask, self.config, hidden)
        rotary = (
            {}
            if self.rotary_emb is None
            else {"position_embeddings": context.rotary(self.rotary_emb, hidden, self.rope_kwargs)}
        )
        hidden = self.layer(hidden, attention_mask=mask, position_ids=position_ids, **rotary)
        return hidden, position_ids, attention_mask, context

    def hf_keys(self) -> dict[str, str]:
        return state_keys(self, "layer.", self.hf_prefix)


class FinalNorm(nn.Module):
    """The model's last norm, ``norm_class(*args, **kwargs)`` under HF key prefix
    ``hf_prefix``; the int tensors stop here."""

    def __init__(self, hf_prefix: str, norm_class: type[nn.Module], *args, **kwargs) -> None:
        super().__init__()
        self.hf_prefix, self.norm = hf_prefix, norm_class(*args, **kwargs)

    def forward(self, inputs: Stream) -> torch.Tensor:
        return self.norm(inputs[0])

    def hf_keys(self) -> dict[str, str]:
        return state_keys(self, "norm.", self.hf_prefix)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final logit soft-capping, ``cap * tanh(logits / cap)``, which keeps logits inside
    (-cap, cap) (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical
    Size", sec. 2.2); ``cap`` None leaves them alone. The operations run in the order of
    ``Gemma2ForCausalLM.forward`` so the result is HF's to the bit."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _final_softcap(config: PretrainedConfig) -> float | None:
    return getattr(config, "final_logit_softcapping", None)  # only Gemma2/3 configs have it


def on_hidden(inputs, head: Callable[[torch.Tensor], torch.Tensor]):
    """``head`` applied to the hidden states; what follows them in a tuple (an MoE model's
    router loss, :mod:`pp_ext.hf.moe`) is passed on after the logits."""
    if isinstance(inputs, tuple):
        hidden, *rest = inputs
        return (head(hidden), *rest)
    return head(inputs)


class LMHead(nn.Module):
    """An untied LM head (HF key ``lm_head.weight`` in every supported model); with
    tensor parallelism column-parallel by vocabulary, its logits left sharded for
    :func:`pp_ext.tp.vocab_parallel_cross_entropy` (Shoeybi et al. 2019, Sec. 3); the
    logits of padded rows masked after the soft-cap (:mod:`pp_ext.tp.vocab`)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.lm_head = tp.vocab_parallel_head(config.hidden_size, config.vocab_size, tp.current())
        self.cap = _final_softcap(config)

    def forward(self, inputs):
        return on_hidden(
            inputs,
            lambda hidden: tp.mask_padding(
                softcap(self.lm_head(hidden), self.cap), self.lm_head.weight
            ),
        )

    def hf_keys(self) -> dict[str, str]:
        return state_keys(self, "lm_head.", "lm_head.")


class TokenEmbedding(Protocol):
    """A family's embedding layer: its token table (vocabulary-parallel on a tensor axis)."""

    embed_tokens: nn.Embedding


def tied_head(embedding: TokenEmbedding, inputs, cap: float | None = None):
    """The LM head tied to the embedding: logits from its ``embed_tokens`` matrix
    (unscaled, as HF's tied ``lm_head``), soft-capped at ``cap``; a vocabulary-parallel
    embedding gives this rank's block of the logits, padded rows masked."""
    table = embedding.embed_tokens

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = tp.vocab_parallel_logits(hidden, table.weight, tp.axis_of(table))
        return tp.mask_padding(softcap(logits, cap), table.weight)

    return on_hidden(inputs, head)


def embedding_and_head(
    config: PretrainedConfig, embedding: type[nn.Module], *args
) -> tuple[LayerSpec, LayerSpec]:
    """The first and last layer specs. With ``config.tie_word_embeddings`` one module,
    ``embedding(config, *args)`` (token matrix ``embed_tokens``), serves both as a
    DeepSpeed ``TiedLayerSpec``; otherwise the head is an :class:`LMHead`."""
    if not config.tie_word_embeddings:
        return LayerSpec(embedding, config, *args), LayerSpec(LMHead, config)
    tied = ["embed_tokens.weight"]
    head = functools.partial(tied_head, cap=_final_softcap(config))
    return (
        TiedLayerSpec("embed", embedding, config, *args, tied_weight_attr=tied),
        TiedLayerSpec("embed", embedding, config, *args, forward_fn=head, tied_weight_attr=tied),
    )


def with_attention(
    config: PretrainedConfig, model_class: type[PreTrainedModel], requested: str | None
) -> PretrainedConfig:
    """A copy of ``config`` with ``_attn_implementation`` set: left None, as on a bare
    config, HF's mask functions return no mask and attention is not causal.

    ``requested`` None takes HF's own default (``PreTrainedModel.
    get_correct_attn_implementation``): sdpa where ``model_class`` supports it, else eager.
    An implementation HF would refuse for ``model_class`` is an error.
    """
    if requested is None:
        requested = "sdpa" if model_class._supports_sdpa else "eager"
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
            f"got {requested!r}"
        )
    flag = ATTN_IMPLEMENTATIONS[requested]
    if flag is not None and not getattr(model_class, flag):
        raise ValueError(
            f"{config.model_type} models do not support attn_implementation {requested!r} "
            f"(transformers' {model_class.__name__} refuses it): use 'eager' or leave it unset"
        )
    config = copy.deepcopy(config)
    config._attn_implementation = requested
    return config
