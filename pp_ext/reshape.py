"""Resuming a checkpoint under another layout (pipeline ranks, chunks, placement,
partition, data ranks): e.g. pipe 4 -> pipe 2, or 1f1b -> zbv.

The weights need nothing: DeepSpeed's pipeline checkpoints hold one file per layer,
named by the layer's global index, which any layout reads. What DeepSpeed ties to the
layout is the rest of ``mp_rank_XX_model_states.pt``: the optimizer state is keyed by
the position of each parameter in that rank's optimizer. So every save also records
those parameters' names (``client_state["param_names"]``; a ChunkedPipelineModule
names parameters by global layer index, the same in every layout), and a resume under
another layout gives each parameter of this rank the state its name had on whichever
rank held it, then the learning-rate schedule and the step counters.

With tensor parallelism (Megatron, Shoeybi et al. 2019, Sec. 3) each tensor rank holds
its own part of a sharded parameter under the same name, so a save records the tensor
rank too (``client_state["tensor_rank"]``) and a parameter takes the state of its name
on its own tensor rank. The tensor size itself cannot change: the layer files and the
optimizer state hold parts cut for the saved size, so a change is refused in one line.

fp32 without ZeRO only: bf16 and ZeRO keep partitioned fp32 master copies in their own
files (DeepSpeed's universal checkpoints convert those), so they are refused in one line.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pp_ext.checkpoints import CheckpointError

LAYOUT_KEYS = ("pipeline", "tensor", "data", "chunks", "placement", "partition")


def param_names(engine) -> list[str] | None:
    """Names of the optimizer's parameters on this rank, in its order (saved with every
    checkpoint); None under bf16 or ZeRO, whose optimizers hold flat partitions."""
    if engine.bfloat16_enabled() or engine.zero_optimization():
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]


def client_state(engine) -> dict:
    """What every checkpoint saves for a resume under another layout: the optimizer's
    parameter names (:func:`param_names`) and this rank's place on the tensor axis."""
    return {"param_names": param_names(engine), "tensor_rank": engine.module.tensor_axis.rank}


def changes(saved: dict, current: dict) -> list[str]:
    """The layout keys on which a checkpoint's marker and this run differ."""
    return [f"{k} {saved.get(k)} -> {current[k]}" for k in LAYOUT_KEYS if saved.get(k) != current[k]]


def load(engine, tag_dir: Path, what_changed: list[str]) -> None:
    """Load ``tag_dir`` into ``engine`` under this run's layout (the step is in the
    checkpoint's marker)."""
    tensor = next((change for change in what_changed if change.startswith("tensor ")), None)
    if tensor is not None:
        raise CheckpointError(f"checkpoint {tag_dir} was saved with another tensor-parallel size ({tensor}): its "
                              f"layer files and optimizer state hold parts cut for the saved size, which pp-ext "
                              f"does not re-cut; resume with the saved parallel.tensor")
    if engine.bfloat16_enabled() or engine.zero_optimization():
        raise CheckpointError(f"checkpoint {tag_dir} was saved with another layout ({', '.join(what_changed)}): "
                              f"pp-ext reshapes fp32 checkpoints without ZeRO only; resume with the saved layout")
    files = sorted(Path(tag_dir).glob("mp_rank_*_model_states.pt"))
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    if not states or any("param_names" not in s or (engine.module.tensor_axis.size > 1 and "tensor_rank" not in s)
                         for s in states):
        raise CheckpointError(f"checkpoint {tag_dir} has no parameter names (saved by an older pp-ext): "
                              f"resume with the saved layout")
    by_name = {}  # (tensor rank, name) -> state: tensor ranks hold different parts under one name
    for state in states:
        optimizer = state["optimizer"]
        order = [i for group in optimizer["param_groups"] for i in group["params"]]
        for name, index in zip(state["param_names"], order):
            by_name.setdefault((state.get("tensor_rank", 0), name), optimizer["state"].get(index))
    engine.module.load_state_dir(str(tag_dir), checkpoint_engine=engine.checkpoint_engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    tensor_rank, missing = engine.module.tensor_axis.rank, []
    for group in engine.optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            if (tensor_rank, name) not in by_name:
                missing.append(name)
            elif by_name[tensor_rank, name] is not None:
                engine.optimizer.state[param] = {k: v.clone().to(param.device) if torch.is_tensor(v) else v
                                                 for k, v in by_name[tensor_rank, name].items()}
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir} holds no optimizer state for {missing[0]} "
                              f"({len(missing)} parameters): is it a checkpoint of this model?")
    first = states[0]
    saved_groups = first["optimizer"]["param_groups"]
    if len(saved_groups) != len(engine.optimizer.param_groups):
        raise CheckpointError(f"checkpoint {tag_dir} has {len(saved_groups)} optimizer parameter groups, this run "
                              f"{len(engine.optimizer.param_groups)}: resume with the same optimizer")
    for group, saved in zip(engine.optimizer.param_groups, saved_groups):
        # the learning rate in force (the scheduler sets it only at its next step) and the rest
        group.update({k: v for k, v in saved.items() if k != "params"})
    if engine.lr_scheduler is not None and first.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(first["lr_scheduler"])
    engine.global_steps, engine.global_samples = first["global_steps"], first["global_samples"]
    engine.skipped_steps = first["skipped_steps"]

