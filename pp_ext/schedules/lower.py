"""Lowering: add the sends and receives a compute program needs, in an order NCCL
cannot hang on.

The invariant. Every rank's communication is the projection of one global
sequence of transfers, and each transfer's send and receive stand at the same
point of it: the send after the action that makes the tensor, the receive before
the action that needs it. Then, whatever NCCL's streams (one per rank pair, or
one per rank for every peer) and whether a send waits for its receive, no rank
waits for a transfer that the other side posts only later than something that
waits on it: executing the sequence in order is a run that finishes, and which
ops complete is decided by the posting orders alone, so every run finishes (the
argument of PyTorch's ``_add_send_recv``, which emits each send and receive
together; FACTS.md, "NCCL point-to-point"). :mod:`pp_ext.schedules.nccl` checks
it on every lowered program (:func:`pp_ext.schedules.validate.dry_run`).

The sequence. The compute program is simulated at unit costs
(:func:`pp_ext.schedules.simulate.simulate`); a transfer happens when its producer
ends. Each rank's actions are ordered by time, transfers before the compute that
starts at the same moment (producers take time, so a send never precedes its
producer; consumers start no earlier than their input's producer ends), transfers
at one moment by (source, destination, micro-batch, kind, chunk), an order that
shifting micro-batches keeps (the asynchronous streams repeat a call shifted by
m). Sends and receives are posted without waiting: the host waits for a receive
only where the tensor is needed, for a send at the end of the step. So a
receive stands in its stream at the moment its tensor is ready, the order in which
the tensors come: a stream never holds a ready transfer behind one that is not.
Hand-overs between chunks of one rank (the turn of a V) are local and need no
message.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from .schedule import Message, Schedule
from .simulate import simulate


def _order(message: Message) -> tuple:
    return (message.src, message.dst, message.micro_batch, message.grad, message.src_chunk)


@lru_cache(maxsize=256)  # validation, the engine and the tools lower the same built schedule: once
def lower(schedule: Schedule) -> Schedule:
    """Return ``schedule`` with communication actions inserted (idempotent)."""
    if schedule.lowered:
        return schedule
    timeline = simulate(schedule).timeline  # raises, naming each wait, if the programs deadlock
    # per rank: (time, 0 = transfer / 1 = compute, tie-break, action)
    keyed: list[list[tuple]] = [[] for _ in schedule.programs]
    for rank, spans in enumerate(timeline):
        for index, span in enumerate(spans):
            keyed[rank].append((span.start, 1, (index,), span.action))
            for message in schedule.outgoing(rank, span.action):
                at = (span.end, 0, _order(message))
                keyed[rank].append((*at, message.send()))
                keyed[message.dst].append((*at, message.recv()))
    programs = tuple(
        tuple(action for *_, action in sorted(entries, key=lambda e: e[:3])) for entries in keyed
    )
    return replace(schedule, programs=programs)
