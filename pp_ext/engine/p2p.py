"""Point-to-point transfers between any two pipeline ranks.

DeepSpeed's ``p2p.send/recv`` only reach adjacent stages (and first <-> last),
which interleaved, V-shape and bidirectional placements go beyond; this uses
``deepspeed.comm`` isend/irecv, which reach any rank on gloo and NCCL alike.
Messages on one (src, dst) channel match in posting order (no tags: NCCL has
none), which lowering guarantees (:mod:`pp_ext.schedules.lower`). So two engines on
the same ranks must not interleave while one has messages in flight (an
asynchronous engine between calls): :func:`claim_channels` refuses that with an
error instead of letting the messages meet and hang.

Shapes: the first activation crossing a stage boundary is preceded by a small
header (count, then dtype, requires_grad, rank and sizes of each tensor); later
ones reuse it unless shapes are dynamic. Gradients need no header: the receiver
made the tensors they belong to.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from deepspeed import comm as dist

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool)
MAX_TENSORS = 16
MAX_DIMS = 8
_FIELDS = 3 + MAX_DIMS  # dtype, requires_grad, ndim, sizes


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
            raise RuntimeError(f"schedule {other.schedule.name} still has micro-batches in flight on these ranks: "
                               f"call its engine's flush() before running another engine (messages between two "
                               f"ranks are matched in posting order)")


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
    raise TypeError(f"pipeline stages must pass a tensor or a tuple of tensors, got {type(value).__name__}")


def specs_of(tensors: Sequence[torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec((tuple(t.shape), t.dtype, t.requires_grad)) for t in tensors]


def send_header(specs: Sequence[TensorSpec], dst: int, device) -> list:
    if len(specs) > MAX_TENSORS:
        raise ValueError(f"a stage passes {len(specs)} tensors; at most {MAX_TENSORS} are supported")
    header = torch.zeros(1 + MAX_TENSORS * _FIELDS, dtype=torch.int64, device=device)
    header[0] = len(specs)
    for i, spec in enumerate(specs):
        if len(spec.shape) > MAX_DIMS:
            raise ValueError(f"tensor of rank {len(spec.shape)} crosses stages; at most {MAX_DIMS} dims")
        if spec.dtype not in DTYPES:
            raise ValueError(f"dtype {spec.dtype} cannot cross stages; use one of {DTYPES}")
        base = 1 + i * _FIELDS
        header[base:base + 3] = torch.tensor([DTYPES.index(spec.dtype), int(spec.requires_grad), len(spec.shape)])
        header[base + 3:base + 3 + len(spec.shape)] = torch.tensor(spec.shape, dtype=torch.int64)
    return [dist.isend(header, dst)]


def recv_header(src: int, device) -> list[TensorSpec]:
    header = torch.zeros(1 + MAX_TENSORS * _FIELDS, dtype=torch.int64, device=device)
    dist.irecv(header, src).wait()
    values = header.tolist()
    specs = []
    for i in range(values[0]):
        base = 1 + i * _FIELDS
        dtype, requires_grad, ndim = values[base:base + 3]
        specs.append(TensorSpec((tuple(values[base + 3:base + 3 + ndim]), DTYPES[dtype], bool(requires_grad))))
    return specs


def _batched(op: str, tensors: Sequence[torch.Tensor], peer: int) -> list:
    # one batched call per message: a stage passing several tensors (hidden states,
    # masks, positions) pays one launch, and NCCL groups them into one transfer
    if len(tensors) <= 1:  # nothing to batch (a frozen stage sends no gradient back)
        return [getattr(dist, op)(t, peer) for t in tensors]
    return dist.batch_isend_irecv([dist.P2POp(getattr(dist, op), t, peer) for t in tensors])


def send_tensors(tensors: Sequence[torch.Tensor], dst: int) -> list:
    """Post non-blocking sends; the caller keeps the returned works until done."""
    return _batched("isend", [t.detach().contiguous() for t in tensors], dst)


def recv_tensors(specs: Sequence[TensorSpec], src: int, device) -> tuple[torch.Tensor, ...]:
    """Receive tensors of the given specs (posted together, then waited)."""
    buffers = [torch.empty(spec.shape, dtype=spec.dtype, device=device) for spec in specs]
    for work in _batched("irecv", buffers, src):
        work.wait()
    return tuple(buffers)
