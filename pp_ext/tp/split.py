"""How one tensor of a HF checkpoint is cut over the tensor-parallel axis.

Megatron's layers (Shoeybi et al. 2019, Sec. 3) cut a column-parallel weight along
its output dimension, a row-parallel weight along its input dimension and the
embedding along the vocabulary, each rank keeping one contiguous part. A fused
projection (Phi3's ``qkv_proj`` = [q; k; v], ``gate_up_proj`` = [gate; up]) is
several such tensors stacked, so each of its *sections* is cut on its own and a
rank keeps the concatenation of its parts: its local fused layer then splits
[q_r; k_r; v_r] at the local sizes exactly as the whole layer splits [q; k; v].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """Cut along ``dim`` into ``size`` parts, section by section, of which this rank
    holds part ``rank``; ``sections`` are the whole (unsharded) lengths of the stacked
    pieces along ``dim``."""

    dim: int
    sections: tuple[int, ...]
    size: int
    rank: int

    def __post_init__(self) -> None:
        if any(n % self.size for n in self.sections):
            raise ValueError(
                f"cannot cut sections {list(self.sections)} into {self.size} equal tensor-parallel "
                f"parts: each must divide by {self.size}"
            )

    def _index(self, start: int, stop: int) -> tuple:
        return (slice(None),) * self.dim + (slice(start, stop),)

    def take(self, source) -> torch.Tensor:
        """This rank's part of the whole tensor ``source``: a tensor, or a safetensors
        slice (``safe_open(...).get_slice(key)``), of which only the part is read."""
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

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's part, in rank order (inverse of :meth:`take`)."""
        pieces = [length // self.size for length in self.sections]
        by_rank = [part.split(pieces, dim=self.dim) for part in parts]
        return torch.cat(
            [torch.cat([mine[s] for mine in by_rank], dim=self.dim) for s in range(len(pieces))],
            dim=self.dim,
        )
