"""A run's layout: how its ranks and its model are cut, made once from the recipe and
the world size before any rank starts (as torchtitan's ``ParallelDims``).

``pipeline x tensor x data`` ranks (DeepSpeed's ``PipeModelDataParallelTopology``
order), ``chunks`` model chunks per pipeline rank in ``placement`` (``loop``: chunk c
of rank r is stage c*p + r, Megatron's interleaving; ``v``: stage r then 2p-1-r, the
V shape of Qi et al. 2024; ``bidirectional``: Chimera's two pipelines), the layers cut
by ``partition``, the vocabulary padded to a multiple of ``make_vocab_size_divisible_by x
tensor`` (:mod:`pp_ext.tp.vocab`), each MoE layer's experts spread over ``expert`` of the
data ranks (:mod:`pp_ext.moe.dispatch`). A checkpoint saves it (:meth:`Layout.saved`) and a resume compares
the run's with it (:meth:`Layout.changes`): what differs is re-cut by
:mod:`pp_ext.checkpoint.reshape`.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import cast

from omegaconf import OmegaConf

from pp_ext.config.schema import Recipe


@dataclass(frozen=True)
class Layout:
    pipeline: int
    tensor: int
    data: int
    chunks: int
    placement: str
    # a method name ('parameters', 'uniform', 'type:REGEX', 'balanced:PROFILE') or the
    # stage boundaries (p * chunks + 1 layer indices)
    partition: str | tuple[int, ...]
    make_vocab_size_divisible_by: int = 1
    # routed experts of each MoE layer spread over this many of a stage's data ranks
    expert: int = 1

    @classmethod
    def of(
        cls, recipe: Recipe, pipeline: int, tensor: int, data: int, chunks: int, placement: str
    ) -> Layout:
        partition = recipe.parallel.partition
        if OmegaConf.is_config(partition):
            partition = tuple(cast(list, OmegaConf.to_container(partition)))
        return cls(
            pipeline,
            tensor,
            data,
            chunks,
            placement,
            partition,
            recipe.parallel.make_vocab_size_divisible_by,
            recipe.parallel.expert,
        )

    @property
    def world_size(self) -> int:
        return self.pipeline * self.tensor * self.data

    def saved(self) -> dict:
        """What a checkpoint's marker holds of the layout (JSON: boundaries as a list)."""
        values = asdict(self)
        if isinstance(self.partition, tuple):
            values["partition"] = list(self.partition)
        return values

    def changes(self, saved: dict) -> list[str]:
        """``'key saved -> current'`` for each field on which a checkpoint's marker
        (``saved``, as :meth:`saved` wrote it) and this layout differ; a key the marker
        lacks (written before the key existed) has its default."""
        current = self.saved()
        return [
            f"{key} {saved.get(key, DEFAULTS.get(key))} -> {current[key]}"
            for key in KEYS
            if saved.get(key, DEFAULTS.get(key)) != current[key]
        ]


KEYS = tuple(field.name for field in fields(Layout))
DEFAULTS = {field.name: field.default for field in fields(Layout) if field.default is not MISSING}
