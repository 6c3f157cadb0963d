"""Actions: the instructions a pipeline rank executes, printable in a short form.

Compute actions work on one (chunk, micro-batch) of the rank that runs them:
``F`` forward, ``B`` full backward, ``I`` input-gradient half of the backward and
``W`` weight-gradient half (Qi et al. 2024, "Zero Bubble Pipeline Parallelism",
split backward), ``U`` an optimizer update of the chunk's weights (only
asynchronous schedules place it inside a program; it makes a new weight version).
Communication actions are added by lowering (:mod:`pp_ext.schedules.lower`):
``sF``/``rF`` send/receive an activation, ``sB``/``rB`` send/receive a gradient.

Short form, as in the grids: ``F3`` (chunk 0), ``I2.c1``, ``sF3.c1>r2`` (send to
rank 2), ``rB0<r1`` (receive from rank 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the paper's name for the input-gradient pass
    W = "W"
    U = "U"
    SEND_ACT = "sF"
    RECV_ACT = "rF"
    SEND_GRAD = "sB"
    RECV_GRAD = "rB"

    # members are singletons: identity hashing is exact and much faster than
    # Enum's name hashing on the validator's and simulator's hot paths
    __hash__ = object.__hash__

    @property
    def is_compute(self) -> bool:
        return self in COMPUTE

    @property
    def is_comm(self) -> bool:
        return self in COMM

    @property
    def is_backward(self) -> bool:
        """True for the passes that consume the gradient from the next stage."""
        return self in (Kind.B, Kind.I)


COMPUTE = frozenset({Kind.F, Kind.B, Kind.I, Kind.W, Kind.U})
COMM = frozenset({Kind.SEND_ACT, Kind.RECV_ACT, Kind.SEND_GRAD, Kind.RECV_GRAD})
SENDS = frozenset({Kind.SEND_ACT, Kind.SEND_GRAD})

_SHORT = re.compile(r"^(sF|rF|sB|rB|F|B|I|W|U)(\d+)(?:\.c(\d+))?(?:([<>])r(\d+))?$")


@dataclass(frozen=True, order=True)
class Action:
    """One instruction on one rank.

    ``chunk`` is the rank-local chunk index (0 .. chunks-1); the placement maps it to
    a global stage. ``peer`` is the other rank of a communication action.
    """

    kind: Kind
    micro_batch: int
    chunk: int = 0
    peer: int | None = None

    def __post_init__(self) -> None:
        if (self.peer is None) == self.kind.is_comm:
            raise ValueError(
                f"{self.kind.name} action {'needs' if self.kind.is_comm else 'takes no'} peer"
            )

    def __str__(self) -> str:
        text = f"{self.kind.value}{self.micro_batch}"
        if self.chunk:
            text += f".c{self.chunk}"
        if self.peer is not None:
            arrow = ">" if self.kind in SENDS else "<"
            text += f"{arrow}r{self.peer}"
        return text

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Inverse of ``str``: ``Action.parse("I2.c1") == Action(Kind.I, 2, 1)``."""
        match = _SHORT.match(text.strip())
        if not match:
            raise ValueError(f"not an action: {text!r} (expected e.g. F3, I2.c1, sF3.c1>r2)")
        kind, mb, chunk, arrow, peer = match.groups()
        kind = Kind(kind)
        if kind.is_comm and arrow != (">" if kind in SENDS else "<"):
            raise ValueError(
                f"not an action: {text!r} ({kind.value} needs {'>' if kind in SENDS else '<'}rN)"
            )
        return cls(kind, int(mb), int(chunk or 0), int(peer) if peer is not None else None)

    def key(self) -> tuple[int, int]:
        """The (chunk, micro-batch) the action works on."""
        return (self.chunk, self.micro_batch)


def F(mb: int, chunk: int = 0) -> Action:
    return Action(Kind.F, mb, chunk)


def B(mb: int, chunk: int = 0) -> Action:
    return Action(Kind.B, mb, chunk)


def I(mb: int, chunk: int = 0) -> Action:  # noqa: E741,E743
    return Action(Kind.I, mb, chunk)


def W(mb: int, chunk: int = 0) -> Action:
    return Action(Kind.W, mb, chunk)
