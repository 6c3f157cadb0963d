"""Lowering: add the sends and receives a compute program needs.

Each send goes right after the compute action that makes its tensor. Each receive
goes right before the action that needs the tensor, and every message a peer sent
earlier on the same (src, dst) channel is received just before it: receives on a
channel are posted in the order the sender sent, which is what NCCL and gloo need
to match messages without tags. Sends are non-blocking (``isend``), so a receive
of an earlier message never waits longer than the one needed, and lowering adds no
wait a valid compute program did not already have; :func:`pp_ext.schedules.validate.dry_run`
proves the result deadlock-free. Hand-overs between chunks of one rank (the turn
of a V) are local and need no message.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import replace

from .actions import Action
from .errors import InvalidScheduleError
from .grid import step_grid
from .schedule import Message, Schedule


def lower(schedule: Schedule) -> Schedule:
    """Return ``schedule`` with communication actions inserted (idempotent)."""
    if schedule.lowered:
        return schedule
    channels: dict[tuple[int, int], deque[Message]] = defaultdict(deque)
    with_sends: list[list[Action]] = []
    for rank, program in enumerate(schedule.programs):
        out = []
        for action in program:
            out.append(action)
            for message in schedule.outgoing(rank, action):
                out.append(message.send())
                channels[(rank, message.dst)].append(message)
        with_sends.append(out)

    programs = []
    for rank, program in enumerate(with_sends):
        out = []
        received: set[Message] = set()
        for step, action in enumerate(program):
            if action.kind.is_compute:
                for message in schedule.incoming(rank, action):
                    if message in received:  # came in early, before a later message it was sent ahead of
                        continue
                    queue = channels[(message.src, rank)]
                    if message not in queue:
                        raise InvalidScheduleError(
                            f"rank {rank} step {step}: {action} needs a message from rank {message.src} "
                            f"that is never sent",
                            step_grid(schedule, {(rank, schedule.programs[rank].index(action))}),
                        )
                    while True:
                        head = queue.popleft()
                        received.add(head)
                        out.append(head.recv())
                        if head == message:
                            break
            out.append(action)
        programs.append(tuple(out))
    leftover = [m for queue in channels.values() for m in queue]
    if leftover:
        m = leftover[0]
        raise InvalidScheduleError(
            f"rank {m.src} sends {m.send()} but rank {m.dst} never uses it "
            f"({len(leftover)} unused message(s))",
            step_grid(schedule),
        )
    return replace(schedule, programs=tuple(programs))
