"""Before a launch: what a recipe will run, checked and decided where no process
group is needed, the same on every rank (``pp-ext plan``, ``pp-ext tune`` and the
training job call it first).

:func:`check_before_launch` resolves the rank layout and checks the schedule's
constraints, the model and the tokenizer folder; :func:`recipe_schedule` is
``parallel.schedule: auto`` with ``parallel.profile``: the schedule computed from the
profile's per-stage costs under ``parallel.memory_limit`` (Qi et al. 2024, "Zero
Bubble Pipeline Parallelism", ICLR, Sec. 3).
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf
from transformers import AutoConfig

from pp_ext import tp
from pp_ext.cost_model import Profile
from pp_ext.engine.module import partition
from pp_ext.hf import layer_specs, supported
from pp_ext.hf.loading import load_config
from pp_ext.recipe import RecipeError, resolve_parallel
from pp_ext.schedules import ScheduleError, get
from pp_ext.schedules.auto import auto_schedule


def check_before_launch(recipe, world_size: int) -> tuple[int, int, int, int, object]:
    """``(pipeline, tensor, data, chunks, prebuilt)``; raises RecipeError for what can
    be known without a process group about the layout: ranks, schedule constraints,
    the model. ``prebuilt``: ``auto`` computed from ``parallel.profile`` (its chunks
    are its choice), built here once; None otherwise."""
    pipe, tensor, data = resolve_parallel(recipe, world_size)
    name = recipe.parallel.schedule
    if tensor > 1 and name == "deepspeed-1f1b":
        raise RecipeError("parallel.schedule=deepspeed-1f1b runs DeepSpeed's own engine, whose Megatron-shaped "
                          "partitioned p2p pp-ext does not check with tensor parallelism: use 1f1b (the same "
                          "schedule on pp-ext's engine) with parallel.tensor > 1")
    chunks, prebuilt = recipe.parallel.chunks, None
    if name != "deepspeed-1f1b":
        spec = get(name)
        chunks = spec.resolve_chunks(chunks)
        try:
            spec.build(pipe, recipe.parallel.micro_batches, chunks)
            if name == "auto" and recipe.parallel.profile is not None:  # auto chooses its chunks from the profile
                prebuilt = recipe_schedule(recipe, pipe)
                chunks = prebuilt.chunks
        except ScheduleError as exc:
            raise RecipeError(f"parallel.schedule={name} with pipeline={pipe}, "
                              f"micro_batches={recipe.parallel.micro_batches}, chunks={chunks}: "
                              f"{' '.join(str(exc).split())}") from None
        except ValueError as exc:  # a profile of other shapes or another model
            raise RecipeError(f"parallel.profile={recipe.parallel.profile}: {' '.join(str(exc).split())}") from None
    elif chunks not in (None, 1):
        raise RecipeError("parallel.schedule=deepspeed-1f1b runs one chunk per rank: drop parallel.chunks")
    chunks = chunks or 1
    model = Path(recipe.model.path)
    if not (model / "config.json").is_file():
        raise RecipeError(f"model.path {model} has no config.json: point it at a Hugging Face model folder")
    model_type = json.loads((model / "config.json").read_text()).get("model_type")
    if model_type not in supported():
        raise RecipeError(f"model.path {model} is a {model_type!r} model, which pp-ext cannot split into "
                          f"pipeline stages: supported model types are {', '.join(supported())}")
    if tensor > 1:
        try:
            tp.check_tensor_split(AutoConfig.from_pretrained(model), tensor)
        except ValueError as exc:
            raise RecipeError(f"parallel.tensor={tensor}: {exc}") from None
    tokenizer = Path(recipe.model.tokenizer or recipe.model.path)
    if not tokenizer.is_dir():
        raise RecipeError(f"model.tokenizer {tokenizer} is not a folder: point it at the tokenizer's files")
    return pipe, tensor, data, chunks, prebuilt


def recipe_layer_specs(recipe) -> list:
    """The pipeline layers of the recipe's model (what a profile measures, in order)."""
    return layer_specs(load_config(recipe.model.path), recipe.model.attn_implementation)


def recipe_schedule(recipe, pipe: int):
    """``parallel.schedule: auto`` with ``parallel.profile``: :func:`auto_schedule` on
    the profile's per-stage costs for the recipe's partition (Qi et al. 2024, Sec. 3:
    the best order depends on the measured F, I, W and communication), under
    ``parallel.memory_limit`` micro-batches per rank (None: 1F1B's), in the placement
    ``parallel.chunks`` names (1: loop, 2: V) or, without it, the one auto chooses
    from the costs of both cuts (p and 2p stages; 2p only where the partition method
    can cut that many). Deterministic, so every rank builds the same program. Raises
    ValueError (a profile of other shapes, or of another model) or a ScheduleError."""
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
