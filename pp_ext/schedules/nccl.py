"""NCCL's point-to-point rules as a dry run: does a communication trace finish?

Gloo buffers sends, so a program whose ranks post their sends and receives in
crossing orders runs on CPU and hangs on GPUs. NCCL's rules (NCCL user guide,
p2p and groups; PyTorch's ProcessGroupNCCL; ``FACTS.md``, "NCCL point-to-point"):

- a send completes only together with its matching receive, at any size
  (``ncclSend`` "is blocking for the GPU");
- ops run on a stream in the order they were posted. PyTorch runs the unbatched
  ``isend``/``irecv`` between two ranks on one communicator and stream per rank
  pair, both directions (``streams="pair"``); batched ops (``batch_isend_irecv``),
  every op once the communicator is initialised eagerly, and collectives share the
  process group's communicator: one stream per rank for every peer
  (``streams="rank"``, the stricter model). Ops on different communicators run
  concurrently in practice, but NCCL's guide asks that operations on different
  communicators be submitted in the same order across ranks ("Using multiple NCCL
  communicators concurrently"; NVIDIA/nccl issues 195, 1174): ``streams="device"``
  puts all of a rank's ops, every communicator's, on one queue, the strictest model;
- a batch (one ``ncclGroupStart``/``ncclGroupEnd``) completes as one unit, once
  every op in it can;
- the k-th send from a to b on a communicator matches the k-th receive on b from a
  there (there are no tags), and the k-th collective of a communicator on every
  member meets the k-th on the others;
- the host goes on after posting and blocks only where it waits.

A :class:`Trace` is what one rank posts and waits for, in order: the engine's
recorded calls (``tests/test_nccl.py``) or a lowered program
(:func:`program_traces`; :func:`grid_traces` on a pipe x data grid with each MoE
layer's all-to-alls on its expert group, a process group with its own communicator and
stream). :func:`run` plays all ranks' traces under those rules and returns the
:class:`Outcome`: finished, or stuck with each rank's blocked wait and the ops at the
heads of its streams.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Literal

from .actions import Kind
from .schedule import Message, Schedule

Streams = Literal["pair", "rank", "device"]
# what every program is checked under; "device" (stricter still) where expert parallelism
# puts a second communicator beside the pipeline's
STREAMS: tuple[Streams, ...] = ("pair", "rank")


@dataclass(frozen=True)
class Op:
    """One communication op of a rank. ``group``: the ranks of the process group it is
    posted on (global ranks), and ``name`` tells apart groups of the same ranks (each
    has its own communicator); ``label``: what it carries (matched ops must agree)."""

    kind: Literal["send", "recv", "collective"]
    group: tuple[int, ...]
    peer: int = -1
    label: str = ""
    batched: bool = False
    name: str = ""
    where: str = ""  # for reports: the instruction that posted it


@dataclass(frozen=True)
class Event:
    """``post`` puts ``ops`` on their streams as one element (one op, or one batch);
    ``wait`` blocks the host until each of ``ops`` has completed. ``ops`` are indices
    into the trace's op list; ``step`` locates the event in a program (or -1)."""

    kind: Literal["post", "wait"]
    ops: tuple[int, ...]
    step: int = -1
    where: str = ""


@dataclass
class Trace:
    """One rank's ops and events, in the order the rank posted and waited."""

    ops: list[Op] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def post(self, ops: list[Op], step: int = -1, where: str = "") -> tuple[int, ...]:
        ids = tuple(range(len(self.ops), len(self.ops) + len(ops)))
        self.ops.extend(ops)
        self.events.append(Event("post", ids, step, where))
        return ids

    def wait(self, ids, step: int = -1, where: str = "") -> None:
        if ids:
            self.events.append(Event("wait", tuple(ids), step, where))


@dataclass(frozen=True)
class Outcome:
    """``blocked``: (rank, event index) of every host that could not go on; ``heads``:
    (rank, op index) of every op at the head of a stream that never completed."""

    finished: bool
    blocked: tuple[tuple[int, int], ...] = ()
    heads: tuple[tuple[int, int], ...] = ()
    report: str = ""


class CrossedMessagesError(ValueError):
    """Two matched ops disagree on what they carry: the ranks posted in crossing orders."""


def _communicator(rank: int, op: Op, streams: Streams) -> tuple:
    if op.kind != "collective" and streams == "pair" and not op.batched:
        return (op.group, op.name, "pair", min(rank, op.peer), max(rank, op.peer))
    return (op.group, op.name, "group")


def run(traces: list[Trace], streams: Streams) -> Outcome:
    """Play every rank's trace under NCCL's rules (module doc) until all finish or
    nothing can move. ``traces[r]`` is global rank r's."""
    ranks = len(traces)
    queues: dict[tuple, deque[tuple[int, tuple[int, ...]]]] = defaultdict(
        deque
    )  # (rank, comm) -> elements
    element: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}  # (rank, op) -> its element
    stream: dict[tuple[int, int], tuple] = {}  # (rank, op) -> its queue key
    # match key -> {rank: op}: p2p (comm, src, dst, k), collectives (comm, k)
    matches: dict[tuple, dict[int, int]] = defaultdict(dict)
    match_of: dict[tuple[int, int], tuple] = {}
    counters: dict[tuple, int] = defaultdict(int)
    done: list[set[int]] = [set() for _ in range(ranks)]
    pc = [0] * ranks

    def post(rank: int, ids: tuple[int, ...]) -> None:
        for i in ids:
            op = traces[rank].ops[i]
            # "device": matched per communicator as "rank", queued on one stream
            comm = _communicator(rank, op, "rank" if streams == "device" else streams)
            if op.kind == "collective":
                if rank not in op.group:
                    raise ValueError(
                        f"rank {rank} posts a collective on group {op.group} it is not in"
                    )
                base: tuple[object, ...] = (comm,)
            else:
                if not 0 <= op.peer < ranks or op.peer == rank:
                    raise ValueError(f"rank {rank} posts a {op.kind} to rank {op.peer}")
                base = (comm, rank, op.peer) if op.kind == "send" else (comm, op.peer, rank)
            key = base + (counters[(rank, op.kind) + base],)
            counters[(rank, op.kind) + base] += 1
            matches[key][rank] = i
            match_of[(rank, i)] = key
            stream[(rank, i)] = (rank, ("device",) if streams == "device" else comm)
        # a batch spanning several communicators (never posted by pp-ext) would be one
        # element on each of them; keep it on the first op's queue, which is stricter
        queue = stream[(rank, ids[0])]
        queues[queue].append((rank, ids))
        for i in ids:
            element[(rank, i)] = (rank, ids)

    def partners(rank: int, i: int) -> list[tuple[int, int]] | None:
        """(rank, op) of the ops ``rank``'s op ``i`` completes with; None if one is not posted."""
        op = traces[rank].ops[i]
        found = matches[match_of[(rank, i)]]
        want = [r for r in op.group if r != rank] if op.kind == "collective" else [op.peer]
        if any(r not in found for r in want):
            return None
        return [(r, found[r]) for r in want]

    def check_labels(rank: int, i: int, others: list[tuple[int, int]]) -> None:
        op = traces[rank].ops[i]
        for r, j in others:
            other = traces[r].ops[j]
            if other.label != op.label or (op.kind == "collective") != (other.kind == "collective"):
                raise CrossedMessagesError(
                    f"rank {rank}'s {_name(op)} meets rank {r}'s {_name(other)}: the ranks posted in crossing orders"
                )

    while True:
        moved = False
        for rank in range(ranks):
            events = traces[rank].events
            while pc[rank] < len(events):
                event = events[pc[rank]]
                if event.kind == "post":
                    post(rank, event.ops)
                elif not all(i in done[rank] for i in event.ops):
                    break
                pc[rank] += 1
                moved = True
        heads = {queue[0] for queue in queues.values() if queue}
        ready = set(heads)
        changed = True
        while (
            changed
        ):  # the largest set of head elements whose every op meets its partners in the set
            changed = False
            for head in list(ready):
                rank, ids = head
                for i in ids:
                    found = partners(rank, i)
                    if found is None or any(element[p] not in ready for p in found):
                        ready.discard(head)
                        changed = True
                        break
        for rank, ids in sorted(ready):
            for i in ids:
                found = partners(rank, i)
                assert found is not None  # in ready: every partner is posted
                check_labels(rank, i, found)
        for rank, ids in ready:
            queues[stream[(rank, ids[0])]].popleft()
            done[rank].update(ids)
            moved = True
        if not moved:
            break

    blocked = tuple((r, pc[r]) for r in range(ranks) if pc[r] < len(traces[r].events))
    stuck = tuple(
        sorted((rank, ids[0]) for queue in queues.values() if queue for rank, ids in [queue[0]])
    )
    if not blocked and not stuck:
        return Outcome(True)
    lines = []
    for r, e in blocked:
        event = traces[r].events[e]
        waiting = [traces[r].ops[i] for i in event.ops if i not in done[r]]
        lines.append(
            f"rank {r} waits{' at ' + event.where if event.where else ''} for "
            + ", ".join(f"{op.kind} {op.label}" for op in waiting)
        )
    for r, i in stuck:
        op = traces[r].ops[i]
        lines.append(f"rank {r}'s stream {_stream(r, op, streams)} is held by its {_name(op)}")
    return Outcome(False, blocked, stuck, "; ".join(lines))


def _name(op: Op) -> str:
    return f"{op.kind} {op.label}" + (f" ({op.where})" if op.where and op.where != op.label else "")


def _stream(rank: int, op: Op, streams: Streams) -> str:
    if streams == "device":
        return "on the device (every communicator's)"
    comm = _communicator(rank, op, streams)
    return f"to rank {op.peer}" if comm[2] == "pair" else f"on group {op.name or list(op.group)}"


# ---------------------------------------------------------------------- lowered programs


def messages(schedule: Schedule) -> dict[tuple[int, object], Message]:
    """(rank, its send or receive action) -> the message that action carries."""
    found: dict[tuple[int, object], Message] = {}
    for rank, program in enumerate(schedule.programs):
        for action in program:
            if action.kind.is_compute:
                for message in schedule.outgoing(rank, action):
                    found[(rank, message.send())] = found[(message.dst, message.recv())] = message
    return found


def _label(message: Message) -> str:
    """``F3.c1 r0->r1``: the activation of micro-batch 3 from chunk 1 of rank 0 (``B``: a gradient)."""
    chunk = f".c{message.src_chunk}" if message.src_chunk else ""
    return (
        f"{'B' if message.grad else 'F'}{message.micro_batch}{chunk} r{message.src}->r{message.dst}"
    )


def program_traces(schedule: Schedule) -> list[Trace]:
    """The traces the engine posts for a lowered, structurally valid program
    (:func:`pp_ext.schedules.validate.check_structure`, then the buffered dry run):
    each ``sF``/``sB`` posts a send, each ``rF``/``rB`` a receive, and the end of the
    program waits for every send. The host waits right at each receive, as it does for
    a shape header: stricter than the engine, which waits for a tensor where it is used
    (a program that finishes so finishes there too: deferring a wait only frees the host)."""
    carried = messages(schedule)
    return [
        _program_trace(schedule, rank, carried, tuple(range(schedule.ranks)))
        for rank in range(schedule.ranks)
    ]


def _program_trace(
    schedule: Schedule,
    rank: int,
    carried: dict[tuple[int, object], Message],
    pipeline: tuple[int, ...],
    name: str = "",
    experts: tuple[ExpertGroup, dict[int, int]] | None = None,
) -> Trace:
    """Pipeline rank ``rank``'s trace, its peers the global ranks ``pipeline`` (its
    pipeline's, by pipeline rank) on the communicator ``name``; ``experts``: its expert
    group and the MoE layers of each of its chunks, whose all-to-alls each F, B and I
    of the chunk posts (:func:`expert_collectives`)."""
    trace = Trace()
    sends: list[int] = []
    for step, action in enumerate(schedule.programs[rank]):
        if action.kind.is_comm:
            message = carried[(rank, action)]
            send = action.kind in (Kind.SEND_ACT, Kind.SEND_GRAD)
            op = Op(
                "send" if send else "recv",
                pipeline,
                pipeline[message.dst if send else message.src],
                _label(message),
                name=name,
                where=str(action),
            )
            ids = trace.post([op], step, op.where)
            if send:
                sends += ids
            else:
                trace.wait(ids, step, op.where)
        elif experts is not None:
            group, layers = experts
            for op in expert_collectives(action, layers.get(action.chunk, 0), group):
                trace.wait(trace.post([op], step, op.where), step, op.where)
    trace.wait(sends, len(schedule.programs[rank]) - 1, "the end of the program")
    return trace


# ---------------------------------------------------------------------- expert parallelism


@dataclass(frozen=True)
class ExpertGroup:
    """The global ranks of one expert group and its communicator's name (DeepSpeed's
    ``ep_size_<E>``, a process group of its own: its own communicator and stream)."""

    ranks: tuple[int, ...]
    name: str


# what one MoE layer's dispatch (pp_ext.moe.dispatch.dispatched_forward) exchanges: the
# per-expert counts, the rows to the experts, the results back; its backward (autograd,
# in reverse) the gradient of the results, then of the rows; the counts have none. W holds
# only the experts' weight GEMMs (pp_ext.moe.experts): no exchange
FORWARD_EXCHANGES = ("counts", "rows", "back")
BACKWARD_EXCHANGES = ("back grad", "rows grad")


def expert_collectives(action, moe_layers: int, group: ExpertGroup) -> list[Op]:
    """The all-to-alls, in order, a compute ``action`` of a chunk holding ``moe_layers``
    MoE layers posts on its expert group: F the forward exchanges layer by layer,
    B and I the backward ones from the last layer back, W none."""
    if action.kind is Kind.F:
        order = [(layer, what) for layer in range(moe_layers) for what in FORWARD_EXCHANGES]
    elif action.kind in (Kind.B, Kind.I):
        order = [
            (layer, what) for layer in reversed(range(moe_layers)) for what in BACKWARD_EXCHANGES
        ]
    else:
        order = []
    return [
        Op("collective", group.ranks, label=f"{what} of {action} MoE {layer}", name=group.name)
        for layer, what in order
    ]


def expert_groups(ranks: int, data: int, expert: int) -> list[list[int]]:
    """Each stage's ``data`` ranks cut into groups of ``expert`` consecutive ones, as
    DeepSpeed lays them out (``deepspeed.utils.groups._get_expert_parallel_ranks``, one
    tensor rank) on the pipe x data grid, global rank ``pipeline rank * data + data rank``."""
    if expert < 1 or data % expert:
        raise ValueError(f"expert parallelism over {expert} ranks must divide {data} data ranks")
    return [
        list(range(stage * data + start, stage * data + start + expert))
        for stage in range(ranks)
        for start in range(0, data, expert)
    ]


def grid_traces(
    schedule: Schedule, data: int, expert: int, moe_layers: dict[tuple[int, int], int]
) -> list[Trace]:
    """The traces of every rank of a pipe x ``data`` grid running the lowered ``schedule``
    (global rank ``pipeline rank * data + data rank``, DeepSpeed's topology with one tensor
    rank): each pipeline's p2p on its own communicator (:mod:`pp_ext.engine.p2p`), each MoE
    layer's all-to-alls on its stage's expert group of ``expert`` data ranks
    (:func:`expert_groups`); ``moe_layers``: (pipeline rank, chunk) -> MoE layers it runs.
    Every all-to-all blocks the host: the counts' does (``.tolist()``), and every op posted
    after the others, on any stream, waits for them through the compute stream."""
    carried = messages(schedule)
    group_of = {
        rank: ExpertGroup(tuple(ranks), f"ep_size_{expert}")
        for ranks in expert_groups(schedule.ranks, data, expert)
        for rank in ranks
    }
    traces = []
    for rank in range(schedule.ranks * data):
        stage_rank, data_rank = divmod(rank, data)
        pipeline = tuple(r * data + data_rank for r in range(schedule.ranks))
        layers = {c: n for (r, c), n in moe_layers.items() if r == stage_rank}
        traces.append(
            _program_trace(
                schedule, stage_rank, carried, pipeline, "pipeline", (group_of[rank], layers)
            )
        )
    return traces
