"""Point-to-point transfers between any two pipeline ranks, as NCCL needs them.

NCCL's rules (FACTS.md, "NCCL point-to-point"): a send completes only with its
receive, and ops on one stream complete in posting order. Lowering
(:mod:`pp_ext.schedules.lower`) orders every rank's sends and receives as the
projection of one global sequence of transfers, which finishes under those rules
(:mod:`pp_ext.schedules.nccl` proves it for every program); this module posts
exactly that, in program order:

- every op on one process group per pipeline (:func:`pipeline_link`), made for pp-ext and
  initialised by a collective of its ranks at once: one communicator and stream
  per rank, the stricter of NCCL's stream models; the first ``batch_isend_irecv``
  of a group need not involve every rank then; and DeepSpeed's collectives on its
  own pipe group (the loss broadcast after each ``train_batch``) never queue behind
  a receive an asynchronous engine leaves in flight between calls;
- each message (a stage's tensors) as one ``batch_isend_irecv``, one NCCL group;
- without waiting: the engine waits for a receive where its tensors are needed and
  for its sends at the end of the step (:class:`Posted`).

Messages on one (src, dst) channel match in posting order (no tags: NCCL has none),
so two engines on the same ranks must not interleave while one has messages in
flight (an asynchronous engine between calls): :func:`claim_channels` refuses that
with an error instead of letting the messages meet and hang.

Shapes: the first activation crossing a stage boundary is preceded by a small
header (count, then dtype, requires_grad, rank and sizes of each tensor); later
ones reuse it unless shapes are dynamic. The receiver waits for the header where it
posts the receive, before the tensors' receive; that is the same place in the
sequence on both ranks. Gradients need no header: the receiver made the tensors they
belong to.

``PP_EXT_P2P=emulate-nccl`` runs the same posts on gloo through
:class:`pp_ext.engine.nccl_emulation.EmulatedNccl`, which enforces NCCL's rules
instead of gloo's buffering (on NCCL it changes nothing): the test suite runs under it.
"""

from __future__ import annotations

import datetime
import os
import weakref
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as torch_dist
from deepspeed import comm as dist

from .nccl_emulation import EmulatedNccl

DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
MAX_TENSORS = 16
MAX_DIMS = 8
_FIELDS = 3 + MAX_DIMS  # dtype, requires_grad, ndim, sizes
MODE_VARIABLE = "PP_EXT_P2P"
EMULATE = "emulate-nccl"

# engines of this process whose messages are still on the channels between calls
_in_flight: weakref.WeakSet = weakref.WeakSet()


def hold_channels(engine, holding: bool) -> None:
    """``engine`` leaves messages in flight when its call returns (``holding``) or has
    drained them."""
    (_in_flight.add if holding else _in_flight.discard)(engine)


def claim_channels(engine) -> None:
    """Raise before ``engine`` posts a message while another engine has some in
    flight: they would meet that engine's messages on the same channels (every rank
    of the pipeline raises alike, as every rank holds the same calls)."""
    for other in list(_in_flight):
        if other is not engine:
            raise RuntimeError(
                f"schedule {other.schedule.name} still has micro-batches in flight on these ranks: "
                f"call its engine's flush() before running another engine (messages between two "
                f"ranks are matched in posting order)"
            )


class Batch(Protocol):
    """Ops posted together: :class:`Posted`, or NCCL's rules emulated on gloo."""

    def wait(self) -> None:
        """Return once all have completed."""


class Posted:
    """Ops posted together; ``wait()`` returns once all have completed."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class Link:
    """This rank's point-to-point ops, all on ``group`` (global ranks as peers)."""

    def __init__(self, group, emulated: EmulatedNccl | None = None) -> None:
        self.group = group
        self.emulated = emulated

    def post(
        self,
        sends: Sequence[tuple[torch.Tensor, int]] = (),
        receives: Sequence[tuple[torch.Tensor, int]] = (),
    ) -> Batch:
        """Post ``(tensor, peer)`` sends and receives as one batch, without waiting."""
        if self.emulated is not None:
            return self.emulated.post(sends, receives)
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in receives]
        return Posted(dist.batch_isend_irecv(ops) if ops else [])


def default_timeout() -> datetime.timedelta | None:
    """The default process group's timeout (``parallel.comm_timeout_s``), for the groups made here."""
    group = torch_dist.distributed_c10d._get_default_group()
    try:
        return group._get_backend(torch.device(_device_type())).options._timeout
    except (AttributeError, RuntimeError):
        return None


def emulating() -> bool:
    """``PP_EXT_P2P=emulate-nccl`` on gloo: NCCL's rules emulated (on NCCL it changes nothing)."""
    return os.environ.get(MODE_VARIABLE, "") == EMULATE and _device_type() == "cpu"


def _device_type() -> str:
    return "cuda" if torch_dist.get_backend() == "nccl" else "cpu"


_links: dict[tuple, Link] = {}


def pipeline_link(pipelines: Sequence[Sequence[int]], rank: int, device) -> Link:
    """The :class:`Link` of ``rank`` in its pipeline; ``pipelines``: the global ranks of
    every pipeline (DeepSpeed's pipe axis lists), the same on every rank. The groups are
    made once per process and layout: every rank calls this at the same point (engine
    construction), as ``new_group`` needs. With one stage nothing crosses ranks and no
    group is made."""
    mode = os.environ.get(MODE_VARIABLE, "")
    if mode not in ("", EMULATE):
        raise ValueError(
            f"{MODE_VARIABLE}={mode!r} is not a p2p mode: use {EMULATE} or leave it unset"
        )
    key = tuple(map(tuple, pipelines))
    if key in _links:
        return _links[key]
    if max(map(len, key)) == 1:
        _links[key] = Link(None)
        return _links[key]
    timeout = default_timeout()
    groups = [
        torch_dist.new_group(list(ranks), timeout=timeout or None)  # None: torch's default
        for ranks in key
    ]
    mine = next(g for ranks, g in zip(key, groups) if rank in ranks)
    # a collective first: the group's communicator exists before any batched p2p
    torch_dist.all_reduce(torch.zeros(1, device=device), group=mine)
    # on NCCL the rules are NCCL's own: nothing to emulate
    emulated = EmulatedNccl(mine, timeout) if mode == EMULATE and _device_type() == "cpu" else None
    _links[key] = Link(mine, emulated)
    return _links[key]


class TensorSpec(tuple):
    """(shape, dtype, requires_grad) of one tensor crossing ranks."""

    shape = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    requires_grad = property(lambda self: self[2])


def as_tuple(value) -> tuple[torch.Tensor, ...]:
    if torch.is_tensor(value):
        return (value,)
    if isinstance(value, (tuple, list)) and all(torch.is_tensor(t) for t in value):
        return tuple(value)
    raise TypeError(
        f"pipeline stages must pass a tensor or a tuple of tensors, got {type(value).__name__}"
    )


def specs_of(tensors: Sequence[torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec((tuple(t.shape), t.dtype, t.requires_grad)) for t in tensors]


def send_header(link: Link, specs: Sequence[TensorSpec], dst: int, device) -> Batch:
    if len(specs) > MAX_TENSORS:
        raise ValueError(
            f"a stage passes {len(specs)} tensors; at most {MAX_TENSORS} are supported"
        )
    header = torch.zeros(1 + MAX_TENSORS * _FIELDS, dtype=torch.int64)
    header[0] = len(specs)
    for i, spec in enumerate(specs):
        if len(spec.shape) > MAX_DIMS:
            raise ValueError(
                f"tensor of rank {len(spec.shape)} crosses stages; at most {MAX_DIMS} dims"
            )
        if spec.dtype not in DTYPES:
            raise ValueError(f"dtype {spec.dtype} cannot cross stages; use one of {DTYPES}")
        base = 1 + i * _FIELDS
        header[base : base + 3] = torch.tensor(
            [DTYPES.index(spec.dtype), int(spec.requires_grad), len(spec.shape)]
        )
        header[base + 3 : base + 3 + len(spec.shape)] = torch.tensor(spec.shape, dtype=torch.int64)
    return link.post(sends=[(header.to(device), dst)])


def recv_header(link: Link, src: int, device) -> list[TensorSpec]:
    """Receive a header and wait for it (the receive of the tensors needs the shapes)."""
    header = torch.zeros(1 + MAX_TENSORS * _FIELDS, dtype=torch.int64, device=device)
    link.post(receives=[(header, src)]).wait()
    values = header.tolist()
    specs = []
    for i in range(values[0]):
        base = 1 + i * _FIELDS
        dtype, requires_grad, ndim = values[base : base + 3]
        specs.append(
            TensorSpec(
                (tuple(values[base + 3 : base + 3 + ndim]), DTYPES[dtype], bool(requires_grad))
            )
        )
    return specs


def send_tensors(link: Link, tensors: Sequence[torch.Tensor], dst: int) -> Batch:
    """Post the sends of one message; the caller keeps the result until it is done
    (it holds the tensors)."""
    return link.post(sends=[(t.detach().contiguous(), dst) for t in tensors])


def recv_tensors(
    link: Link, specs: Sequence[TensorSpec], src: int, device
) -> tuple[tuple[torch.Tensor, ...], Batch]:
    """Post the receives of one message: its buffers, and what to wait on before reading them."""
    buffers = tuple(torch.empty(spec.shape, dtype=spec.dtype, device=device) for spec in specs)
    return buffers, link.post(receives=[(b, src) for b in buffers])
