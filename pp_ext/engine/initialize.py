"""``pp_ext.initialize``: ``deepspeed.initialize`` with a pipeline schedule choice."""

from __future__ import annotations

from typing import Any

import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

from pp_ext.schedules import Schedule, fuse_backward, get, validate
from pp_ext.schedules.async_rules import PipeMareOptions
from pp_ext.schedules.registry import BASELINE

from .async_engine import AsyncScheduleEngine
from .engine import ScheduleEngine
from .module import ChunkedPipelineModule


def _load_config(args: Any, config: Any, config_params: Any) -> dict:
    if config is None:
        config = (
            config_params if config_params is not None else getattr(args, "deepspeed_config", None)
        )
    if config is None:
        raise ValueError("pp_ext.initialize needs a DeepSpeed config (config=dict or path)")
    if isinstance(config, dict):
        return config
    return load_ds_config(config)


def initialize(
    args: Any = None,
    model: ChunkedPipelineModule | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: Any = None,
    config_params: Any = None,
    schedule: str | Schedule = "1f1b",
    pipemare: PipeMareOptions = PipeMareOptions(),
):
    """Same arguments and return tuple as ``deepspeed.initialize`` (engine, optimizer,
    training dataloader, lr scheduler), plus ``schedule``: a registered schedule name
    (``pp-ext schedule list``) or ``deepspeed-1f1b`` for DeepSpeed's own
    ``TrainSchedule`` on its stock ``PipelineEngine``, unchanged (the baseline), or a
    prebuilt :class:`~pp_ext.schedules.Schedule` (e.g. ``auto`` computed from measured
    costs, Qi et al. 2024 Sec. 3, which its name alone cannot rebuild), validated here.

    The module's ``chunks`` and ``placement`` choose the schedule's chunks; the
    number of micro-batches is DeepSpeed's ``gradient_accumulation_steps``.
    ``pipemare``: PipeMare's hyper-parameters (used by ``schedule="pipemare"`` only).
    Asynchronous schedules need ``engine.flush()`` before eval, checkpoints and the end.
    """
    if model is None:
        raise ValueError("pp_ext.initialize requires a model (a pp_ext ChunkedPipelineModule)")
    if mpu is not None:
        raise ValueError(
            "mpu must be None with pipeline parallelism: the module's topology defines it"
        )
    if schedule == BASELINE:
        return deepspeed.initialize(
            args=args,
            model=model,
            optimizer=optimizer,
            model_parameters=model_parameters,
            training_data=training_data,
            lr_scheduler=lr_scheduler,
            dist_init_required=dist_init_required,
            collate_fn=collate_fn,
            config=config,
            config_params=config_params,
        )
    prebuilt, schedule = (
        (None, schedule) if isinstance(schedule, str) else (schedule, schedule.name)
    )
    spec = get(schedule)
    if not isinstance(model, ChunkedPipelineModule):
        raise TypeError(
            f"schedule {schedule} needs a pp_ext ChunkedPipelineModule (got {type(model).__name__})"
        )
    placement = (
        prebuilt.placement.name if prebuilt is not None else spec.placement_for(model.chunks)
    )
    if placement != model.placement.name:
        raise ValueError(
            f"schedule {schedule} runs in {placement} placement; build the module with "
            f"placement='{placement}'"
        )
    deepspeed.init_distributed(dist_init_required=dist_init_required)
    config = _load_config(args, config, config_params)
    mpu = model.mpu()
    config_class = DeepSpeedConfig(config, mpu)
    micro_batches = config_class.gradient_accumulation_steps
    deepspeed.set_optimizer_flags(config_class, model)
    pipe = model.topology().get_dim("pipe")
    if prebuilt is not None and (
        prebuilt.placement.ranks,
        prebuilt.micro_batches,
        prebuilt.placement.stages,
    ) != (pipe, micro_batches, model.placement.stages):
        raise ValueError(
            f"the prebuilt {schedule} schedule is for {prebuilt.placement.ranks} ranks, "
            f"{prebuilt.micro_batches} micro-batches and {prebuilt.placement.stages} stages; the module "
            f"and config have {pipe}, {micro_batches} and {model.placement.stages}: build it for these"
        )
    if prebuilt is not None:
        validate(prebuilt)
    # an I right before its own W gains nothing from the split: one B instead (at p = 1, all of them)
    program = fuse_backward(prebuilt or spec.build(pipe, micro_batches, model.chunks))
    # asynchronous schedules (their backward_weights say so) run on their own engine
    extra = (
        {"micro_batches": micro_batches, "pipemare": pipemare} if program.backward_weights else {}
    )
    engine = (AsyncScheduleEngine if extra else ScheduleEngine)(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        config=config,
        config_class=config_class,
        schedule=program,
        **extra,
    )
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
