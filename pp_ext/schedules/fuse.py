"""Fusing a split backward back into one pass where splitting gains nothing.

Zero-bubble schedules split a stage's backward into I (input gradient) and W (weight
gradient) so that W can wait for a bubble while the previous stage gets its gradient
early (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", ICLR, Sec. 2). Where a
rank runs only computation between an I and its own W (no send, no receive), nothing
can use the split: no other rank sees anything of the I before the W has run, and
doing the W's work at the I's place only reorders local work, which ends at the same
time. The split then only costs: two passes over the chunk's layers instead of one,
the deferred GEMMs' bookkeeping, the linear layers' saved inputs kept until W, and
with bf16 two roundings and accumulations of the gradients instead of one. A
pipeline of one stage has nothing else (zb-h1, zb-h2, zbv, dualpipev at p = 1), and
the first stage of zb-h1 has them at any p.

:func:`fuse_backward` turns every such pair into one B at the I's place: the same
work, every communication at the same place, the same messages (B and I send the
same input gradient, and a fused pair sends none), so the program's dependencies and
the validator's and simulator's verdicts carry over, with I + W costing B.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import accumulate

from .actions import Action, Kind
from .lower import lower
from .schedule import Schedule


def fuse_backward(schedule: Schedule) -> Schedule:
    """``schedule`` lowered, with each ``I`` whose ``W`` (same chunk and micro-batch)
    comes later on its rank with no communication between them replaced by one ``B``,
    and that ``W`` dropped."""
    schedule = lower(schedule)  # communication must be in place to tell which pairs it separates
    programs = []
    for program in schedule.programs:
        comms = [0, *accumulate(a.kind.is_comm for a in program)]  # comms[i]: before position i
        where = {a.key(): i for i, a in enumerate(program) if a.kind is Kind.W}
        out: list[Action | None] = list(program)
        for i, action in enumerate(program):
            if action.kind is Kind.I and comms[where[action.key()]] == comms[i]:
                out[i], out[where[action.key()]] = (
                    Action(Kind.B, action.micro_batch, action.chunk),
                    None,
                )
        programs.append(tuple(a for a in out if a is not None))
    return replace(schedule, programs=tuple(programs))
