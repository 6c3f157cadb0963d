"""Hugging Face causal LMs as pp-ext pipeline layers (see :mod:`pp_ext.hf.llama`)."""

from pp_ext.hf.families import layer_specs, position_table, supported
from pp_ext.hf.loading import build_pipeline_module, load_hf_weights
from pp_ext.hf.moe import router_loss_coef
from pp_ext.hf.weights import copy_hf_weights

__all__ = [
    "build_pipeline_module",
    "copy_hf_weights",
    "layer_specs",
    "load_hf_weights",
    "position_table",
    "router_loss_coef",
    "supported",
]
