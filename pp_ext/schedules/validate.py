"""Validator and dry run: a schedule is checked before anything runs it.

Rules checked, each failure reported with the rank x step grid and the offending
action marked with ``!``:
1. every action names a chunk of its rank and a micro-batch of the step, on the
   pipeline (route) that micro-batch takes;
2. counts are complete: for every (micro-batch, stage) exactly one ``F`` and either
   one ``B`` or one ``I`` and one ``W``, on the rank and chunk that hold the stage;
3. on each rank ``F`` comes before ``I``/``B``, and ``I`` before ``W``, for the
   same (chunk, micro-batch); hand-overs between chunks of one rank are in order;
4. the lowered program (sends and receives added) runs to the end on all ranks
   with non-blocking sends and blocking receives, every receive matching the
   message at the head of its channel: no deadlock, nothing left unsent or unread
   (what gloo, which buffers sends, needs);
5. it also runs to the end under NCCL's rules (:mod:`pp_ext.schedules.nccl`): a
   send completes only with its receive, ops complete in posting order on one
   stream per rank pair and, stricter, on one stream per rank for every peer;
   with expert parallelism (:func:`expert_dry_run`, before a launch) on the whole
   pipe x data grid, each MoE layer's all-to-alls on its expert group's communicator.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque

from .actions import Action, Kind
from .errors import InvalidScheduleError
from .grid import step_grid
from .lower import lower
from .nccl import STREAMS, CrossedMessagesError, Streams, Trace, grid_traces, program_traces, run
from .schedule import Message, Schedule


def _fail(schedule: Schedule, message: str, marks: list[tuple[int, int]]) -> None:
    raise InvalidScheduleError(message, step_grid(schedule, marks))


def check_structure(schedule: Schedule) -> None:
    """Rules 1-3 on the compute actions."""
    compute = schedule.compute_only()
    if schedule.pipeline_of and len(schedule.pipeline_of) != schedule.micro_batches:
        raise InvalidScheduleError(
            f"pipeline_of has {len(schedule.pipeline_of)} entries for {schedule.micro_batches} micro-batches"
        )
    if len(schedule.programs) != schedule.ranks:
        raise InvalidScheduleError(f"{len(schedule.programs)} programs for {schedule.ranks} ranks")
    counts: Counter[tuple[int, Action]] = Counter()
    for rank, program in enumerate(compute.programs):
        for step, action in enumerate(program):
            if not 0 <= action.chunk < schedule.chunks:
                _fail(
                    compute,
                    f"rank {rank} step {step}: {action} names chunk {action.chunk}, "
                    f"ranks hold chunks 0..{schedule.chunks - 1}",
                    [(rank, step)],
                )
            if not 0 <= action.micro_batch < schedule.micro_batches:
                _fail(
                    compute,
                    f"rank {rank} step {step}: {action} names micro-batch {action.micro_batch}, "
                    f"the step has 0..{schedule.micro_batches - 1}",
                    [(rank, step)],
                )
            if action.kind is not Kind.U:
                pipeline, _ = schedule.placement.holds(rank, action.chunk)
                if pipeline != schedule.pipeline(action.micro_batch):
                    _fail(
                        compute,
                        f"rank {rank} step {step}: {action} runs micro-batch {action.micro_batch} "
                        f"on a chunk of pipeline {pipeline}, but it takes pipeline "
                        f"{schedule.pipeline(action.micro_batch)}",
                        [(rank, step)],
                    )
            counts[(rank, action)] += 1
            if counts[(rank, action)] == 2:
                _fail(
                    compute,
                    f"rank {rank}: {action} appears twice",
                    [(rank, s) for s, a in enumerate(program) if a == action],
                )

    for mb in range(schedule.micro_batches):
        for stage in range(schedule.stages):
            rank, chunk = schedule.slot(mb, stage)
            has = {
                kind: counts[(rank, Action(kind, mb, chunk))]
                for kind in (Kind.F, Kind.B, Kind.I, Kind.W)
            }
            where = f"micro-batch {mb} stage {stage} (rank {rank} chunk {chunk})"
            if not has[Kind.F]:
                _fail(compute, f"{where} has no forward {Action(Kind.F, mb, chunk)}", [])
            if has[Kind.B] and (has[Kind.I] or has[Kind.W]):
                _fail(
                    compute,
                    f"{where} has both B and I/W",
                    [
                        (rank, s)
                        for s, a in enumerate(compute.programs[rank])
                        if a.micro_batch == mb
                        and a.chunk == chunk
                        and a.kind in (Kind.B, Kind.I, Kind.W)
                    ],
                )
            if not has[Kind.B] and not (has[Kind.I] and has[Kind.W]):
                missing = (
                    "B (or I and W)"
                    if not (has[Kind.I] or has[Kind.W])
                    else ("W" if has[Kind.I] else "I")
                )
                _fail(compute, f"{where} has no backward {missing}", [])

    for rank, program in enumerate(compute.programs):
        done: set[Action] = set()
        for step, action in enumerate(program):
            for dep_rank, dep in compute.dependencies(rank, action):
                if dep_rank == rank and dep not in done:
                    _fail(
                        compute,
                        f"rank {rank} step {step}: {action} needs {dep} of the same rank, "
                        f"which {'comes later' if dep in program else 'is missing'}",
                        [(rank, step)],
                    )
            done.add(action)


def dry_run(schedule: Schedule, streams: tuple[Streams, ...] = STREAMS) -> None:
    """Rules 4 and 5: run a lowered program on all ranks at once, without tensors,
    buffered (gloo), then under NCCL's rules with each of ``streams``."""
    buffered_dry_run(schedule)
    traces = program_traces(schedule)
    for model in streams:
        nccl_dry_run(schedule, model, traces)


def nccl_dry_run(schedule: Schedule, streams: Streams, traces: list[Trace] | None = None) -> None:
    """Rule 5 with one stream model; receives block the host where they are posted
    (as the engine's shape headers do), the stricter case. ``traces``: the schedule's
    :func:`program_traces`, where the caller has them already."""
    _refuse_stuck(schedule, streams, traces or program_traces(schedule), 1, "")


def expert_dry_run(
    schedule: Schedule,
    data: int,
    expert: int,
    moe_layers: dict[tuple[int, int], int] | None = None,
    streams: tuple[Streams, ...] = (*STREAMS, "device"),
) -> None:
    """Rule 5 on the whole pipe x ``data`` grid of the lowered ``schedule`` with each MoE
    layer's all-to-alls on its stage's expert group of ``expert`` data ranks
    (:func:`pp_ext.schedules.nccl.grid_traces`): they must meet in the same order on every
    member and never wait on the pipeline's p2p in a cycle. ``moe_layers``: (pipeline
    rank, chunk) -> MoE layers; None: one on every chunk (each exchange is a meeting of
    all members at one place of one program, so more of them only refuse more).
    ``streams``: also "device", every communicator's ops of a rank on one queue, as NCCL's
    guide asks of ops on several communicators."""
    if moe_layers is None:
        moe_layers = {(r, c): 1 for r in range(schedule.ranks) for c in range(schedule.chunks)}
    traces = grid_traces(schedule, data, expert, moe_layers)
    where = f" with expert parallelism (data {data}, expert {expert}; global rank r*{data}+d)"
    for model in streams:
        _refuse_stuck(schedule, model, traces, data, where)


def _refuse_stuck(
    schedule: Schedule, streams: Streams, traces: list[Trace], data: int, where: str
) -> None:
    """Raise InvalidScheduleError unless ``traces`` (``data`` copies of each pipeline
    rank's program, global rank ``rank * data + d``) finish, the grid marking the steps
    where each stuck rank waits and posted the op that holds its stream."""
    try:
        outcome = run(traces, streams)
    except CrossedMessagesError as exc:
        _fail(schedule, f"crossing orders under NCCL's rules{where}: {exc}", [])
    if outcome.finished:
        return
    marks = [(r // data, traces[r].events[e].step) for r, e in outcome.blocked]
    posted_at = {
        (r, i): event.step
        for r, trace in enumerate(traces)
        for event in trace.events
        if event.kind == "post"
        for i in event.ops
    }
    marks += [(head[0] // data, posted_at[head]) for head in outcome.heads]
    _fail(
        schedule,
        f"deadlock under NCCL's rules (one stream per {streams}){where}: {outcome.report}",
        marks,
    )


def buffered_dry_run(schedule: Schedule) -> None:
    """Rule 4: sends never wait (gloo buffers them); a receive waits for the message
    at the head of its channel."""
    programs = schedule.programs
    channels: dict[tuple[int, int], deque[Message]] = defaultdict(deque)
    done: list[set[Action]] = [set() for _ in programs]
    received: list[set[Message]] = [set() for _ in programs]
    pc = [0] * len(programs)

    def step_rank(rank: int) -> bool:
        action = programs[rank][pc[rank]]
        here = (rank, pc[rank])
        peer = action.peer  # an int on communication actions (Action.__post_init__)
        if action.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
            assert peer is not None
            if action.kind is Kind.SEND_ACT:
                producer = Action(Kind.F, action.micro_batch, action.chunk)
            else:
                split = Action(Kind.I, action.micro_batch, action.chunk)
                producer = (
                    split
                    if schedule.has(rank, split)
                    else Action(Kind.B, action.micro_batch, action.chunk)
                )
            messages = (
                []
                if producer not in done[rank]
                else [m for m in schedule.outgoing(rank, producer) if m.dst == action.peer]
            )
            if not messages:
                _fail(
                    schedule,
                    f"rank {rank} step {pc[rank]}: {action} sends a tensor no earlier "
                    f"action of rank {rank} made for rank {action.peer}",
                    [here],
                )
            channels[(rank, peer)].append(messages[0])
        elif action.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
            assert peer is not None
            queue = channels[(peer, rank)]
            if not queue:
                return False
            if queue[0].recv() != action:
                _fail(
                    schedule,
                    f"rank {rank} step {pc[rank]}: {action} receives, but the next message "
                    f"rank {action.peer} sent on this channel is {queue[0].send()}",
                    [here],
                )
            received[rank].add(queue.popleft())
        else:
            for dep_rank, dep in schedule.dependencies(rank, action):
                if dep_rank == rank and dep not in done[rank]:
                    _fail(
                        schedule,
                        f"rank {rank} step {pc[rank]}: {action} needs {dep} of the same rank first",
                        [here],
                    )
            for message in schedule.incoming(rank, action):
                if message not in received[rank]:
                    _fail(
                        schedule,
                        f"rank {rank} step {pc[rank]}: {action} needs {message.recv()} before it",
                        [here],
                    )
        done[rank].add(action)
        pc[rank] += 1
        return True

    progress = True
    while progress:
        progress = False
        for rank in range(len(programs)):
            while pc[rank] < len(programs[rank]) and step_rank(rank):
                progress = True
    blocked = [(rank, pc[rank]) for rank in range(len(programs)) if pc[rank] < len(programs[rank])]
    if blocked:
        waits = ", ".join(f"rank {r} at {programs[r][s]}" for r, s in blocked)
        _fail(schedule, f"deadlock: every unfinished rank waits on a receive ({waits})", blocked)
    unread = [m for queue in channels.values() for m in queue]
    if unread:
        _fail(
            schedule,
            f"{len(unread)} message(s) sent and never received, first {unread[0].send()} "
            f"from rank {unread[0].src}",
            [],
        )


def validate(schedule: Schedule) -> Schedule:
    """Check every rule; return the lowered schedule (lowering it if needed)."""
    check_structure(schedule)
    lowered = lower(schedule)
    dry_run(lowered)
    return lowered
