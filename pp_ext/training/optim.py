"""The optimizer and its learning-rate schedule, as torch's own (DeepSpeed steps both)."""

from __future__ import annotations

import math

import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from pp_ext.config.schema import Recipe
from pp_ext.schedules import Kind
from pp_ext.schedules.registry import ScheduleSpec


def make_optimizer(recipe: Recipe, module: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) as torch's own: DeepSpeed's "optimizer" config on CPU would
    JIT-build FusedAdam for minutes (FACTS). No weight decay on biases and norms; an MoE
    model's expert parameters in groups of their own (:func:`expert_groups`)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = expert_groups(
        [
            {"name": "decay", "params": decay, "weight_decay": recipe.train.weight_decay},
            {"name": "no-decay", "params": other, "weight_decay": 0.0},
        ]
    )
    if recipe.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.train.lr)
    return torch.optim.AdamW(
        groups, lr=recipe.train.lr, betas=tuple(recipe.train.betas), eps=recipe.train.eps
    )


def expert_groups(groups: list[dict]) -> list[dict]:
    """``groups`` (each with a ``name``) with the expert parameters (DeepSpeed's MoE marks,
    :mod:`pp_ext.moe.dispatch`) moved into groups of their own, as DeepSpeed's
    ``split_params_into_different_moe_groups_for_optimizer`` moves them: ``'moe': True`` and
    the expert group's name, by which BF16_Optimizer and ZeRO partition them over the
    expert-data group (dense groups over all data ranks) and take their norm over the
    expert group. Groups left empty are dropped (LoRA trains matrices only; DeepSpeed
    would drop them after the learning-rate schedule counted them). Each group keeps the
    name of the group it came from as ``origin``: a resume under another
    ``parallel.expert`` gives an expert group its origin's settings
    (:func:`pp_ext.checkpoint.reshape.group_sources`)."""
    groups = [{**group, "origin": group["name"]} for group in groups]
    if any(is_moe_param(p) for group in groups for p in group["params"]):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [group for group in groups if group["params"]]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, recipe: Recipe, steps: int, updates_per_step: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``train.warmup_steps`` steps, then cosine decay from
    ``train.lr`` to ``train.min_lr`` at the last step (Loshchilov & Hutter 2017, SGDR,
    without restarts): step ``s`` (1-based) trains with ``lr * s / warmup`` while
    ``s <= warmup``, then ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t`` the
    fraction of the decay done.

    torch's LambdaLR, which DeepSpeed steps after every optimizer step and keeps in
    its checkpoints. Not DeepSpeed's WarmupCosineLR: its ratio is 0 at iterations -1
    and 0, so the first two steps train with learning rate 0 (seen in metrics.jsonl).
    An asynchronous schedule may update ``updates_per_step`` times per step (PipeDream
    after every micro-batch): the schedule is counted in updates, so it spans the run."""
    floor = recipe.train.min_lr / recipe.train.lr if recipe.train.lr else 0.0
    warmup, steps = recipe.train.warmup_steps * updates_per_step, steps * updates_per_step

    def factor(done: int) -> float:  # ``done`` steps finished: the factor of step done + 1
        if done < warmup:
            return (done + 1) / warmup
        t = min(1.0, (done - warmup) / max(1, steps - warmup - 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def updates_per_step(spec: ScheduleSpec | None, pipe: int, recipe: Recipe, chunks: int) -> int:
    """Optimizer updates in one ``train_batch``: 1, or the weight updates (U actions)
    an asynchronous program makes per call (its stream shows several calls)."""
    if spec is None:
        return 1
    schedule = spec.build(pipe, recipe.parallel.micro_batches, chunks)
    updates = sum(a.kind is Kind.U for a in schedule.programs[0])
    return max(1, updates * recipe.parallel.micro_batches // schedule.micro_batches)
