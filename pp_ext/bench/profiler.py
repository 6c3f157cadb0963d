"""Profiler: a recipe's model measured layer by layer, the profile that the
simulator, ``auto``, ``pp-ext tune`` and ``parallel.partition: balanced:FILE`` read
(:class:`~pp_ext.schedules.cost_model.Profile`).

:func:`profile_recipe` profiles a recipe's own Hugging Face model (the layers of
:func:`pp_ext.hf.layer_specs`, embedding and head included, built in the recipe's
dtype, on the GPU where there is one) at its shapes (``train.micro_batch_size`` x
``data.seq_len``), for one or several micro-batch sizes in one launch of 2 local
ranks (the second is the p2p peer; 1 where one GPU is visible, :func:`profile_ranks`). Each layer is its own chunk of a
:class:`~pp_ext.engine.module.ChunkedPipelineModule` on one pipeline rank; its input
is the previous layer's real output (detached); a recipe with ``peft.type: lora`` is
measured with its adapters on and the base frozen, as training runs it (W then does
the adapters' small GEMMs only, Hu et al. 2021). F, I, W, B, the p2p latency of
one activation and the all-reduce are timed with the same code as ``pp-ext bench``
(:mod:`pp_ext.bench.measure`). The all-reduce between the two ranks is timed at two
sizes (a few bytes, and the model's parameters): the replica sum of Chimera's two
pipelines is priced from it (:meth:`~pp_ext.schedules.cost_model.Profile.stage_costs`).

An MoE model (the router loss added as training adds it) is measured at one expert
rank: its experts' weight GEMMs in W (:class:`~pp_ext.moe.experts.DeferrableExperts`),
each layer's routed bytes counted (tokens x top_k x hidden x dtype bytes), and, with
2 ranks, an all-to-all of the largest of them timed at two sizes as the all-reduce is:
what ``parallel.expert: E`` > 1 adds to F and I is priced from these when the profile
is read (:meth:`~pp_ext.schedules.cost_model.Profile.dispatch_seconds`).

The batch is random token ids (seeded by ``train.seed``), not the recipe's data: the
profile is measured before (and without) tokenizing a dataset, and what it prices does
not depend on the tokens. Dense layers cost the same for any ids; top-k routing hands
the experts tokens x top_k rows whatever the ids, so the routed bytes and the grouped
GEMMs' total rows are fixed, and the all-to-all is priced under uniform routing anyway
(:mod:`pp_ext.schedules.cost_model`). What real data would change is how unevenly the
rows fall on the experts (the grouped GEMM's efficiency), which a trained router's
load-balancing loss keeps small.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

from pp_ext.bench.measure import allreduce_model, alltoall_model, comm_latency, measure_layers
from pp_ext.hf import build_pipeline_module, router_loss_coef
from pp_ext.hf.loading import load_config
from pp_ext.moe.experts import DeferrableExperts
from pp_ext.peft import apply_lora
from pp_ext.schedules.cost_model import Profile
from pp_ext.testing.spawn import spawn
from pp_ext.tools.logging import get_logger
from pp_ext.training.loss import LanguageModelLoss
from pp_ext.training.preflight import recipe_layer_specs

log = get_logger("pp-ext tune")


def _recipe_worker(
    rank: int, world: int, recipe, sizes: tuple[int, ...], repeats: int
) -> dict | None:
    config = load_config(recipe.model.path)
    loss = LanguageModelLoss(
        router_loss_coef(config)
    )  # an MoE model's router loss, as training adds it
    chunks = len(recipe_layer_specs(recipe))
    # every layer its own chunk on each rank of pipeline 1 x data 2 (the second rank is the p2p peer)
    module = build_pipeline_module(
        recipe.model.path,
        topology=PipeDataParallelTopology(1, world),
        chunks=chunks,
        partition_method="uniform",
        loss_fn=loss,
        dtype=recipe.model.dtype,
        attn_implementation=recipe.model.attn_implementation,
        seed=recipe.train.seed,
        make_vocab_size_divisible_by=recipe.parallel.make_vocab_size_divisible_by,
    )
    loss.tensor_axis = module.tensor_axis
    if recipe.peft.type == "lora":  # as training runs it: W then holds the adapters' GEMMs only
        apply_lora(module, recipe.peft, recipe.model.path, recipe.train.seed)
        module.parameters_changed()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    module.to(device)
    # one rank (one GPU): no peer, so p2p, the all-reduce and the all-to-all are priced at 0 (profile_ranks)
    latency, bandwidth = allreduce_model(module, repeats) if world > 1 else (0.0, float("inf"))
    # an MoE layer hands its experts tokens x top_k rows of the hidden width per micro-batch
    moe = any(isinstance(sub, DeferrableExperts) for sub in module.modules())
    routed = (
        max(sizes) * recipe.data.seq_len * config.num_experts_per_tok * config.hidden_size
        if moe and world > 1
        else 0
    )
    dtype = next(module.parameters()).dtype
    a2a_latency, a2a_bandwidth = alltoall_model(routed * dtype.itemsize, dtype, device, repeats)
    profiles = {}
    for index, size in enumerate(sizes):
        log.info(
            f"measuring {chunks} layers at micro-batch size {size} x {recipe.data.seq_len} "
            f"tokens ({index + 1} of {len(sizes)}, {device.type})"
        )
        # p2p of one activation of the hidden width (float32, as bench sends it)
        comm = (
            comm_latency((size, recipe.data.seq_len, config.hidden_size), repeats, rank)
            if world > 1
            else 0.0
        )
        if rank != 0:
            continue
        gen = torch.Generator().manual_seed(recipe.train.seed)
        ids = torch.randint(config.vocab_size, (size, recipe.data.seq_len), generator=gen).to(
            device
        )
        layers = measure_layers(module, ids, torch.roll(ids, -1, dims=1), repeats)
        profiles[size] = Profile(
            tuple(layers),
            comm,
            size,
            recipe.data.seq_len,
            recipe.model.dtype,
            latency,
            bandwidth,
            a2a_latency,
            a2a_bandwidth,
        )
    return profiles if rank == 0 else None


def profile_ranks() -> int:
    """Local ranks of a recipe's profile: 2 (the second is the peer of the p2p,
    all-reduce and all-to-all timings), or 1 where CUDA shows one GPU, since NCCL refuses two ranks on
    one device: the layers are measured there alone, p2p and the all-reduce priced at 0."""
    return 1 if torch.cuda.is_available() and torch.cuda.device_count() < 2 else 2


def profile_recipe(
    recipe, sizes: tuple[int, ...], repeats: int = 5, ranks: int | None = None
) -> dict[int, Profile]:
    """Profiles of the recipe's model at each micro-batch size in ``sizes`` (its
    ``data.seq_len`` and ``model.dtype``), measured in one launch of ``ranks`` local
    ranks (default :func:`profile_ranks`)."""
    return spawn(_recipe_worker, ranks or profile_ranks(), recipe, tuple(sizes), repeats)[0]
