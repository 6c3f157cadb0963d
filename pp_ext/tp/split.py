"""How one tensor of a HF checkpoint is cut over the tensor-parallel axis.

Megatron's layers (Shoeybi et al. 2019, Sec. 3) cut a column-parallel weight along
its output dimension, a row-parallel weight along its input dimension and the
embedding along the vocabulary, each rank keeping one contiguous part. A fused
projection (Phi3's ``qkv_proj`` = [q; k; v], ``gate_up_proj`` = [gate; up]) is
several such tensors stacked, so each of its *sections* is cut on its own and a
rank keeps the concatenation of its parts: its local fused layer then splits
[q_r; k_r; v_r] at the local sizes exactly as the whole layer splits [q; k; v].

A vocabulary that does not divide by the tensor size is padded first, as Megatron pads
it (``make_vocab_size_divisible_by``): ``padding`` zero rows follow the whole tensor, so
the last parts hold zeros past the real rows. The whole tensor is always the unpadded
one: :meth:`Split.take` appends the zeros, :meth:`Split.merge` drops them, so export and
a resume under another tensor size see the model's own shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Split:
    """Cut along ``dim`` into ``size`` parts, section by section, of which this rank
    holds part ``rank``; ``sections`` are the whole (unsharded) lengths of the stacked
    pieces along ``dim``; ``padding`` zero rows follow the (one-section) tensor before it
    is cut."""

    dim: int
    sections: tuple[int, ...]
    size: int
    rank: int
    padding: int = 0

    def __post_init__(self) -> None:
        if self.padding and len(self.sections) > 1:
            raise ValueError("only a one-section tensor (a vocabulary) is padded")
        if any(n % self.size for n in self._padded()):
            raise ValueError(
                f"cannot cut sections {list(self._padded())} into {self.size} equal "
                f"tensor-parallel parts: each must divide by {self.size}"
            )

    def _padded(self) -> tuple[int, ...]:
        return (*self.sections[:-1], self.sections[-1] + self.padding)

    def real(self) -> int:
        """How many of this part's rows along ``dim`` are the tensor's own, not padding
        (all of them without padding)."""
        if not self.padding:
            return sum(self.sections) // self.size
        piece = self._padded()[0] // self.size
        return max(0, min(piece, self.sections[0] - self.rank * piece))

    def _index(self, start: int, stop: int) -> tuple:
        return (slice(None),) * self.dim + (slice(start, stop),)

    def take(self, source) -> torch.Tensor:
        """This rank's part of the whole tensor ``source``: a tensor, or a safetensors
        slice (``safe_open(...).get_slice(key)``), of which only the part is read."""
        if self.padding:  # the real rows of this part (maybe none), then zeros to its length
            piece, real = self._padded()[0] // self.size, self.real()
            start = min(self.sections[0], self.rank * piece)
            part = source[self._index(start, start + real)]
            return F.pad(part, (0, 0) * (part.dim() - 1 - self.dim) + (0, piece - real))
        parts, offset = [], 0
        for length in self.sections:
            piece = length // self.size
            parts.append(
                source[self._index(offset + self.rank * piece, offset + (self.rank + 1) * piece)]
            )
            offset += length
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def whole_shape(self, shape: torch.Size) -> torch.Size:
        """The whole tensor's shape, from the shape of one part."""
        return torch.Size((*shape[: self.dim], sum(self.sections), *shape[self.dim + 1 :]))

    def part_shape(self, shape: torch.Size) -> torch.Size:
        """One part's shape (without padding), from the whole tensor's shape."""
        return torch.Size(
            (*shape[: self.dim], sum(self.sections) // self.size, *shape[self.dim + 1 :])
        )

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's part, in rank order (inverse of :meth:`take`;
        the padding dropped)."""
        if self.padding:
            return torch.cat(parts, dim=self.dim).narrow(self.dim, 0, self.sections[0])
        pieces = [length // self.size for length in self.sections]
        by_rank = [part.split(pieces, dim=self.dim) for part in parts]
        return torch.cat(
            [torch.cat([mine[s] for mine in by_rank], dim=self.dim) for s in range(len(pieces))],
            dim=self.dim,
        )
