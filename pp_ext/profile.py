"""Profiler: measured per-layer costs, the file the simulator, ``auto`` and
``parallel.partition: balanced:FILE`` read.

Qi et al. 2024 ("Zero Bubble Pipeline Parallelism", ICLR, Sec. 3) compute their
schedules from profiled F, B (pp-ext's I), W and communication times, because the
best order depends on them. This measures them per layer, not per stage, so that
any cut of the model into stages (:func:`Profile.stage_costs`) and the cut itself
(:func:`pp_ext.engine.module.balanced_parts`) come from one measurement. The
embedding and the head are layers like the others, the loss counted with the last
one, so a heavy head (large vocabulary) shows up where it is.

Each layer is its own chunk of a :class:`~pp_ext.engine.module.ChunkedPipelineModule`
on one pipeline rank; its input is the previous layer's real output (detached), and
F, I, W, B are timed with the same code as ``pp-ext bench``
(:func:`pp_ext.bench.time_passes`). Activation memory is the bytes autograd saves
during the layer's forward. The p2p latency is bench's half ping-pong of one
activation (:func:`pp_ext.bench.comm_latency`). The all-reduce between the two ranks
is timed at two sizes (a few bytes, and the model's parameters) and kept as
latency + bytes / bandwidth (the alpha-beta model of Hockney 1994), so that the sum
of Chimera's two weight replicas (Li & Hoefler 2021, Sec. 3.3) is priced for any
cut: a rank of the bidirectional placement sums stages i and p-1-i
(:meth:`Profile.stage_costs`, ``Costs.replica_reduce``).

:func:`profile_recipe` profiles a recipe's own Hugging Face model (the layers of
:func:`pp_ext.hf.layer_specs`, embedding and head included, built in the recipe's
dtype, on the GPU where there is one) at its shapes (``train.micro_batch_size`` x
``data.seq_len``), for one or several micro-batch sizes in one launch of 2 local
ranks (the second is the p2p peer). :func:`recipe_schedule` is ``parallel.schedule:
auto`` with ``parallel.profile``: the schedule computed from the profile's per-stage
costs under ``parallel.memory_limit`` (Qi et al. 2024, Sec. 3), the same on every rank.

File format (JSON)::

    {"comm": s, "micro_batch_size": b, "seq": t, "dtype": "float32",
     "allreduce_latency": s, "allreduce_bandwidth": bytes/s,
     "layers": [{"name": "Embedding", "forward": s, "input_grad": s, "weight_grad": s,
                 "backward": s, "activation_bytes": n, "parameter_bytes": n}, ...]}

(a file without the all-reduce fields or ``parameter_bytes``, written before they
existed, prices the replica sum at 0).
"""
from __future__ import annotations

import sys

from pp_ext.cost_model import LayerCost, Profile


def _tensors(value) -> list:
    import torch

    if torch.is_tensor(value):
        return [value]
    return [t for item in value for t in _tensors(item)] if isinstance(value, (tuple, list)) else []


def _detached(value):
    """A layer's output as the next layer's input: no history, float parts need grad."""
    import torch

    if torch.is_tensor(value):
        return value.detach().requires_grad_(value.is_floating_point())
    return type(value)(_detached(v) for v in value)


def measure_layers(module, inputs, labels, repeats: int) -> list[LayerCost]:
    """Costs of each chunk of ``module`` (one rank holding every layer as its own
    chunk, in order), each fed the previous chunk's real output."""
    import torch

    from pp_ext.bench import time_passes
    from pp_ext.engine.module import layer_name
    from pp_ext.split_backward import WeightGradStore, enable_split_backward

    store = WeightGradStore()
    enable_split_backward(module, store)
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
            saved[(tensor.data_ptr(), tensor.dtype)] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        f, i, w, b = time_passes(forward, backward, store, repeats, sync)
        start = module.chunk_bounds(chunk)[0]
        costs.append(LayerCost(layer_name(module._layer_specs[start]) or f"layer {start}", f, i, w, b,
                               sum(saved.values()), sum(p.numel() * p.element_size()
                                                        for p in module.chunk_parameters(chunk))))
        x = None if last else _detached(out)
    module.zero_grad(set_to_none=True)
    return costs


def _tiny_worker(rank: int, world: int, options) -> Profile | None:
    import torch
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pp_ext.bench import batches, comm_latency
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.engine.tiny import layer_specs, lm_loss

    config = tiny_config(options)
    layers = layer_specs(config)
    # pipeline 1 x data 2: each rank holds every layer, one chunk each; the second
    # rank is the peer of the p2p measurement
    module = ChunkedPipelineModule(layers=layers, topology=PipeDataParallelTopology(1, world), loss_fn=lm_loss,
                                   chunks=len(layers), partition_method="uniform", seed_layers=True,
                                   base_seed=1234)
    torch.set_num_threads(1)
    comm = comm_latency(options, rank)
    latency, bandwidth = allreduce_model(module, options.cost_repeats)
    if rank != 0:
        return None
    ids, labels = batches(options)[0]
    return Profile(tuple(measure_layers(module, ids, labels, options.cost_repeats)), comm,
                   options.micro_batch_size, options.seq, allreduce_latency=latency, allreduce_bandwidth=bandwidth)


def _recipe_worker(rank: int, world: int, recipe, sizes: tuple[int, ...], repeats: int) -> dict | None:
    import torch
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pp_ext.bench import BenchOptions, comm_latency
    from pp_ext.hf import build_pipeline_module
    from pp_ext.hf.loading import load_config
    from pp_ext.train import LanguageModelLoss

    config = load_config(recipe.model.path)
    loss = LanguageModelLoss()
    chunks = len(recipe_layer_specs(recipe))
    # as _tiny_worker: every layer its own chunk on each rank of pipeline 1 x data 2
    module = build_pipeline_module(recipe.model.path, topology=PipeDataParallelTopology(1, world), chunks=chunks,
                                   partition_method="uniform", loss_fn=loss, dtype=recipe.model.dtype,
                                   attn_implementation=recipe.model.attn_implementation, seed=recipe.train.seed)
    loss.tensor_axis = module.tensor_axis
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    module.to(device)
    latency, bandwidth = allreduce_model(module, repeats)
    profiles = {}
    for index, size in enumerate(sizes):
        if rank == 0:
            print(f"pp-ext tune: measuring {chunks} layers at micro-batch size {size} x {recipe.data.seq_len} "
                  f"tokens ({index + 1} of {len(sizes)}, {device.type})", file=sys.stderr, flush=True)
        # p2p of one activation of the hidden width (float32, as bench sends it)
        comm = comm_latency(BenchOptions(stages=2, micro_batch_size=size, seq=recipe.data.seq_len,
                                         hidden=config.hidden_size, cost_repeats=repeats), rank)
        if rank != 0:
            continue
        gen = torch.Generator().manual_seed(recipe.train.seed)
        ids = torch.randint(config.vocab_size, (size, recipe.data.seq_len), generator=gen).to(device)
        layers = measure_layers(module, ids, torch.roll(ids, -1, dims=1), repeats)
        profiles[size] = Profile(tuple(layers), comm, size, recipe.data.seq_len, recipe.model.dtype,
                                 latency, bandwidth)
    return profiles if rank == 0 else None


LARGEST_ALLREDUCE = 2 ** 26  # elements: 256 MiB in fp32, long enough to see the bandwidth


def allreduce_model(module, repeats: int) -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of an all-reduce between this launch's
    ranks (all of them), from its median time on one element and on a buffer the
    size of ``module``'s parameters (what a replica sum moves at most; at most
    ``LARGEST_ALLREDUCE`` elements, so a large model's profile needs no second copy
    of it), on their device: t(n) = latency + n / bandwidth (Hockney 1994). Every
    rank gets the slowest rank's figures."""
    import torch
    from deepspeed import comm as dist

    from pp_ext.bench import allreduce_seconds

    first = next(module.parameters())
    numel = min(sum(p.numel() for p in module.parameters()), LARGEST_ALLREDUCE)
    small, large = (allreduce_seconds(torch.zeros(n, device=first.device, dtype=first.dtype), repeats)
                    for n in (1, numel))
    result = torch.tensor([small, large], dtype=torch.float64, device=first.device)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    small, large = (float(t) for t in result)
    moved = (numel - 1) * first.element_size()
    # a large all-reduce timed no slower than a one-element one: bandwidth beyond what this can tell
    return small, moved / (large - small) if large > small else float("inf")


def recipe_layer_specs(recipe) -> list:
    """The pipeline layers of the recipe's model (what a profile measures, in order)."""
    from pp_ext.hf import layer_specs
    from pp_ext.hf.loading import load_config

    return layer_specs(load_config(recipe.model.path), recipe.model.attn_implementation)


def profile_recipe(recipe, sizes: tuple[int, ...], repeats: int = 5) -> dict[int, Profile]:
    """Profiles of the recipe's model at each micro-batch size in ``sizes`` (its
    ``data.seq_len`` and ``model.dtype``), measured in one launch of 2 local ranks."""
    from pp_ext.engine.spawn import spawn

    return spawn(_recipe_worker, 2, recipe, tuple(sizes), repeats)[0]


def recipe_schedule(recipe, pipe: int):
    """``parallel.schedule: auto`` with ``parallel.profile``: :func:`auto_schedule` on
    the profile's per-stage costs for the recipe's partition (Qi et al. 2024, Sec. 3:
    the best order depends on the measured F, I, W and communication), under
    ``parallel.memory_limit`` micro-batches per rank (None: 1F1B's), in the placement
    ``parallel.chunks`` names (1: loop, 2: V) or, without it, the one auto chooses
    from the costs of both cuts (p and 2p stages; 2p only where the partition method
    can cut that many). Deterministic, so every rank builds the same program. Raises
    ValueError (a profile of other shapes, or of another model) or a ScheduleError."""
    from omegaconf import OmegaConf

    from pp_ext.engine.module import partition
    from pp_ext.schedules.auto import auto_schedule

    path = recipe.parallel.profile
    profile = Profile.load(path)
    profile.check_shapes(recipe, path)
    if profile.micro_batch_size != recipe.train.micro_batch_size:
        raise ValueError(f"profile {path} measured micro-batches of {profile.micro_batch_size} samples, the recipe "
                         f"has train.micro_batch_size={recipe.train.micro_batch_size}: use that size or profile "
                         f"again (pp-ext tune --recipe R)")
    specs, chunks = recipe_layer_specs(recipe), recipe.parallel.chunks
    cuts = []
    for count in (1, 2) if chunks is None else (chunks,):
        try:
            cuts.append(profile.stage_costs(partition(specs, pipe * count, recipe.parallel.partition)))
        except ValueError:
            if chunks is not None or count == 1:
                raise
    limit = recipe.parallel.memory_limit
    limit = OmegaConf.to_container(limit) if OmegaConf.is_config(limit) else limit
    return auto_schedule(pipe, recipe.parallel.micro_batches, cuts, limit, chunks)


def tiny_config(options):
    """The bench's Llama-shaped model (:mod:`pp_ext.engine.tiny`) at ``options``' sizes."""
    from pp_ext.engine.tiny import TinyConfig

    return TinyConfig(vocab=options.vocab, hidden=options.hidden, heads=options.heads,
                      intermediate=options.intermediate, blocks=options.blocks_per_rank * options.stages, tied=False)


def profile_tiny(options) -> Profile:
    """Profile the bench model of ``options`` (a :class:`pp_ext.bench.BenchOptions`) on this machine."""
    from pp_ext.engine.spawn import spawn

    return spawn(_tiny_worker, 2, options)[0]
