"""Hugging Face causal LMs as pp-ext pipeline layers (see :mod:`pp_ext.hf.llama`)."""
from pp_ext.hf.families import layer_specs, supported
from pp_ext.hf.weights import copy_hf_weights

__all__ = ["copy_hf_weights", "layer_specs", "supported"]
