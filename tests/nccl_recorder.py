"""Records a rank's communication calls as a :class:`pp_ext.schedules.nccl.Trace`.

Inside ``with recording() as trace:`` every call a rank makes through
``deepspeed.comm`` (``send``, ``recv``, ``isend``, ``irecv``, ``batch_isend_irecv``,
``all_reduce``, ``broadcast``, ``all_gather``, ``barrier`` ...) and the collectives
pp-ext's tensor-parallel layers call on ``torch.distributed`` directly become ops on
the trace, in call order, with the process group's ranks and name; a blocking call is a
post and a wait, an asynchronous one a post, and each ``wait()`` on the works it
returned a wait. A call made inside a recorded one (deepspeed.comm calling torch) is not
recorded again. The label of a point-to-point op is its dtype and shape, which the two
sides of a transfer must agree on; of a collective its name and first tensor's (an
all-to-all with variable splits without its first size, which each member has its own).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import threading

import deepspeed.comm as ds_comm
import deepspeed.comm.comm as ds_comm_module
import torch
import torch.distributed as torch_dist

from pp_ext.schedules import Kind, Schedule
from pp_ext.schedules.nccl import STREAMS, Op, Trace, run

P2P = ("send", "recv", "isend", "irecv")
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "barrier",
    "reduce",
    "gather",
    "scatter",
)


def _group(group) -> tuple[tuple[int, ...], str]:
    if group is None:
        group = torch_dist.distributed_c10d._get_default_group()
    return tuple(torch_dist.get_process_group_ranks(group)), group.group_name


def _label(tensor) -> str:
    if isinstance(tensor, (list, tuple)):
        return "+".join(_label(t) for t in tensor)
    return (
        f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
        if torch.is_tensor(tensor)
        else ""
    )


class _Recorder:
    def __init__(self) -> None:
        self.trace = Trace()
        self.local = threading.local()

    def inside(self) -> bool:
        return getattr(self.local, "depth", 0) > 0

    @contextlib.contextmanager
    def call(self):
        self.local.depth = getattr(self.local, "depth", 0) + 1
        try:
            yield
        finally:
            self.local.depth -= 1

    def works(self, result, ids: tuple[int, ...], where: str):
        """Wrap what an asynchronous call returned so that waiting on it is recorded."""
        if result is None:
            return None
        if isinstance(result, list):
            return [self.works(work, ids, where) for work in result]
        return _Work(self, result, ids, where)


class _Work:
    def __init__(self, recorder: _Recorder, work, ids: tuple[int, ...], where: str) -> None:
        self._recorder, self._work, self._ids, self._where = recorder, work, ids, where

    def wait(self, *args, **kwargs):
        self._recorder.trace.wait(self._ids, where=self._where)
        with self._recorder.call():
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


# taken before anything is patched
SIGNATURES = {
    name: inspect.signature(getattr(torch_dist, name))
    for name in P2P + COLLECTIVES
    if hasattr(torch_dist, name)
}


def _arguments(name: str, args, kwargs) -> dict:
    """The call's arguments by name: deepspeed.comm's functions take torch.distributed's
    parameters in torch's order (plus logging keywords), behind a signature-less wrapper."""
    signature = SIGNATURES[name]
    return signature.bind_partial(
        *args, **{k: v for k, v in kwargs.items() if k in signature.parameters}
    ).arguments


def _p2p_wrapper(recorder: _Recorder, name: str, original):
    blocking = name in ("send", "recv")
    kind = "send" if name in ("send", "isend") else "recv"

    def wrapper(*args, **kwargs):
        if recorder.inside():
            return original(*args, **kwargs)
        given = _arguments(name, args, kwargs)
        peer = given.get("dst", given.get("src"))
        ranks, group_name = _group(given.get("group"))
        ids = recorder.trace.post(
            [Op(kind, ranks, peer, _label(given["tensor"]), name=group_name, where=name)],
            where=name,
        )
        with recorder.call():
            result = original(*args, **kwargs)
        if blocking:
            recorder.trace.wait(ids, where=name)
            return result
        return recorder.works(result, ids, name)

    return wrapper


def _batch_wrapper(recorder: _Recorder, original):
    def wrapper(ops, *args, **kwargs):
        if recorder.inside():
            return original(ops, *args, **kwargs)
        posted = []
        for op in ops:
            ranks, group_name = _group(op.group)
            posted.append(
                Op(
                    "send" if op.op == "isend" else "recv",
                    ranks,
                    op.peer,
                    _label(op.tensor),
                    batched=True,
                    name=group_name,
                    where="batch_isend_irecv",
                )
            )
        ids = recorder.trace.post(posted, where="batch_isend_irecv")
        with recorder.call():
            works = original(ops, *args, **kwargs)
        # gloo gives a work per op, NCCL one for the batch: each wait stands for the batch
        return recorder.works(list(works), ids, "batch_isend_irecv")

    return wrapper


def _collective_wrapper(recorder: _Recorder, name: str, original):
    def wrapper(*args, **kwargs):
        if recorder.inside():
            return original(*args, **kwargs)
        given = _arguments(name, args, kwargs)
        ranks, group_name = _group(given.get("group"))
        tensors = args[:1] if name != "barrier" else ()
        label = _label(list(tensors))
        if name == "all_to_all_single" and given.get("output_split_sizes") is not None:
            # variable splits: each member receives its own number of rows
            label = re.sub(r"\[\d+", "[*", label)
        ids = recorder.trace.post(
            [
                Op(
                    "collective",
                    ranks,
                    label=f"{name} {label}",
                    name=group_name,
                    where=name,
                )
            ],
            where=name,
        )
        with recorder.call():
            result = original(*args, **kwargs)
        if given.get("async_op"):
            return recorder.works(result, ids, name)
        recorder.trace.wait(ids, where=name)
        return result

    return wrapper


@contextlib.contextmanager
def recording():
    """Record this rank's communication calls while the block runs; yields the Trace."""
    recorder = _Recorder()
    patches = []
    for name in P2P:
        wrapper = _p2p_wrapper(recorder, name, getattr(ds_comm, name))
        # P2POp asserts its op is comm.py's own isend/irecv: patch both names alike
        patches += [(ds_comm, name, wrapper), (ds_comm_module, name, wrapper)]
    patches.append(
        (ds_comm, "batch_isend_irecv", _batch_wrapper(recorder, ds_comm.batch_isend_irecv))
    )
    for name in COLLECTIVES:
        for module in (ds_comm, torch_dist):
            if hasattr(module, name):
                patches.append(
                    (module, name, _collective_wrapper(recorder, name, getattr(module, name)))
                )
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, wrapper in patches:
            setattr(module, name, wrapper)
        yield recorder.trace
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def record(case_runner, *args):
    """``case_runner(*args)`` with this rank's communication calls recorded."""
    with recording() as trace:
        result = case_runner(*args)
    return result, trace


def run_recorded(rank: int, world: int, harness: str, *args) -> list:
    """``harness.run_cases(rank, world, *args)`` (a tests/ module) on plain gloo, each case's
    ``run_case`` recorded: (result, trace) per case. Plain gloo, not the emulation: the
    recorder sees the engine's own calls. (In this rank's own interpreter, so rebinding the
    harness's ``run_case`` reaches nothing else.)"""
    os.environ["PP_EXT_P2P"] = ""
    module = importlib.import_module(harness)
    run_case = module.run_case
    module.run_case = lambda *case: record(run_case, *case)
    return module.run_cases(rank, world, *args)


def replay(results_by_rank: list[list]) -> list[str]:
    """Replay each case's recorded traces under both stream models; what did not finish."""
    failures = []
    for i, (result, _) in enumerate(results_by_rank[0]):
        traces_of_case = [results[i][1] for results in results_by_rank]
        assert sum(op.kind != "collective" for t in traces_of_case for op in t.ops), (
            "nothing recorded"
        )
        for streams in STREAMS:
            outcome = run(traces_of_case, streams)
            if not outcome.finished:
                failures.append(f"{result['case']} ({streams} streams): {outcome.report}")
    return failures


def launch_recorded(world: int, harness: str, *args) -> list[list]:
    """:func:`run_recorded` on ``world`` ranks; every case's traces replay to the end under
    NCCL's stream models (pp_ext.schedules.nccl), or this fails naming the cases that hang.
    Each rank's results, traces dropped."""
    from pp_ext.testing.spawn import spawn

    ranks = spawn(run_recorded, world, harness, *args)
    failures = replay(ranks)
    assert not failures, "\n".join(failures)
    return [[result for result, _ in results] for results in ranks]


def one_global_order(lowered: Schedule) -> bool:
    """True if some single sequence of transfers has every rank's sends and receives in
    program order: a node per message (its send and its receive), an edge between
    consecutive messages of each rank's program; Kahn's algorithm finds no cycle."""
    edges: dict[tuple, set] = {}
    for rank, program in enumerate(lowered.programs):
        chain = []
        for action in program:
            if action.kind.is_comm:
                # a message is (gradient?, micro-batch, the stage that made it): a send names
                # its own chunk, a receive its chunk one stage after (activations) or before
                grad = action.kind in (Kind.SEND_GRAD, Kind.RECV_GRAD)
                stage = lowered.placement.holds(rank, action.chunk)[1]
                if action.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
                    stage += 1 if grad else -1
                chain.append((grad, action.micro_batch, stage))
        for node in chain:
            edges.setdefault(node, set())
        for a, b in zip(chain, chain[1:]):
            edges[a].add(b)
    indegree = {node: 0 for node in edges}
    for targets in edges.values():
        for node in targets:
            indegree[node] += 1
    ready = [node for node, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for target in edges[node]:
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
    return seen == len(edges)
