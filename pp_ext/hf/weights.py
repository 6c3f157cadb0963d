"""Copying HF weights into built pipeline layers, through each layer's ``hf_keys()``.

The mapping is the unit per-stage loading builds on: a stage asks its own layers
which HF keys they need and reads only those.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def copy_hf_weights(layers: Iterable[nn.Module], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state_dict`` (HF names, e.g. ``model.state_dict()``) into ``layers``.

    Every entry of every layer's own ``state_dict`` must be mapped and present: a
    silently skipped tensor would leave a randomly initialised weight behind. A
    module listed twice (a tied embedding and head) is copied twice, harmlessly.
    """
    for layer in layers:
        keys, own = layer.hf_keys(), layer.state_dict()
        if unmapped := sorted(set(own) - set(keys)):
            raise KeyError(f"{type(layer).__name__} has no HF key for {unmapped}")
        if missing := sorted(k for k in keys.values() if k not in state_dict):
            raise KeyError(f"HF state dict lacks {missing} needed by {type(layer).__name__}")
        layer.load_state_dict({local: state_dict[hf] for local, hf in keys.items()})
