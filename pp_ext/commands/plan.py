"""``pp-ext plan --recipe R``: what a launch of the recipe would do, without launching.

Prints the rank layout (pipeline x tensor x data, as DeepSpeed's
``PipeModelDataParallelTopology`` numbers ranks), which layers each pipeline rank
holds per chunk, the schedule's simulated bubble at unit costs, and an estimate of
each rank's memory (:mod:`pp_ext.planning.memory`, the one model ``pp-ext tune`` uses
too): base weights (frozen under the recipe's ``peft`` section: the model's dtype and
nothing else), the trainable parameters (all of them, or LoRA's adapters and
``modules_to_save``, counted with the adapters each stage adds) with their gradients,
the optimizer state (fp32 masters and AdamW moments), and peak activations; with
``--memory-limit`` whether the largest rank fits. On a mixture-of-experts model the
routed experts stand apart: per rank its MoE layers, the experts of each it holds, their
parameters, weights + gradients and optimizer state (over the expert-data ranks,
:mod:`pp_ext.planning.memory`); shared experts count with the dense parameters.

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
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

from pp_ext.planning import memory
from pp_ext.planning.search import GIB
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
    plan.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GB",
        help="GiB per rank (a GPU's memory): say whether the largest rank fits it",
    )
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    plan.set_defaults(handler=run_plan)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError


def _count(n: int) -> str:
    """Parameters in millions, or thousands where millions would show 0.0 (adapters)."""
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n / 1e3:.1f} K"


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

    if args.memory_limit is not None and not args.memory_limit > 0:
        raise CommandError(f"--memory-limit must be > 0 GiB per rank, got {args.memory_limit}")
    try:
        recipe = load(args.recipe, args.overrides)
        data = recipe.parallel.data if recipe.parallel.data != "auto" else 1
        world = args.world_size or recipe.parallel.pipeline * recipe.parallel.tensor * data
        layout, _ = check_before_launch(recipe, world)
    except RecipeError as exc:
        raise CommandError(str(exc)) from None
    print(describe(recipe, layout, args.memory_limit))
    return 0


@dataclass(frozen=True)
class RankPlan:
    """What one pipeline rank holds: its stages (``layers``: the stage and layer names
    of each chunk), its frozen and trainable parameters, their bytes
    (:class:`~pp_ext.planning.memory.RankState`) and its peak activations."""

    layers: str
    frozen: int
    trainable: int
    state: memory.RankState
    activations: float
    moe: ExpertPlan | None = None

    @property
    def total(self) -> float:
        return self.state.total + self.activations + (self.moe.state.total if self.moe else 0)


@dataclass(frozen=True)
class ExpertPlan:
    """A pipeline rank's MoE layers: how many it holds, the routed experts of each it
    holds (``num_experts / E``), their parameters (``params``, its share, not counted in
    the rank's dense ``frozen`` / ``trainable``) and bytes
    (:func:`~pp_ext.planning.memory.expert_state`), and its shared experts' parameters
    (dense: counted with the rest)."""

    layers: int
    experts: int
    params: int
    shared: int
    state: memory.RankState


def plan_ranks(recipe: Recipe, layout: Layout) -> tuple[list[str], list[RankPlan]]:
    """The plan's header lines and, per pipeline rank, what it holds (one rank of its
    tensor group where ``parallel.tensor`` > 1); an MoE model's routed experts spread
    over ``layout.expert`` of a stage's data ranks (:func:`~pp_ext.planning.memory.expert_share`)."""
    # torch, deepspeed, transformers: only when this command runs (pp_ext.commands)
    from transformers import AutoConfig

    from pp_ext import tp
    from pp_ext.config.recipe import RecipeError, state_bytes
    from pp_ext.engine.module import partition
    from pp_ext.hf import layer_specs
    from pp_ext.hf.common import HFDecoderLayer
    from pp_ext.hf.moe import FAMILIES, expert_parameters
    from pp_ext.peft import planned_parameters
    from pp_ext.planning.partition import chunk_layout

    pipe, tensor, data, chunks = layout.pipeline, layout.tensor, layout.data, layout.chunks
    config = AutoConfig.from_pretrained(recipe.model.path)
    specs = layer_specs(config, recipe.model.attn_implementation)
    name = recipe.parallel.schedule
    spec = get("1f1b" if name == BASELINE else name)
    placement = Placement.named(layout.placement, pipe, chunks)
    with tp.using(tp.TensorAxis(tensor)):  # every tensor rank holds the same shapes
        parts = partition(specs, placement.stages, recipe.parallel.partition)
        params = planned_parameters(specs, recipe.peft, config)
        moe = FAMILIES.get(config.model_type)
        experts = expert_parameters(specs) if moe else []
    if moe:
        try:
            share = memory.expert_share(moe.num_experts(config), layout.expert, data)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        # pp-ext's LoRA freezes all but its adapters (pp_ext.peft.adapters.add_adapters)
        experts_train = recipe.peft.type != "lora"
        per_expert_param = state_bytes(recipe, share.expert_data)
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
    mbs, seq = recipe.train.micro_batch_size, recipe.data.seq_len
    frozen, trainable = (sum(count[k] for count in params) for k in (0, 1))
    lines = [
        f"{recipe.model.path}: {config.model_type}, {len(specs)} pipeline layers "
        f"({config.num_hidden_layers} decoder blocks), {(frozen + trainable) / 1e6:.1f} M parameters"
        + (
            f"; LoRA r={recipe.peft.r} trains {_count(trainable)} "
            f"({100 * trainable / (frozen + trainable):.2f} %), the rest frozen in {recipe.model.dtype}"
            if recipe.peft.type == "lora"
            else ""
        ),
        f"{layout.world_size} ranks = pipeline {pipe} x tensor {tensor} x data {data}; schedule {name} "
        f"({chunks} chunk{'s' * (chunks > 1)} per rank, {placement.name} placement), "
        f"{recipe.parallel.micro_batches} micro-batches of {mbs} x {seq} tokens per data rank",
        f"bubble at unit costs: {format_number(metrics['bubble_ratio'])} per step; peak activations "
        f"in flight: {format_number(metrics['peak_activations'])} micro-batches of a rank's layers",
    ]
    if moe:
        shared = sum(count[1] for count in experts)
        lines.append(
            f"{moe.moe_layers(config)} MoE layers of {share.expert * share.experts} routed experts "
            f"({config.num_experts_per_tok} per token{', and shared experts' * bool(shared)}); "
            f"experts over {share.expert} rank{'s' * (share.expert > 1)} of a stage: "
            f"{share.experts} per MoE layer on each, their gradients and optimizer state over "
            f"{share.expert_data} expert-data rank{'s' * (share.expert_data > 1)}"
        )
    if tensor > 1:
        lines.append(
            f"tensor parallel over {tensor} ranks (global ranks of a pipeline rank: tensor ranks "
            f"side by side, then data replicas): {tp.describe(config, tensor, recipe.parallel.make_vocab_size_divisible_by)}"
        )
    ranks = []
    for rank in range(pipe):
        bounds = chunk_layout(placement, parts, rank)
        held = [i for start, stop in bounds for i in range(start, stop)]
        decoders = sum(1 for i in held if issubclass(specs[i].typename, HFDecoderLayer))
        act = simulation.peak_activations_per_rank[rank] * (
            decoders * per_layer + (logits if len(specs) - 1 in held else 0)
        )
        rank_frozen, rank_trainable = (sum(params[i][k] for i in held) for k in (0, 1))
        held_moe = None
        if moe:
            routed = sum(experts[i][0] for i in held)
            # the routed experts leave the dense count: the rank holds 1/E of them
            rank_trainable, rank_frozen = (
                (rank_trainable - routed, rank_frozen)
                if experts_train
                else (rank_trainable, rank_frozen - routed)
            )
            held_moe = ExpertPlan(
                sum(1 for i in held if experts[i][0]),
                share.experts,
                routed // share.expert,
                sum(experts[i][1] for i in held),
                memory.expert_state(
                    0 if experts_train else routed,
                    routed if experts_train else 0,
                    share,
                    per_expert_param,
                ),
            )
        ranks.append(
            RankPlan(
                "; ".join(
                    f"{placement.holds(rank, c)[1]}: {_names(specs[start:stop])}"
                    for c, (start, stop) in enumerate(bounds)
                ),
                rank_frozen,
                rank_trainable,
                memory.rank_state(rank_frozen, rank_trainable, per_param),
                act,
                held_moe,
            )
        )
    return lines, ranks


def describe(recipe: Recipe, layout: Layout, memory_limit: float | None = None) -> str:
    """The plan as text: header, a table of what each pipeline rank holds (an MoE
    model's experts apart, spread over ``layout.expert`` ranks), and whether the largest rank
    fits ``memory_limit`` GiB."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    lines, ranks = plan_ranks(recipe, layout)
    moe = ranks[0].moe is not None
    topology = PipeModelDataParallelTopology(
        num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data
    )
    table = [
        [
            "pipeline rank",
            "global ranks",
            "stage: layers",
            ("dense params" if moe else "params")
            + (" per tensor rank" if layout.tensor > 1 else ""),
            "trainable",
            "base weights",
            "trainable + grads",
            "optimizer",
            *(
                [
                    "MoE layers",
                    "experts each",
                    "expert params",
                    "shared",
                    "expert w + g",
                    "expert opt",
                ]
                if moe
                else []
            ),
            "activations (est.)",
            "total (est.)",
        ]
    ]
    for rank, held in enumerate(ranks):
        state = held.state
        table.append(
            [
                str(rank),
                ",".join(map(str, topology.filter_match(pipe=rank))),
                held.layers,
                _count(held.frozen + held.trainable),
                _count(held.trainable),
                _bytes(state.base),
                _bytes(state.trainable + state.gradients),
                _bytes(state.optimizer),
                *(
                    [
                        str(held.moe.layers),
                        str(held.moe.experts),
                        _count(held.moe.params),
                        _count(held.moe.shared),
                        _bytes(
                            held.moe.state.base
                            + held.moe.state.trainable
                            + held.moe.state.gradients
                        ),
                        _bytes(held.moe.state.optimizer),
                    ]
                    if held.moe
                    else []
                ),
                _bytes(held.activations),
                _bytes(held.total),
            ]
        )
    lines += ["", *format_table(table)]
    if memory_limit is not None:
        peak = max(range(len(ranks)), key=lambda rank: ranks[rank].total)
        needs = ranks[peak].total / GIB
        lines.append(
            f"fits --memory-limit {memory_limit:g} GiB per rank: the largest, pipeline rank {peak}, "
            f"needs {needs:.1f} GiB"
            if needs <= memory_limit
            else f"does not fit --memory-limit {memory_limit:g} GiB per rank: pipeline rank {peak} "
            f"needs {needs:.1f} GiB ({(ranks[peak].total - ranks[peak].activations) / GIB:.1f} GiB parameters, gradients "
            f"and optimizer state, {ranks[peak].activations / GIB:.1f} GiB activations): train LoRA "
            f"adapters (peft.type=lora), use more pipeline ranks, or checkpoint activations"
        )
    return "\n".join(lines)
