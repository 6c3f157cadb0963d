"""``pp-ext plan --recipe R``: what a launch of the recipe would do, without launching.

Prints the rank layout (pipeline x tensor x data, as DeepSpeed's
``PipeModelDataParallelTopology`` numbers ranks), which layers each pipeline rank
holds per chunk, the schedule's simulated bubble at unit costs, and an estimate of
each rank's peak activation memory and its state (weights, gradients, optimizer:
:func:`pp_ext.planning.memory.state_bytes`).

The activation estimate follows Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", eq. (1): one transformer layer keeps
``s*b*h*(34 + 5*a*s/h)`` bytes per micro-batch in 16-bit (s tokens, b micro-batch
size, h hidden, a heads). The ``5*a*s/h`` term is the attention score matrix, which
sdpa and flash attention do not keep; 32-bit activations double the rest. With
activation checkpointing only each layer's input (``2*s*b*h`` bytes) stays, plus one
layer's working set. The last stage also holds fp32 logits (``4*s*b*vocab``). With
tensor parallelism over t ranks (no sequence parallelism) eq. (2) applies instead,
``s*b*h*(10 + 24/t + 5*a*s/(h*t))``, and logits are cut by vocabulary (``/t``); the
parameter column then counts one tensor rank's share (:mod:`pp_ext.tp`). A rank
holds its peak number of micro-batches in flight (the simulator's ``peak act``) of
these. An estimate for planning, not a measurement: ``pp-ext tune`` will measure.
"""

from __future__ import annotations

import argparse
from itertools import groupby
from typing import TYPE_CHECKING

from pp_ext.planning import memory
from pp_ext.schedules import Placement, get, simulate
from pp_ext.schedules.registry import BASELINE
from pp_ext.schedules.render import format_number

from . import CommandError, format_table

if TYPE_CHECKING:  # omegaconf: only when this command runs
    from pp_ext.config.layout import Layout
    from pp_ext.config.schema import Recipe


def add_parser(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="rank layout, layers per rank, bubble and memory of a recipe",
        description="Show what launching a recipe would do, without launching: "
        "the pipe x tensor x data layout, layers per rank, the "
        "schedule's bubble and an activation-memory estimate.",
    )
    plan.add_argument("--recipe", required=True, metavar="FILE", help="recipes/NAME.yaml")
    plan.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="ranks to plan for (default: pipeline x tensor x data, data 1 when 'auto')",
    )
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    plan.set_defaults(handler=run_plan)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError


def _names(specs) -> str:
    from pp_ext.engine.module import (
        layer_name,
    )  # torch: only when this command runs (pp_ext.commands)

    def name(spec) -> str:  # a tied head runs its embedding's module through a function
        forward = getattr(spec, "forward_fn", None)
        forward = getattr(forward, "func", forward)  # a functools.partial names its function
        return f"{layer_name(spec)}.{forward.__name__}" if forward else layer_name(spec) or "?"

    runs = [(label, len(list(group))) for label, group in groupby(map(name, specs))]
    return " + ".join(label if count == 1 else f"{count} x {label}" for label, count in runs)


def run_plan(args: argparse.Namespace) -> int:
    # torch, deepspeed, omegaconf: only when this command runs (pp_ext.commands)
    from pp_ext.config.recipe import RecipeError, load
    from pp_ext.engine.distributed import select_accelerator

    select_accelerator()  # before deepspeed is first imported
    from pp_ext.training.preflight import check_before_launch

    try:
        recipe = load(args.recipe, args.overrides)
        data = recipe.parallel.data if recipe.parallel.data != "auto" else 1
        world = args.world_size or recipe.parallel.pipeline * recipe.parallel.tensor * data
        layout, _ = check_before_launch(recipe, world)
    except RecipeError as exc:
        raise CommandError(str(exc)) from None
    print(describe(recipe, layout))
    return 0


def describe(recipe: Recipe, layout: Layout) -> str:
    # torch, deepspeed, transformers: only when this command runs (pp_ext.commands)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from transformers import AutoConfig

    from pp_ext import tp
    from pp_ext.config.recipe import state_bytes
    from pp_ext.engine.module import layer_param_counts, partition
    from pp_ext.hf import layer_specs
    from pp_ext.hf.common import HFDecoderLayer
    from pp_ext.planning.partition import chunk_layout

    pipe, tensor, data, chunks = layout.pipeline, layout.tensor, layout.data, layout.chunks
    config = AutoConfig.from_pretrained(recipe.model.path)
    specs = layer_specs(config, recipe.model.attn_implementation)
    name = recipe.parallel.schedule
    spec = get("1f1b" if name == BASELINE else name)
    placement = Placement.named(layout.placement, pipe, chunks)
    with tp.using(tp.TensorAxis(tensor)):  # every tensor rank holds the same shapes
        parts = partition(specs, placement.stages, recipe.parallel.partition)
        counts = layer_param_counts(specs)
    simulation = simulate(spec.build(pipe, recipe.parallel.micro_batches, chunks))
    metrics = simulation.metrics()
    per_layer, logits = memory.layer_activation_bytes(
        seq_len=recipe.data.seq_len,
        micro_batch_size=recipe.train.micro_batch_size,
        hidden_size=config.hidden_size,
        heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        dtype=recipe.model.dtype,
        checkpointing=bool(recipe.model.activation_checkpoint_interval),
        eager_attention=recipe.model.attn_implementation == "eager",
        tensor=tensor,
    )
    per_param = state_bytes(recipe, data)
    topology = PipeModelDataParallelTopology(num_pp=pipe, num_mp=tensor, num_dp=data)
    mbs, seq = recipe.train.micro_batch_size, recipe.data.seq_len

    lines = [
        f"{recipe.model.path}: {config.model_type}, {len(specs)} pipeline layers "
        f"({config.num_hidden_layers} decoder blocks), {sum(layer_param_counts(specs)) / 1e6:.1f} M parameters",
        f"{layout.world_size} ranks = pipeline {pipe} x tensor {tensor} x data {data}; schedule {name} "
        f"({chunks} chunk{'s' * (chunks > 1)} per rank, {placement.name} placement), "
        f"{recipe.parallel.micro_batches} micro-batches of {mbs} x {seq} tokens per data rank",
        f"bubble at unit costs: {format_number(metrics['bubble_ratio'])} per step; peak activations "
        f"in flight: {format_number(metrics['peak_activations'])} micro-batches of a rank's layers",
    ]
    if tensor > 1:
        lines.append(
            f"tensor parallel over {tensor} ranks (global ranks of a pipeline rank: tensor ranks "
            f"side by side, then data replicas): {tp.describe(config, tensor, recipe.parallel.make_vocab_size_divisible_by)}"
        )
    lines.append("")
    params = "params" if tensor == 1 else "params per tensor rank"
    table = [
        [
            "pipeline rank",
            "global ranks",
            "stage: layers",
            params,
            "activations (est.)",
            "state (est.)",
        ]
    ]
    for rank in range(pipe):
        bounds = chunk_layout(placement, parts, rank)
        held = [i for start, stop in bounds for i in range(start, stop)]
        decoders = sum(1 for i in held if issubclass(specs[i].typename, HFDecoderLayer))
        act = simulation.peak_activations_per_rank[rank] * (
            decoders * per_layer + (logits if len(specs) - 1 in held else 0)
        )
        table.append(
            [
                str(rank),
                ",".join(map(str, topology.filter_match(pipe=rank))),
                "; ".join(
                    f"{placement.holds(rank, c)[1]}: {_names(specs[start:stop])}"
                    for c, (start, stop) in enumerate(bounds)
                ),
                f"{sum(counts[i] for i in held) / 1e6:.1f} M",
                _bytes(act),
                _bytes(per_param.total * sum(counts[i] for i in held)),
            ]
        )
    lines += format_table(table)
    return "\n".join(lines)
