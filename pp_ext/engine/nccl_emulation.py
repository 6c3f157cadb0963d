"""NCCL's point-to-point rules on gloo, for tests (``PP_EXT_P2P=emulate-nccl``).

Gloo buffers a send and matches each (peer, direction) on its own, so a program
that posts in crossing orders passes on CPU and hangs on GPUs. Here every batch a
rank posts goes, in posting order, onto one queue per rank that a worker thread
runs one element at a time, as NCCL runs one stream per communicator: a send
completes only once its receiver has taken it (the receiver acknowledges each
message), and nothing behind an element starts before it completes. A crossing
order then fails as it would under NCCL, with gloo's timeout naming the wait,
instead of passing. (One stream per rank for every peer is the stricter of NCCL's
stream models, and the one pp-ext's engine uses: :mod:`pp_ext.engine.p2p`.)

Collectives on a process group of their own (the expert group's all-to-alls,
:func:`all_to_all`) have their own communicator and stream under NCCL: they never
queue behind the pipeline's p2p, and gloo, whose collectives block the host,
orders them as NCCL's stream order does (every op posted after one waits for it
through the compute stream; the host itself waits at the counts' ``.tolist()``).
What gloo hides there is a crossing: the k-th collective of one member meets the
k-th of every other whatever each one is, so two members posting different
exchanges in their k-th place pass with wrong data where the sizes agree. The
emulation has each member show the others what it posts first, and fails naming
both; and it waits no longer than the default group's timeout.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist

_DATA, _ACK = 0, 1
_NAME_BYTES = 64
_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class _Element:
    """One posted batch; ``wait()`` blocks the host until the worker has run it."""

    def __init__(self, sends, receives) -> None:
        self.sends, self.receives = list(sends), list(receives)
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"emulated NCCL p2p: {self.error}") from self.error


class EmulatedNccl:
    """Runs posted batches in order on a worker thread, over the gloo ``group``, each
    send waiting for its receiver's acknowledgement."""

    def __init__(self, group, timeout: datetime.timedelta | None) -> None:
        self.group = group
        self.timeout = timeout or _DEFAULT_TIMEOUT
        self.queue: queue.SimpleQueue[_Element] = queue.SimpleQueue()
        self.broken: BaseException | None = None
        threading.Thread(target=self._work, name="pp-ext emulated NCCL stream", daemon=True).start()

    def post(
        self,
        sends: Sequence[tuple[torch.Tensor, int]] = (),
        receives: Sequence[tuple[torch.Tensor, int]] = (),
    ) -> _Element:
        element = _Element(sends, receives)
        self.queue.put(element)
        return element

    def _work(self) -> None:
        while True:
            element = self.queue.get()
            try:
                if (
                    self.broken is not None
                ):  # a stream that failed runs nothing more, as NCCL's aborts
                    raise RuntimeError(f"an earlier op on this stream failed ({self.broken})")
                self._run(element)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting host thread
                self.broken = self.broken or exc
                element.error = exc
            element.done.set()

    def _run(self, element: _Element) -> None:
        group = self.group
        data = [dist.isend(t, peer, group=group, tag=_DATA) for t, peer in element.sends]
        received = [
            (dist.irecv(t, peer, group=group, tag=_DATA), peer) for t, peer in element.receives
        ]
        for work, peer in received:
            self._wait(work, f"receive from rank {peer}")
        acks = [
            dist.isend(torch.ones(1), peer, group=group, tag=_ACK) for _, peer in element.receives
        ]
        for _, peer in element.sends:  # the send is complete once its receiver has taken it
            self._wait(
                dist.irecv(torch.zeros(1), peer, group=group, tag=_ACK),
                f"send to rank {peer} (its receive is not posted)",
            )
        for work in data + acks:
            assert work is not None  # None only on a rank outside the group
            work.wait()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{what}: {str(exc).strip().splitlines()[0]}") from None


def all_to_all(
    out: torch.Tensor,
    rows: torch.Tensor,
    out_splits: list[int] | None,
    in_splits: list[int] | None,
    group,
    what: str,
    timeout: datetime.timedelta | None,
) -> None:
    """``all_to_all_single`` on ``group``, once every member has shown it posts ``what``
    too (a RuntimeError naming the first that posts another), each wait bounded by
    ``timeout`` (None: 30 minutes)."""
    timeout = timeout or _DEFAULT_TIMEOUT
    encoded = what.encode()[:_NAME_BYTES]
    name = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
    name[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    names = [torch.zeros_like(name) for _ in range(dist.get_world_size(group))]
    _wait_collective(dist.all_gather(names, name, group=group, async_op=True), what, timeout)
    ranks = dist.get_process_group_ranks(group)
    for rank, other in zip(ranks, names):
        posted = bytes(other.tolist()).rstrip(b"\0")
        if posted != encoded:
            raise RuntimeError(
                f"emulated NCCL collectives: rank {dist.get_rank()} posts the all-to-all "
                f"{what!r} on group {ranks} while rank {rank} posts "
                f"{posted.decode(errors='replace')!r} there: the "
                f"members posted their collectives in crossing orders"
            )
    work = dist.all_to_all_single(out, rows, out_splits, in_splits, group=group, async_op=True)
    _wait_collective(work, what, timeout)


def _wait_collective(work, what: str, timeout: datetime.timedelta) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RuntimeError(f"emulated NCCL collectives: the all-to-all {what!r}: {first}") from None
