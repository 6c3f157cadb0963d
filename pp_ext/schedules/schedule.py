"""The schedule IR: per-rank ordered action lists over a placement.

A :class:`Schedule` is data, never control flow: rank r runs ``programs[r]`` in
order. Before lowering, programs hold compute actions only; lowering
(:mod:`pp_ext.schedules.lower`) adds the sends and receives.

Data dependencies, for micro-batch k on the route of its pipeline:
- ``F`` at stage s needs the activation of ``F`` at stage s-1;
- ``B``/``I`` at stage s needs ``F`` at stage s on its own chunk and the input
  gradient made by ``B``/``I`` at stage s+1 (the last stage starts from the loss);
- ``W`` needs ``I`` of the same chunk and micro-batch.
A dependency between different ranks is a message; between chunks of one rank it is
a local hand-over (no message).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

from .actions import Action, Kind
from .grid import step_grid
from .placement import Placement


class Message(NamedTuple):
    """One tensor crossing ranks: an activation (``grad=False``) or a gradient."""

    grad: bool
    micro_batch: int
    src: int
    src_chunk: int
    dst: int
    dst_chunk: int

    def send(self) -> Action:
        return Action(
            Kind.SEND_GRAD if self.grad else Kind.SEND_ACT,
            self.micro_batch,
            self.src_chunk,
            self.dst,
        )

    def recv(self) -> Action:
        return Action(
            Kind.RECV_GRAD if self.grad else Kind.RECV_ACT,
            self.micro_batch,
            self.dst_chunk,
            self.src,
        )


@dataclass(frozen=True)
class Schedule:
    name: str
    placement: Placement
    micro_batches: int
    programs: tuple[tuple[Action, ...], ...]
    # pipeline (route) of each micro-batch; empty means every micro-batch takes route 0
    pipeline_of: tuple[int, ...] = field(default=())
    # asynchronous schedules (pp_ext.schedules.asynchronous): the weights a backward
    # uses, "stashed" (its forward's version) or "corrected" (PipeMare); "" = synchronous
    backward_weights: str = ""
    # U(g) makes the version that forwards of micro-batches > g + version_lag use
    version_lag: int = 0

    @property
    def ranks(self) -> int:
        return self.placement.ranks

    @property
    def chunks(self) -> int:
        return self.placement.chunks

    @property
    def stages(self) -> int:
        return self.placement.stages

    def forward_version(self, updates: list[int], micro_batch: int) -> int:
        """Weight version the forward of ``micro_batch`` uses on a rank that has run
        updates ``U(g)`` for ``g`` in ``updates``: one per update it may see."""
        return sum(g + self.version_lag < micro_batch for g in updates)

    def pipeline(self, micro_batch: int) -> int:
        return self.pipeline_of[micro_batch] if self.pipeline_of else 0

    def stage(self, rank: int, action: Action) -> int:
        """Global stage index of a (compute) action run on ``rank``."""
        return self.placement.holds(rank, action.chunk)[1]

    def slot(self, micro_batch: int, stage: int) -> tuple[int, int]:
        """(rank, chunk) that runs ``stage`` for ``micro_batch``."""
        return self.placement.locate(self.pipeline(micro_batch), stage)

    @cached_property
    def lowered(self) -> bool:
        return any(a.kind.is_comm for program in self.programs for a in program)

    @cached_property
    def split_backward(self) -> bool:
        return any(a.kind is Kind.I for program in self.programs for a in program)

    def compute_only(self) -> "Schedule":
        if not self.lowered:
            return self
        return replace(
            self, programs=tuple(tuple(a for a in p if a.kind.is_compute) for p in self.programs)
        )

    @cached_property
    def _present(self) -> frozenset[tuple[int, Action]]:
        return frozenset((rank, a) for rank, program in enumerate(self.programs) for a in program)

    def has(self, rank: int, action: Action) -> bool:
        return (rank, action) in self._present

    def gradient_producer(self, micro_batch: int, stage: int) -> tuple[int, Action]:
        """The action that makes the input gradient of ``stage`` (``I`` where the
        backward is split, else ``B``) at ``stage + 1``."""
        rank, chunk = self.slot(micro_batch, stage + 1)
        split = Action(Kind.I, micro_batch, chunk)
        return rank, split if self.has(rank, split) else Action(Kind.B, micro_batch, chunk)

    def dependencies(self, rank: int, action: Action) -> list[tuple[int, Action]]:
        """Compute actions (rank, action) whose results ``action`` on ``rank`` needs."""
        kind, mb, chunk = action.kind, action.micro_batch, action.chunk
        if kind is Kind.F:
            stage = self.stage(rank, action)
            if stage == 0:
                return []
            prev_rank, prev_chunk = self.slot(mb, stage - 1)
            return [(prev_rank, Action(Kind.F, mb, prev_chunk))]
        if kind.is_backward:
            stage = self.stage(rank, action)
            deps = [(rank, Action(Kind.F, mb, chunk))]
            if stage < self.stages - 1:
                deps.append(self.gradient_producer(mb, stage))
            return deps
        if kind is Kind.W:
            return [(rank, Action(Kind.I, mb, chunk))]
        return []

    def outgoing(self, rank: int, action: Action) -> list[Message]:
        """Messages a compute action produces for other ranks."""
        kind, mb = action.kind, action.micro_batch
        if kind not in (Kind.F, Kind.B, Kind.I):
            return []
        stage = self.stage(rank, action)
        grad = kind is not Kind.F
        target = stage - 1 if grad else stage + 1
        if not 0 <= target < self.stages:
            return []
        dst, dst_chunk = self.slot(mb, target)
        if dst == rank:
            return []
        return [Message(grad, mb, rank, action.chunk, dst, dst_chunk)]

    def incoming(self, rank: int, action: Action) -> list[Message]:
        """Messages a compute action needs from other ranks."""
        messages: list[Message] = []
        for src, dep in self.dependencies(rank, action):
            if src != rank:
                messages.extend(m for m in self.outgoing(src, dep) if m.dst == rank)
        return messages

    def __str__(self) -> str:
        return step_grid(self)
