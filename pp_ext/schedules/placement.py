"""Placement: which rank and which local chunk hold each stage of each pipeline.

A model is cut into ``stages`` consecutive pieces. A *pipeline* is the route a
micro-batch takes through them: ``routes[pipeline][stage] = (rank, chunk)``. Most
schedules have one pipeline; Chimera (Li & Hoefler 2021) has two running in opposite
directions over two replicas of the weights, so every stage is held twice.

- ``loop`` (Megatron interleaved 1F1B, looped BFS): chunk c of rank r holds stage
  ``c*p + r``; the route loops over the ranks v times.
- ``v`` (ZB-V, DualPipeV): chunks alternate direction, chunk c of rank r holds stage
  ``c*p + r`` for even c and ``c*p + p-1-r`` for odd c, so the last rank holds both
  stage p-1 and stage p and a micro-batch turns round on one rank.
- ``bidirectional`` (Chimera): pipeline 0 runs rank 0 -> p-1 on chunk 0, pipeline 1
  runs rank p-1 -> 0 on chunk 1; stage s lives on rank s and on rank p-1-s.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

PLACEMENTS = ("loop", "v", "bidirectional")


@dataclass(frozen=True)
class Placement:
    name: str
    ranks: int
    chunks: int
    routes: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def stages(self) -> int:
        return len(self.routes[0])

    @property
    def pipelines(self) -> int:
        return len(self.routes)

    @cached_property
    def _holder(self) -> dict[tuple[int, int], tuple[int, int]]:
        held = {}
        for pipeline, route in enumerate(self.routes):
            for stage, slot in enumerate(route):
                if slot in held:
                    raise ValueError(
                        f"placement {self.name}: rank {slot[0]} chunk {slot[1]} holds two stages"
                    )
                held[slot] = (pipeline, stage)
        missing = [
            (r, c) for r in range(self.ranks) for c in range(self.chunks) if (r, c) not in held
        ]
        if missing:
            raise ValueError(f"placement {self.name}: rank/chunk {missing[0]} holds no stage")
        return held

    def locate(self, pipeline: int, stage: int) -> tuple[int, int]:
        """(rank, chunk) that runs ``stage`` for micro-batches of ``pipeline``."""
        return self.routes[pipeline][stage]

    def holds(self, rank: int, chunk: int) -> tuple[int, int]:
        """(pipeline, stage) held by ``chunk`` of ``rank``."""
        return self._holder[(rank, chunk)]

    def replicas(self, stage: int) -> int:
        """How many copies of the stage's weights exist (2 for Chimera)."""
        return self.pipelines

    def validate(self) -> None:
        self._holder  # noqa: B018 - building the table checks it

    @classmethod
    def loop(cls, ranks: int, chunks: int = 1) -> "Placement":
        route = tuple((stage % ranks, stage // ranks) for stage in range(ranks * chunks))
        return cls("loop", ranks, chunks, (route,))

    @classmethod
    def v(cls, ranks: int, chunks: int = 2) -> "Placement":
        route = []
        for stage in range(ranks * chunks):
            chunk, offset = divmod(stage, ranks)
            route.append((offset if chunk % 2 == 0 else ranks - 1 - offset, chunk))
        return cls("v", ranks, chunks, (tuple(route),))

    @classmethod
    def bidirectional(cls, ranks: int) -> "Placement":
        down = tuple((stage, 0) for stage in range(ranks))
        up = tuple((ranks - 1 - stage, 1) for stage in range(ranks))
        return cls("bidirectional", ranks, 2, (down, up))

    @classmethod
    def named(cls, name: str, ranks: int, chunks: int) -> "Placement":
        if name == "loop":
            return cls.loop(ranks, chunks)
        if name == "v":
            return cls.v(ranks, chunks)
        if name == "bidirectional":
            return cls.bidirectional(ranks)
        raise ValueError(f"unknown placement {name!r}: choose one of {', '.join(PLACEMENTS)}")
