"""Measuring what the simulator prices: F, I, W and fused B of a chunk, the p2p
latency of one activation, all-reduce and all-to-all latency and bandwidth, and the
bytes an MoE layer hands its experts (what expert parallelism's all-to-alls move).

One module for ``pp-ext bench`` (:mod:`pp_ext.bench.pipeline`, per-stage costs of its
engines) and the profiler (:mod:`pp_ext.bench.profiler`, per-layer costs of a recipe's
model), so that both time the same way. Medians over repeats, the first calls left
out (they allocate, select kernels and set up channels); on a GPU each timed call
waits for the device. The all-reduce and the all-to-all are kept as latency + bytes /
bandwidth (the alpha-beta model of Hockney 1994, :mod:`pp_ext.schedules.cost_model`).
"""

from __future__ import annotations

import statistics
import time

import torch
from deepspeed import comm as dist

from pp_ext.autograd.split_backward import WeightGradStore, enable_split_backward
from pp_ext.engine.distributed import comm_device
from pp_ext.engine.module import layer_name
from pp_ext.moe.experts import DeferrableExperts
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
    whose gradients a replica sum moves (a LoRA stage: the adapters); routed bytes
    are the token-expert rows the chunk's MoE experts receive in one forward (tokens x
    top_k x hidden x dtype bytes: what expert parallelism sends by all-to-all, whatever
    the routing; 0 in a dense chunk). The experts' weight GEMMs are timed in W
    (:class:`~pp_ext.moe.experts.DeferrableExperts`, bound to the store here)."""
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

        routed = []

        def count_rows(experts, args) -> None:
            hidden_states, top_k_index = args[:2]
            # each token-expert pair is one row of the hidden width (dispatch.py sends these)
            routed.append(
                top_k_index.numel() * hidden_states.size(-1) * hidden_states.element_size()
            )

        hooks = [
            sub.register_forward_pre_hook(count_rows)
            for layer in module.chunk_modules(chunk)
            for sub in layer.modules()
            if issubclass(type(sub), DeferrableExperts)  # a mixin: keeps sub typed as a Module
        ]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        for hook in hooks:
            hook.remove()
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
                sum(routed),
            )
        )
        x = None if last else _detached(out)
    module.zero_grad(set_to_none=True)
    return costs


def comm_latency(shape: tuple[int, ...], repeats: int, rank: int) -> float:
    """Half a ping-pong of one float32 activation of ``shape`` between ranks 0 and 1
    (median of ``repeats``, the first exchange left out); every rank gets rank 0's figure."""
    tensor = torch.randn(shape, device=comm_device())  # NCCL sends no CPU tensor
    sync = torch.cuda.synchronize if tensor.is_cuda else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        sync()
        start = time.perf_counter()
        if rank == 0:
            dist.send(tensor, 1)
            dist.recv(tensor, 1)
        elif rank == 1:
            dist.recv(tensor, 0)
            dist.send(tensor, 0)
        sync()
        times.append((time.perf_counter() - start) / 2)
    result = torch.tensor(
        [statistics.median(times[1:]) if rank == 0 else 0.0], device=tensor.device
    )
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


def alltoall_seconds(rows, repeats: int, group=None) -> float:
    """Median seconds of an even ``all_to_all_single`` of ``rows`` (its first dimension
    split equally) over ``group`` (default: all ranks), the first call left out; on a GPU
    each call is waited for."""
    sync = torch.cuda.synchronize if rows.is_cuda else (lambda: None)
    out = torch.empty_like(rows)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        sync()
        start = time.perf_counter()
        dist.all_to_all_single(out, rows, group=group)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def alltoall_model(routed_bytes: int, dtype, device, repeats: int) -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of an all-to-all between this launch's ranks
    (all of them), measured as :func:`allreduce_model` measures the all-reduce: its
    median time on one row per rank and on ``routed_bytes`` (the largest a layer hands
    its experts; at most ``LARGEST_ALLREDUCE`` elements) in ``dtype`` on ``device``,
    t = latency + bytes a rank sends to the others / bandwidth (Hockney 1994; with W
    ranks, (W-1)/W of its buffer leaves it, as :func:`pp_ext.schedules.cost_model.alltoall_seconds`
    prices it). Every rank gets the slowest rank's figures; (0, inf) without MoE
    layers (``routed_bytes`` 0)."""
    if not routed_bytes:
        return 0.0, float("inf")
    world = dist.get_world_size()
    size = torch.empty((), dtype=dtype).element_size()
    numel = max(min(routed_bytes // size, LARGEST_ALLREDUCE) // world, 1) * world
    small, large = (
        alltoall_seconds(torch.zeros(n, device=device, dtype=dtype), repeats)
        for n in (world, numel)
    )
    result = torch.tensor([small, large], dtype=torch.float64, device=device)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    small, large = (float(t) for t in result)
    sent = (numel - world) * size * (world - 1) / world
    return small, sent / (large - small) if large > small else float("inf")
