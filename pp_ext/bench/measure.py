"""Measuring what the simulator prices: F, I, W and fused B of a chunk, the p2p
latency of one activation, and all-reduce latency and bandwidth.

One module for ``pp-ext bench`` (:mod:`pp_ext.bench.pipeline`, per-stage costs of its
engines) and the profiler (:mod:`pp_ext.bench.profiler`, per-layer costs of a recipe's
model), so that both time the same way. Medians over repeats, the first calls left
out (they allocate, select kernels and set up channels); on a GPU each timed call
waits for the device. The all-reduce is kept as latency + bytes / bandwidth (the
alpha-beta model of Hockney 1994, :mod:`pp_ext.schedules.cost_model`).
"""

from __future__ import annotations

import statistics
import time

import torch
from deepspeed import comm as dist

from pp_ext.autograd.split_backward import WeightGradStore, enable_split_backward
from pp_ext.engine.module import layer_name
from pp_ext.schedules.cost_model import LayerCost


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_passes(
    forward, backward, store, repeats: int, sync=lambda: None
) -> tuple[float, float, float, float]:
    """Median seconds of F, I, W and fused B of one stage: ``forward()`` returns what
    ``backward(out)`` differentiates; ``store`` is the split-backward store the
    stage's layers defer their weight gradients to; ``sync()`` waits for the device
    after W (a GPU's kernels are asynchronous)."""
    for _ in range(2):  # warm up: first calls pay for allocation and kernel selection
        backward(forward())
    f = median_time(forward, repeats)
    outs = [forward() for _ in range(repeats)]
    b = median_time(lambda: backward(outs.pop()), repeats)
    keys = iter(range(repeats))
    outs = [forward() for _ in range(repeats)]

    def input_grad():
        with store.defer(next(keys)):
            backward(outs.pop())

    i = median_time(input_grad, repeats)
    keys = iter(range(repeats))
    w = median_time(lambda: (store.run(next(keys)), sync()), repeats)
    return f, i, w, b


def _tensors(value) -> list:
    if torch.is_tensor(value):
        return [value]
    return [t for item in value for t in _tensors(item)] if isinstance(value, (tuple, list)) else []


def _detached(value):
    """A layer's output as the next layer's input: no history, float parts need grad."""
    if torch.is_tensor(value):
        return value.detach().requires_grad_(value.is_floating_point())
    return type(value)(_detached(v) for v in value)


def measure_layers(module, inputs, labels, repeats: int) -> list[LayerCost]:
    """Costs of each chunk of ``module`` (one rank holding every layer as its own
    chunk, in order), each fed the previous chunk's real output. Activation memory
    is the bytes autograd saves during the chunk's forward, less the parameters it
    saves (they are held anyway); parameter bytes count the trainable parameters,
    whose gradients a replica sum moves (a LoRA stage: the adapters)."""
    store = WeightGradStore()
    enable_split_backward(module, store)
    held = {p.data_ptr() for p in module.parameters()}
    # on a GPU kernels run asynchronously: each timed call waits for its own
    sync = torch.cuda.synchronize if labels.is_cuda else (lambda: None)
    costs, x = [], inputs
    for chunk in range(module.chunks):
        last = module.is_last_stage_chunk(chunk)

        def forward(x=x, chunk=chunk, last=last):
            out = module.chunk_forward(chunk, x)
            out = module.loss_fn(out, labels) if last else out
            sync()
            return out

        def backward(out):
            outs = [t for t in _tensors(out) if t.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            sync()

        saved = {}

        def pack(tensor):
            if tensor.data_ptr() not in held:
                saved[(tensor.data_ptr(), tensor.dtype)] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        f, i, w, b = time_passes(forward, backward, store, repeats, sync)
        start = module.chunk_bounds(chunk)[0]
        costs.append(
            LayerCost(
                layer_name(module._layer_specs[start]) or f"layer {start}",
                f,
                i,
                w,
                b,
                sum(saved.values()),
                sum(
                    p.numel() * p.element_size()
                    for p in module.chunk_parameters(chunk)
                    if p.requires_grad
                ),
            )
        )
        x = None if last else _detached(out)
    module.zero_grad(set_to_none=True)
    return costs


def comm_latency(shape: tuple[int, ...], repeats: int, rank: int) -> float:
    """Half a ping-pong of one float32 activation of ``shape`` between ranks 0 and 1
    (median of ``repeats``, the first exchange left out); every rank gets rank 0's figure."""
    tensor = torch.randn(shape)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(tensor, 1)
            dist.recv(tensor, 1)
        elif rank == 1:
            dist.recv(tensor, 0)
            dist.send(tensor, 0)
        times.append((time.perf_counter() - start) / 2)
    result = torch.tensor([statistics.median(times[1:]) if rank == 0 else 0.0])
    dist.broadcast(result, 0)
    return float(result)


def allreduce_seconds(flat, repeats: int, group=None) -> float:
    """Median seconds of an all-reduce of ``flat`` over ``group`` (default: all ranks),
    the first call left out (it sets up the channels); on a GPU each call is waited for."""
    sync = torch.cuda.synchronize if flat.is_cuda else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        sync()
        start = time.perf_counter()
        dist.all_reduce(flat, group=group)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


LARGEST_ALLREDUCE = 2**26  # elements: 256 MiB in fp32, long enough to see the bandwidth


def allreduce_model(module, repeats: int) -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of an all-reduce between this launch's
    ranks (all of them), from its median time on one element and on a buffer the
    size of ``module``'s parameters (what a replica sum moves at most; at most
    ``LARGEST_ALLREDUCE`` elements, so a large model's profile needs no second copy
    of it), on their device: t(n) = latency + n / bandwidth (Hockney 1994). Every
    rank gets the slowest rank's figures."""
    first = next(module.parameters())
    numel = min(sum(p.numel() for p in module.parameters()), LARGEST_ALLREDUCE)
    small, large = (
        allreduce_seconds(torch.zeros(n, device=first.device, dtype=first.dtype), repeats)
        for n in (1, numel)
    )
    result = torch.tensor([small, large], dtype=torch.float64, device=first.device)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    small, large = (float(t) for t in result)
    moved = (numel - 1) * first.element_size()
    # a large all-reduce timed no slower than a one-element one: bandwidth beyond what this can tell
    return small, moved / (large - small) if large > small else float("inf")
