"""What the decoder layers of one chunk share for one micro-batch: attention masks and
rotary tables, built once and handed from layer to layer.

Transformers' models build the 4D mask(s) and the rotary ``(cos, sin)`` once per
forward, then pass them to every decoder layer (``LlamaModel.forward``). Between
pipeline stages only tensors travel, so each stage receives the int64 position ids and
2D padding mask and must rebuild them; built per layer, that is one table per layer and
two host reads per layer (is there padding, are there packed documents), each of which
drains the GPU's queue. :class:`ChunkContext` builds each mask kind and each rotary
table on first use and keeps it for the chunk's later layers, which receive it as a
fourth element of the stream (:class:`pp_ext.hf.common.HFDecoderLayer`); the chunk's
output drops it (:meth:`pp_ext.engine.module.ChunkedPipelineModule.forward`), so the
next stage builds its own.

The layout of the micro-batch (padding anywhere? packed documents?) is read from the
device once per context, in one scalar: HF's mask functions would read it once per
call. What each mask function is then given is what makes HF's own call give the same
mask without reading it again:

* padding: the 2D mask (HF does not look for packed documents when a mask is given);
* packed documents (positions restarting, no padding): the position ids, from which HF
  builds its packed-sequence mask (it reads them again, once per mask kind);
* neither: no mask and no position ids, so HF returns its plain causal (or sliding)
  mask, ``None`` for sdpa (its ``is_causal`` path), without reading anything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig


def layout(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One int64 scalar on the device: 2 if any token is padding (a 0 in
    ``attention_mask``), plus 1 if any row packs documents, which transformers'
    ``find_packed_sequence_indices`` recognises by a position that does not follow the
    one before it by 1."""
    restarts = torch.diff(position_ids, dim=-1) != 1
    return (attention_mask == 0).any().long() * 2 + restarts.any().long()


class ChunkContext:
    """The masks and rotary tables of one micro-batch for one chunk's layers, each built
    on first use (HF's own functions and modules) and then reused."""

    def __init__(self, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.position_ids, self.attention_mask = position_ids, attention_mask
        self._layout: tuple[bool, bool] | None = None  # (padded, packed), read once
        self._masks: dict = {}
        self._rotary: dict = {}

    def layout(self) -> tuple[bool, bool]:
        """(padded, packed): the one host read of this context."""
        if self._layout is None:
            code = int(layout(self.position_ids, self.attention_mask))
            self._layout = (bool(code & 2), bool(code & 1))
        return self._layout

    def mask(self, make_mask: Callable, config: PretrainedConfig, hidden: torch.Tensor):
        """The 4D mask (or None) ``make_mask`` (transformers' ``create_causal_mask``,
        ``create_sliding_window_causal_mask``) gives for this micro-batch, as the HF model
        calls it with no cache (training)."""
        key = (make_mask, id(config))
        if key not in self._masks:
            padded, packed = self.layout()
            # the cache goes fourth, positionally: transformers renamed the argument
            # (past_key_values -> cache, 5.40 drops the old name), its place stayed
            self._masks[key] = make_mask(
                config,
                hidden,
                self.attention_mask if padded else None,
                None,
                position_ids=self.position_ids if packed and not padded else None,
            )
        return self._masks[key]

    def rotary(self, rotary_emb: nn.Module, hidden: torch.Tensor, rope_kwargs: dict) -> tuple:
        """``rotary_emb(hidden, position_ids, **rope_kwargs)``: the ``(cos, sin)`` table; one
        per set of ``rope_kwargs`` (Gemma3 asks for its layer type's), since every layer of a
        model builds its rotary module from the same config."""
        key = tuple(sorted(rope_kwargs.items()))
        if key not in self._rotary:
            self._rotary[key] = rotary_emb(hidden, self.position_ids, **rope_kwargs)
        return self._rotary[key]
