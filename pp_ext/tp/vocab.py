"""Vocabulary padding: a vocabulary that does not divide by the tensor size, cut anyway.

Megatron pads the vocabulary itself (Shoeybi et al. 2019; ``make_vocab_size_divisible_by``,
its ``_vocab_size_with_padding``): to the next multiple of ``make_vocab_size_divisible_by x
tensor``, so every tensor rank holds as many rows of the embedding and LM head. Here the
padded rows are zeros, loaded and exported as none (:class:`~pp_ext.tp.split.Split`'s
``padding``), and their logits are set to the dtype's lowest value after the head (and
its soft-cap): exp(lowest - max) is 0, so they add nothing to any softmax or loss, never
win an arg-max, and get zero gradient, so the padded rows stay zero and training equals
training on the unpadded vocabulary. With the default multiple of 1, a vocabulary that
divides by the tensor size is not padded, and one tensor rank never pads.
"""

from __future__ import annotations

import torch

from pp_ext.tp.axis import TensorAxis
from pp_ext.tp.split import Split


def padded_vocab_size(vocab_size: int, axis: TensorAxis) -> int:
    """``vocab_size`` rounded up to a multiple of ``make_vocab_size_divisible_by x size``."""
    multiple = axis.make_vocab_size_divisible_by * axis.size
    return -(-vocab_size // multiple) * multiple


def vocab_split(vocab_size: int, axis: TensorAxis) -> Split | None:
    """The cut of a [vocabulary, ...] tensor over ``axis``, padding included (None: one
    rank, nothing padded: the tensor stays whole)."""
    padding = padded_vocab_size(vocab_size, axis) - vocab_size
    if axis.size == 1 and not padding:
        return None
    return Split(0, (vocab_size,), axis.size, axis.rank, padding)


def mask_padding(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``logits`` [..., rows of ``weight``] with the columns of ``weight``'s padded rows
    set to the dtype's lowest value (unchanged where it holds none)."""
    split = getattr(weight, "tp_split", None)
    if split is None or split.real() == logits.size(-1):
        return logits
    padded = torch.arange(logits.size(-1), device=logits.device) >= split.real()
    return logits.masked_fill(padded, torch.finfo(logits.dtype).min)
