"""Resuming a checkpoint under another layout (pipeline ranks, tensor ranks, chunks,
placement, partition, data ranks): e.g. pipe 4 -> pipe 2, 1f1b -> zbv, or pipe 2 x
tensor 2 -> pipe 2 x tensor 1, in fp32, bf16 or with ZeRO-1.

Every tensor is found by name, which no layout changes: DeepSpeed's pipeline checkpoints
hold one file per layer (per tensor rank), named by the layer's global index, and a
ChunkedPipelineModule names parameters by global layer index too. The optimizer state
is read by (tensor rank, parameter name) (:mod:`pp_ext.checkpoint.optimizer_state`: the torch
optimizer's state in fp32, the flat fp32 partitions of bf16 and ZeRO with their
master weights), so each rank gives each of its parameters the state its name had on
whichever rank held it, then the learning-rate schedule and the step counters.

With tensor parallelism (Megatron, Shoeybi et al. 2019, Sec. 3) each tensor rank
holds its own part of a sharded parameter under the same name. A weight and its
elementwise optimizer state (AdamW's ``exp_avg``, ``exp_avg_sq``; ``step`` is copied)
are cut alike, so each is merged from the saved tensor ranks' parts by the cut of the
saved size (:meth:`pp_ext.tp.Split.merge`, the layer built on the meta device for that
size, as export does: :func:`pp_ext.checkpoint.export.layer_tensors`) and this rank's part of
the new size is taken (:meth:`pp_ext.tp.Split.take`); a replicated one (a norm) is
tensor rank 0's. Merging then cutting at the saved size gives back the same parts, so
an unchanged tensor size goes the same way.

An expert-parallel run's experts (Rajbhandari et al. 2022) are saved one file per
global expert (:mod:`pp_ext.checkpoint.experts`), weights and AdamW state alike (under bf16
or ZeRO with the fp32 master weights, which the flat writer takes as a dense parameter's):
merged in expert order and this rank's experts taken (its ``expert_split``), so a resume under
another ``parallel.expert`` moves each expert, with its state, by index.

What stays refused, in one line: a checkpoint without parameter names (saved by an
older pp-ext), and a change between fp32 and bf16 / ZeRO (their optimizers keep
different state). A tensor size the model's heads or MLP width does not divide is
refused before launch (:func:`pp_ext.tp.check_tensor_split`). A padded vocabulary
(:mod:`pp_ext.tp.vocab`) is merged without its zero rows, by the padding the checkpoint's
marker names, and cut again with this run's.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from deepspeed.pipe import TiedLayerSpec

from pp_ext import tp
from pp_ext.checkpoint import experts, optimizer_state
from pp_ext.checkpoint.export import layer_tensors, load_layer, saved_layers
from pp_ext.checkpoint.tags import CheckpointError
from pp_ext.peft import Targets, expert_parts
from pp_ext.peft.adapters import ADAPTER


def param_names(engine) -> list[str] | None:
    """Names of the optimizer's parameters on this rank, in its order (saved with every
    checkpoint); None under bf16 or ZeRO, whose checkpoints name their fragments."""
    if optimizer_state.flat(engine):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]


def client_state(engine) -> dict:
    """What every checkpoint saves for a resume under another layout: the optimizer's
    parameter names (:func:`param_names`) and this rank's place on the tensor axis."""
    return {"param_names": param_names(engine), "tensor_rank": engine.module.tensor_axis.rank}


def held_layers(module) -> list[tuple[int, str, torch.nn.Module]]:
    """``(index of its layer file, parameter name prefix, module)`` of every layer this
    rank holds, a tied module once (its file: the first use that has one, as export's
    :func:`pp_ext.checkpoint.export.saved_layers`)."""
    specs = module._layer_specs
    first = {spec.key: idx for idx, spec in saved_layers(specs) if isinstance(spec, TiedLayerSpec)}
    held: dict[str | int, tuple[int, str, torch.nn.Module]] = {}  # by tie key or index
    for chunk in range(module.chunks):
        for idx in range(*module.chunk_bounds(chunk)):
            spec = specs[idx]
            if isinstance(spec, TiedLayerSpec):
                held.setdefault(
                    spec.key,
                    (first[spec.key], f"tied_modules.{spec.key}.", module.tied_modules[spec.key]),
                )
            elif str(idx) in module._modules:
                held.setdefault(idx, (idx, f"{idx}.", module._modules[str(idx)]))
    return list(held.values())


def recut(
    parts: list[torch.Tensor], saved: tp.Split | None, current: tp.Split | None
) -> torch.Tensor:
    """This rank's part under ``current`` of the tensor whose saved parts (one per saved
    tensor rank) were cut by ``saved`` (None: replicated, tensor rank 0's is taken)."""
    whole = parts[0] if saved is None else saved.merge(parts)
    return whole if current is None else current.take(whole)


def load(engine, tag_dir: Path, what_changed: list[str], adapters: Targets | None = None) -> None:
    """Load ``tag_dir`` into ``engine`` under this run's layout (the step is in the
    checkpoint's marker): weights, optimizer state, learning-rate schedule, counters.
    ``adapters``: a LoRA run's, whose checkpoint holds the trained tensors only."""
    tag_dir = Path(tag_dir)
    model_states = [
        torch.load(f, map_location="cpu", weights_only=False)
        for f in sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    ]

    def named(state: dict) -> bool:  # parameter names, and the tensor rank where there were several
        one_rank = state.get("checkpoint_parallel_dimensions", {}).get("tp_degree") == 1
        return "param_names" in state and ("tensor_rank" in state or one_rank)

    if not model_states or not all(named(s) for s in model_states):
        raise CheckpointError(
            f"checkpoint {tag_dir} has no parameter names (saved by an older pp-ext): "
            f"resume with the saved layout"
        )
    flat = optimizer_state.flat(engine)
    if flat != (model_states[0]["param_names"] is None):  # names are saved by fp32 runs only
        kinds = ("fp32 without ZeRO", "bf16 or ZeRO")
        raise CheckpointError(
            f"checkpoint {tag_dir} was saved {kinds[not flat]}, this run is {kinds[flat]} "
            f"({', '.join(what_changed)}): their optimizers keep different state; resume "
            f"with the saved deepspeed.bases"
        )
    states, saved_groups = optimizer_state.saved(tag_dir, model_states)
    wanted, missing = {}, []  # param -> this rank's part of its saved state (None: none yet)
    for idx, prefix, layer in held_layers(engine.module):
        meta, stored = layer_tensors(tag_dir, idx, engine.module._layer_specs[idx], adapters)
        read = cache(load_layer)  # each of the layer's files once
        tp.load_parts(
            layer,
            {local: where.read(read) for local, where in stored.items()},
            strict=adapters is None,
        )
        shapes = meta.state_dict()
        rows = experts.weight_files(tag_dir, idx)
        by_expert = experts.saved_states(tag_dir, idx, expert_parts(layer, ADAPTER)) if rows else {}
        for local, param in layer.named_parameters():
            if not param.requires_grad:
                continue
            name, where = prefix + local, stored[local]
            current = getattr(param, "tp_split", None) or getattr(param, "expert_split", None)
            if local in by_expert:  # merged from its experts' files, whole
                state = by_expert[local]
                wanted[param] = (
                    None
                    if state is None
                    else {
                        key: recut([value], None, current)
                        if torch.is_tensor(value) and value.dim() > 0
                        else value
                        for key, value in state.items()
                    }
                )
                continue
            ranks = range(
                len(where.paths)
            )  # the saved tensor ranks' parts, or tensor rank 0's whole
            if any((rank, name) not in states for rank in ranks):
                missing.append(name)
                continue
            # None: the optimizer had no state for it yet (on every tensor rank alike)
            parts = [part for rank in ranks if (part := states[rank, name]) is not None]
            wanted[param] = (
                None
                if not parts
                else {
                    key: recut(
                        [part[key].view(shapes[local].shape) for part in parts],
                        where.split,
                        current,
                    )
                    if torch.is_tensor(value) and value.dim() > 0
                    else value
                    for key, value in parts[0].items()
                }
            )
    if missing:
        raise CheckpointError(
            f"checkpoint {tag_dir} holds no optimizer state for {missing[0]} "
            f"({len(missing)} parameters): is it a checkpoint of this model?"
        )
    optimizer_state.write(engine, wanted)
    groups = engine.optimizer.param_groups
    sources = group_sources(saved_groups, groups, tag_dir)
    for group, source in zip(groups, sources):
        # the learning rate in force (the scheduler sets it only at its next step) and the rest
        kept = ("params", "name", "moe")  # an expert group keeps its own name and mark
        group.update({k: v for k, v in saved_groups[source].items() if k not in kept})
    first = model_states[0]
    if engine.lr_scheduler is not None and first.get("lr_scheduler") is not None:
        scheduler = dict(first["lr_scheduler"])
        for key in ("base_lrs", "_last_lr"):  # one entry per group: this run's groups
            if key in scheduler:
                scheduler[key] = [scheduler[key][source] for source in sources]
        engine.lr_scheduler.load_state_dict(scheduler)
    engine.global_steps, engine.global_samples = first["global_steps"], first["global_samples"]
    engine.skipped_steps = first["skipped_steps"]


def group_sources(saved: list[dict], groups: list[dict], tag_dir: Path) -> list[int]:
    """For each of this run's optimizer groups, the saved group whose settings (and
    learning-rate schedule entry) it takes: the one of the same name and origin, else
    (an expert group that a change of ``parallel.expert`` made or removed,
    :func:`pp_ext.training.optim.expert_groups`) the saved group of its origin's name.
    A CheckpointError, one line, where neither exists: another optimizer."""

    def key(group: dict) -> tuple:
        return group.get("name"), group.get("origin")

    if len(saved) == len(groups) and not any("name" in group for group in saved):
        return list(range(len(groups)))  # saved before groups had names: by place
    by_key = {key(group): index for index, group in enumerate(saved)}
    by_name = {group.get("name"): index for index, group in enumerate(saved)}
    sources = []
    for group in groups:
        source = by_key.get(key(group), by_name.get(group.get("origin")))
        if source is None:
            raise CheckpointError(
                f"checkpoint {tag_dir} has optimizer parameter groups "
                f"{[g.get('name') for g in saved]}, none of them for this run's "
                f"{group.get('name')!r}: resume with the same optimizer"
            )
        sources.append(source)
    return sources
