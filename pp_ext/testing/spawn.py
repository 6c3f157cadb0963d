"""Run a function on N local ranks joined by a gloo (or NCCL) process group.

Used by the tests and by ``pp-ext bench``: one launch runs many cases, since a
DeepSpeed launch costs seconds of start-up (FACTS: ~12 s per ``deepspeed`` launch).
If any rank fails, the others are stopped and the failure's traceback is raised;
nothing waits forever.
"""

from __future__ import annotations

import os
import queue as queue_errors
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from pp_ext.engine.distributed import init_distributed, select_accelerator


class RankFailed(RuntimeError):
    """A rank raised or died; the message holds its traceback."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_rank(
    rank: int, world_size: int, port: int, threads: int = 1, comm_timeout_s: float | None = None
) -> None:
    """Environment and process group of one local rank (CPU: gloo, one thread)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    init_distributed(rank, comm_timeout_s)


def _entry(
    fn: Callable,
    rank: int,
    world_size: int,
    port: int,
    results,
    args: tuple,
    comm_timeout_s: float | None,
    filters: list,
) -> None:
    # ranks talk on stderr: the parent's stdout is for its own results (e.g. --json)
    os.dup2(2, 1)
    # the parent's warning filters (pytest's filterwarnings): a warning that fails a test
    # in the parent fails it in a rank too
    warnings.filters[:] = filters  # type: ignore[index]  # typeshed: a Sequence; in place, so _warnings sees it
    try:
        init_rank(rank, world_size, port, comm_timeout_s=comm_timeout_s)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report everything, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 900,
    comm_timeout_s: float | None = None,
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; results by rank.

    ``fn`` must be importable by name (a module-level function). ``comm_timeout_s``
    bounds every wait for a peer (as ``parallel.comm_timeout_s``; None: torch's default)."""
    select_accelerator()  # each rank imports fn's module, and with it deepspeed, before anything else
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, rank, world_size, port, results, args, comm_timeout_s, warnings.filters),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1)
            except queue_errors.Empty:
                # a rank that exits without reporting (killed, crashed interpreter) fails the run now
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
                if dead:
                    raise RankFailed(
                        f"rank(s) {dead} exited (code {procs[dead[0]].exitcode}) without a result"
                    ) from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"no result within {timeout:.0f} s") from None
                continue
            if not ok:
                raise RankFailed(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return [out[rank] for rank in range(world_size)]
