"""A checkpoint's optimizer state by parameter name, and the same written into a live
engine's optimizer: what :mod:`pp_ext.checkpoint.reshape` moves between layouts.

Two kinds of optimizer hold it:

* fp32 without ZeRO: the torch optimizer itself, saved in ``mp_rank_XX_model_states.pt``
  keyed by each parameter's position; pp-ext saves the names in that order beside it
  (``client_state["param_names"]``, :func:`pp_ext.checkpoint.reshape.param_names`).
* bf16 (DeepSpeed's BF16_Optimizer) and ZeRO stage 1/2: one flat fp32 partition per
  parameter group and data rank (the master weights, and the torch optimizer's state
  of that flat tensor), saved in ``*zero_pp_rank_D_mp_rank_XX_optim_states.pt`` with
  ``param_slice_mappings`` (name -> where its fragment lies in the partition, in
  partition order) and the shapes in ``mp_rank_XX_model_states.pt``. A parameter's
  whole state is the concatenation of its fragments over the data ranks, which is
  how DeepSpeed's ``ds_to_universal.py`` (``extract_zero_shards``,
  ``_merge_zero_shards``) reads them.

DeepSpeed's own route for a new layout, the universal checkpoint, is not taken: it
needs an offline conversion into another folder whose reader
(``deepspeed.checkpoint.DeepSpeedCheckpoint``) derives the pipeline and tensor degrees
from Megatron's file layout (one stage per pipeline rank, not pp-ext's chunks), the
tensor cuts from regex patterns the client must save, and the config key
``load_universal_checkpoint`` set before the engine exists. So the fragments are read
here as ``ds_to_universal`` reads them, and written as its loader
(``BaseOptimizer.load_hp_checkpoint_state_from_checkpoint_dir`` with
``load_hp_checkpoint_state``) writes them, from tensors in memory instead of files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
)
from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

FP32 = "fp32"  # the key of a master weight beside its optimizer state (ds_to_universal's name)
_FLAT_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def flat(engine) -> bool:
    """Whether ``engine``'s optimizer keeps flat fp32 partitions (bf16 or ZeRO)."""
    return bool(engine.bfloat16_enabled() or engine.zero_optimization())


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def saved(
    tag_dir: Path, model_states: list[dict]
) -> tuple[dict[tuple[int, str], dict | None], list[dict]]:
    """``({(tensor rank, name): state}, param_groups)`` of the checkpoint in ``tag_dir``,
    whose ``mp_rank_XX_model_states.pt`` files (in XX order) are ``model_states``. A
    state is the torch optimizer's for that parameter (``exp_avg``, ``exp_avg_sq``,
    ``step`` for AdamW), with the fp32 master weight under :data:`FP32` where the
    optimizer was flat; a flat one's tensors are 1-D (view them as the parameter's
    part); None where a torch optimizer had no state for it yet. A parameter held by
    several ranks (a tied one) is taken once; a checkpoint without tensor ranks had one."""
    files: dict[int, list[tuple[int, Path]]] = {}  # tensor rank -> (data rank, file)
    for path in Path(tag_dir).glob("*optim_states.pt"):
        if match := _FLAT_FILE.fullmatch(path.name):
            files.setdefault(int(match[2]), []).append((int(match[1]), path))
    if not files:
        return _saved_torch(model_states)
    by_name: dict[tuple[int, str], dict | None] = {}
    groups: list[dict] = []
    for mp, model_state in enumerate(model_states):
        parts: dict[str, dict] = {}  # name -> {key: [fragment of each data rank]}
        for _, path in sorted(files[mp]):
            optimizer = _load(path)["optimizer_state_dict"]
            groups = groups or optimizer["base_optimizer_state"]["param_groups"]
            for i, mappings in enumerate(optimizer["param_slice_mappings"]):
                flat_state = {
                    FP32: optimizer["single_partition_of_fp32_groups"][i],
                    **optimizer["base_optimizer_state"]["state"].get(i, {}),
                }
                for name, address in mappings.items():
                    pieces = parts.setdefault(name, {})
                    for key, value in flat_state.items():
                        if torch.is_tensor(value) and value.dim() > 0:
                            pieces.setdefault(key, []).append(
                                value.narrow(0, address.start, address.numel)
                            )
                        else:
                            pieces[key] = value
        for name, pieces in parts.items():
            by_name.setdefault(
                (model_state.get("tensor_rank", 0), name),
                {
                    key: torch.cat(value) if isinstance(value, list) else value
                    for key, value in pieces.items()
                },
            )
    return by_name, groups


def _saved_torch(
    model_states: list[dict],
) -> tuple[dict[tuple[int, str], dict | None], list[dict]]:
    by_name: dict[tuple[int, str], dict | None] = {}
    for state in model_states:
        optimizer = state["optimizer"]
        order = [i for group in optimizer["param_groups"] for i in group["params"]]
        for name, index in zip(state["param_names"], order):
            by_name.setdefault((state.get("tensor_rank", 0), name), optimizer["state"].get(index))
    return by_name, model_states[0]["optimizer"]["param_groups"]


def write(engine, states: Mapping[torch.nn.Parameter, dict | None]) -> None:
    """Give each trainable parameter of ``engine`` its ``states[param]`` (this rank's
    part, keyed as :func:`saved` reads them; None: no state yet)."""
    if not flat(engine):
        for param, state in states.items():
            if state is not None:
                engine.optimizer.state[param] = {
                    k: v.clone().to(param.device) if torch.is_tensor(v) else v
                    for k, v in state.items()
                }
        return
    _write_flat(engine.optimizer, states)


def _lp_groups(optimizer) -> list:
    """The bf16 / fp32 parameters of each group of a flat optimizer, the names DeepSpeed's
    own ``_load_universal_checkpoint`` uses: ZeRO's, BF16_Optimizer's."""
    return optimizer.bit16_groups if hasattr(optimizer, "bit16_groups") else optimizer.bf16_groups


def whole(optimizer, params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, dict]:
    """Each of ``params``' whole state in a flat optimizer, as :func:`saved` reads one: its
    fp32 master weight under :data:`FP32`, its part of every elementwise state of its
    group's flat partition, whole (AdamW's ``exp_avg``, ``exp_avg_sq``), the group's ``step``; each
    tensor shaped as the parameter. The fragments are summed over the parameter's
    data-parallel group (an expert's: its expert-data group), as DeepSpeed's
    ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` do: a collective
    that every member calls for the same parameters in the same order."""
    lp_groups = _lp_groups(optimizer)
    group_of = {id(lp): i for i, lps in enumerate(lp_groups) for lp in lps}
    out = {}
    for param in params:
        i = group_of[id(param)]
        hp = optimizer.optimizer.param_groups[i]["params"][0]
        flat_state = optimizer.optimizer.state.get(hp, {})
        # the fragments' views of it, linked again: ZeRO links every group's after its first
        # group's step, the later groups' state still empty (so DeepSpeed's getters find none)
        if flat_state:
            lazy_init_hp_params_optimizer_state(lp_groups[i], hp, optimizer.optimizer.state)
        state = {FP32: safe_get_full_fp32_param(param)}
        for key, value in flat_state.items():  # the same keys on every member: one group
            if torch.is_tensor(value) and value.shape == hp.shape:
                state[key] = safe_get_full_optimizer_state(param, key)
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
        out[param] = state
    return out


def _write_flat(optimizer, states: Mapping[torch.nn.Parameter, dict | None]) -> None:
    """As DeepSpeed's universal loader: each parameter's fragment of this data rank's
    partition takes its slice of the master weight and of each state, the flat state
    is assembled from the fragments (``map_to_flat_opt_states``), and the bf16 weights
    are cast from the masters (``update_lp_params``)."""
    for lp_group, group in zip(_lp_groups(optimizer), optimizer.optimizer.param_groups):
        hp_param, step = group["params"][0], None
        keys: set[str] = set()
        for lp in lp_group:
            mapping = lp._hp_mapping
            if mapping is None:  # the parameter lies wholly in another data rank's partition
                continue
            state, address = states[lp], mapping.lp_fragment_address
            assert state is not None  # a flat optimizer's every parameter has its master weight
            fragment = {
                key: value.to(hp_param.device).flatten().narrow(0, address.start, address.numel)
                for key, value in state.items()
                if torch.is_tensor(value) and value.dim() > 0
            }
            mapping.hp_fragment.data.copy_(fragment.pop(FP32))
            mapping.optim_fragment = {key: value.clone() for key, value in fragment.items()}
            keys |= fragment.keys()
            step = state.get("step", step)
        if step is not None:
            optimizer.optimizer.state[hp_param]["step"] = (
                step.clone() if torch.is_tensor(step) else step
            )
        map_to_flat_opt_states(hp_param, lp_group, optimizer.optimizer.state, keys)
    optimizer.update_lp_params()
