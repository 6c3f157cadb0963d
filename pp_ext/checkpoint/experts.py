"""Expert-parallel checkpoints: every routed expert saved once, by global expert index.

DeepSpeed's pipeline checkpoint writes each layer from data rank 0 only
(``PipelineModule.save_state_dict``), which under expert parallelism
(:mod:`pp_ext.moe.dispatch`) holds ``1 / E`` of each MoE layer's experts; its MoE path
(``DeepSpeedEngine._save_moe_checkpoint``) writes no pipeline layer files at all. So the
layer files are written as without experts (the expert tensors left out) and, as DeepSpeed's
MoE checkpoint does (``_get_expert_ckpt_name``: one file per layer and global expert),
each rank of the first expert group (the ranks holding distinct experts; expert-data rank
0) of tensor rank 0 (experts are whole on every tensor rank) writes, for each of its
experts ``j = expert rank x local + i``, ``layer_XX_expert_J_model_states.pt`` (the fused
tensors' row ``i``, kept as a ``[1, ...]`` slice; a LoRA run's: the adapters' part of
that expert, rows of ``lora_A`` and columns of ``lora_B``, :func:`pp_ext.peft.expert_parts`,
its frozen experts left out as DeepSpeed leaves out the frozen parameters) and
``layer_XX_expert_J_optim_states.pt`` (that part of its AdamW ``exp_avg`` / ``exp_avg_sq``,
``step``; under bf16 or ZeRO, whose
flat partitions DeepSpeed saves per data rank under the same names on every expert rank,
also its fp32 master weight, as :mod:`pp_ext.checkpoint.optimizer_state` names it, and
the moments of that expert only). The layer index XX is the
global one (as the layer files'), not DeepSpeed's per-rank count of MoE layers, so no
layout changes a name: export and resume merge the files by expert index
(:class:`pp_ext.tp.Split` with one part per expert) and cut this run's part again.
Only trained tensors are expert files' (a LoRA run's experts are its base's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pp_ext import tp
from pp_ext.checkpoint import optimizer_state
from pp_ext.peft import expert_parts
from pp_ext.peft.adapters import ADAPTER


def _sharded(param: torch.nn.Parameter) -> bool:
    """A trained tensor cut over the expert ranks (an expert group's part)."""
    return param.requires_grad and getattr(param, "expert_split", None) is not None


def expert_params(layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``state_dict`` name -> trained parameter of ``layer``'s sharded experts."""
    return {name: param for name, param in layer.named_parameters() if _sharded(param)}


def own_part(cut: tp.Split, size: int, i: int) -> tp.Split:
    """The cut of an expert rank's part (one of ``size``) into its experts, whose ``i``-th
    is the one ``cut`` (one part per expert) calls ``rank * local + i``."""
    return tp.Split(cut.dim, tuple(n // size for n in cut.sections), cut.size // size, i)


def weight_file(tag_dir: Path, idx: int, expert: int) -> Path:
    return Path(tag_dir) / f"layer_{idx:02d}_expert_{expert}_model_states.pt"


def optim_file(tag_dir: Path, idx: int, expert: int) -> Path:
    return Path(tag_dir) / f"layer_{idx:02d}_expert_{expert}_optim_states.pt"


def weight_files(tag_dir: Path, idx: int) -> list[Path]:
    """Layer ``idx``'s expert files, by global expert index (none: its experts lie whole
    in its layer files, as an ``expert: 1`` run saves them)."""
    found = {
        int(path.name.split("_")[3]): path
        for path in Path(tag_dir).glob(f"layer_{idx:02d}_expert_*_model_states.pt")
    }
    return [found[j] for j in sorted(found)]


def _own_experts(module: torch.nn.Module) -> list[str]:
    return [name for name, param in module.named_parameters(recurse=False) if _sharded(param)]


def _drop_experts(module, state_dict, prefix, local_metadata) -> None:
    for name in _own_experts(module):
        del state_dict[prefix + name]


@contextmanager
def layer_files_without_experts(engine) -> Iterator[None]:
    """Inside, ``engine.save_checkpoint`` writes DeepSpeed's ordinary pipeline checkpoint
    (layer files, ``mp_rank_XX_model_states.pt``) with the sharded experts left out."""
    moe = engine.has_moe_layers
    engine.has_moe_layers = False  # DeepSpeed's MoE save writes no layer files
    handles = [
        layer.register_state_dict_post_hook(_drop_experts)
        for layer in engine.module.modules()
        if _own_experts(layer)
    ]
    try:
        yield
    finally:
        engine.has_moe_layers = moe
        for handle in handles:
            handle.remove()


def save(engine, tag_dir: Path, held: list[tuple[int, str, torch.nn.Module]]) -> None:
    """Write this rank's expert files of the layers it ``held`` (``(index, prefix,
    module)``, :func:`pp_ext.checkpoint.reshape.held_layers`), if it is a writer. A flat
    optimizer's (bf16, ZeRO) state is first assembled whole
    (:func:`pp_ext.checkpoint.optimizer_state.whole`, with the fp32 master weights) by
    every rank of each expert-data group, the writer's included."""
    if engine.module.tensor_axis.rank != 0:
        return
    data_rank = engine.grid.get_data_parallel_rank()
    for idx, _, layer in held:
        params = expert_params(layer)
        if not params:
            continue
        split: tp.Split = getattr(next(iter(params.values())), "expert_split")
        by_param = (
            optimizer_state.whole(engine.optimizer, list(params.values()))
            if optimizer_state.flat(engine)
            else {p: engine.optimizer.state.get(p) for p in params.values()}
        )
        if data_rank >= split.size:  # another expert group's replica of the same experts
            continue
        parts = expert_parts(layer, ADAPTER)
        local = parts[next(iter(params))].size // split.size
        for i in range(local):
            expert = split.rank * local + i
            cuts = {name: own_part(parts[name], split.size, i) for name in params}
            rows = {name: cuts[name].take(p.detach()).clone() for name, p in params.items()}
            torch.save(rows, weight_file(tag_dir, idx, expert))
            states = {name: by_param[p] for name, p in params.items()}
            torch.save(
                {
                    name: None
                    if state is None
                    else {
                        key: cuts[name].take(value).clone()
                        if torch.is_tensor(value) and value.dim() > 0
                        else value
                        for key, value in state.items()
                    }
                    for name, state in states.items()
                },
                optim_file(tag_dir, idx, expert),
            )


def saved_states(tag_dir: Path, idx: int, parts: dict[str, tp.Split]) -> dict[str, dict | None]:
    """``state_dict`` name -> the whole optimizer state of each of layer ``idx``'s expert
    tensors, merged from its per-expert files by ``parts`` (:func:`pp_ext.peft.expert_parts`);
    None: none yet."""
    files = [
        torch.load(optim_file(tag_dir, idx, j), map_location="cpu", weights_only=False)
        for j in range(len(weight_files(tag_dir, idx)))
    ]
    states: dict[str, dict | None] = {}
    for name, first in files[0].items():
        states[name] = (
            None
            if first is None
            else {
                key: parts[name].merge([file[name][key] for file in files])
                if torch.is_tensor(value) and value.dim() > 0
                else value
                for key, value in first.items()
            }
        )
    return states
