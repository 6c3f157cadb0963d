"""Per-stage loading: each rank builds its own pipeline layers and reads only their tensors.

A Hugging Face folder holds ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (transformers' ``save_pretrained``). The index's
``weight_map`` says which shard holds each tensor, and safetensors' ``safe_open``
reads single tensors from a file without loading the rest, so a stage opens only the
shards that hold its layers' ``hf_keys()`` and reads only those tensors (FACTS:
"Loading only a stage's tensors").

Layers are built so that their values never depend on the layout (pipeline ranks,
chunks, partition): a layer that will be loaded is built without any random
initialisation (transformers' ``no_init_weights``: every tensor is then overwritten,
which :func:`~pp_ext.hf.weights.copy_hf_weights` enforces); a layer of a config-only
model is built under the seed ``seed + global layer index`` (DeepSpeed's
``seed_layers``/``base_seed`` rule) and then given the family's own HF
initialisation (``PreTrainedModel._init_weights``, e.g. ``normal(0,
initializer_range)`` for linear layers, ones for RMSNorm), so training from scratch
starts as ``AutoModelForCausalLM.from_config`` would.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from deepspeed.pipe import TiedLayerSpec
from deepspeed.runtime.utils import set_random_seed
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers import initialization as hf_init
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from pp_ext import tp
from pp_ext.engine.module import ChunkedPipelineModule
from pp_ext.hf.families import layer_specs
from pp_ext.hf.weights import (
    copy_hf_weights,
    dequantizer,
    hf_keys,
    meta_model,
    model_sources,
)
from pp_ext.moe import dispatch, experts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` or ``torch.bfloat16`` -> ``torch.bfloat16``; anything else is an error."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def has_weights(model_dir: str | Path) -> bool:
    model_dir = Path(model_dir)
    return (model_dir / SAFE_WEIGHTS_INDEX_NAME).is_file() or (
        model_dir / SAFE_WEIGHTS_NAME
    ).is_file()


def weights_file(model_dir: str | Path) -> Path:
    """The folder's ``model.safetensors.index.json`` if it is sharded, else its ``model.safetensors``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"model folder {model_dir} does not exist: pass a folder written by save_pretrained"
        )
    for name in (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME):
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"{model_dir} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}: save the model "
        f"with save_pretrained (safetensors), or pass a config to start from random weights"
    )


def weight_map(source: Path) -> dict[str, Path]:
    """Each tensor name in ``source`` (:func:`weights_file`) -> the file that holds it."""
    if source.name == SAFE_WEIGHTS_INDEX_NAME:
        return {
            key: source.parent / name
            for key, name in json.loads(source.read_text())["weight_map"].items()
        }
    with safe_open(source, framework="pt") as handle:  # reads the header only
        return dict.fromkeys(handle.keys(), source)


def _unique(layers: Iterable[nn.Module]) -> list[nn.Module]:
    """Each module once (a tied embedding and head are one module)."""
    return list({id(layer): layer for layer in layers}.values())


def load_hf_weights(layers: Iterable[nn.Module], model_dir: str | Path) -> None:
    """Copy into ``layers`` their tensors from the HF folder ``model_dir``, reading
    nothing else: a shard is opened only if it holds a needed tensor, and only the
    needed tensors (a tensor-parallel rank: only its part of each; an expert rank: only its
    experts, whether stored fused or one tensor per expert) are read, one layer at a time
    (so at most one layer's tensors are held beside the layers). Checkpoint keys are
    renamed as ``from_pretrained`` renames them (:func:`~pp_ext.hf.weights.model_sources`:
    one tensor per expert merged into the fused experts as transformers merges them, MXFP4
    experts dequantized by transformers' own converter); each tensor is cast to the dtype
    of the layer's own."""
    source = weights_file(model_dir)
    files = weight_map(source)
    config = load_config(model_dir)
    model = meta_model(config)
    sources = model_sources(files, model, dequantizer(config))
    with ExitStack() as stack:
        handles: dict[Path, safe_open] = {}

        def opened(key: str) -> safe_open:
            if files[key] not in handles:
                handles[files[key]] = stack.enter_context(safe_open(files[key], framework="pt"))
            return handles[files[key]]

        def read(key: str, rows: slice | None) -> torch.Tensor:
            return opened(key).get_tensor(key) if rows is None else opened(key).get_slice(key)[rows]

        for layer in _unique(layers):
            tensors, keys = {}, hf_keys(layer)
            sharded = {keys[local] for local in tp.splits(layer)}  # only this rank's part read
            experts = {  # an expert rank's part of the fused experts (pp_ext.moe.dispatch)
                keys[local]: param.expert_split
                for local, param in layer.named_parameters()
                if hasattr(param, "expert_split")
            }
            for name in keys.values():
                if name not in sources:
                    raise KeyError(
                        f"{source} has no tensor {name!r}, needed by {type(layer).__name__}: the folder's "
                        f"weights do not match its config (or this family's key mapping)"
                    )
                if sources[name].converter is None and name in sharded:
                    key = sources[name].stored()[0]  # a slice, of which Split.take reads its part
                    tensors[name] = opened(key).get_slice(key)
                else:  # converted tensors (merged experts, MXFP4): an expert rank's experts only
                    tensors[name] = sources[name].read(name, read, model, experts.get(name))
            copy_hf_weights([layer], tensors)


def load_config(model: str | Path | PretrainedConfig) -> PretrainedConfig:
    """The config of ``model``: a PretrainedConfig, or a folder with config.json."""
    if isinstance(model, PretrainedConfig):
        return model
    model_dir = Path(model)
    if not (model_dir / CONFIG_NAME).is_file():
        problem = "does not exist" if not model_dir.exists() else f"has no {CONFIG_NAME}"
        raise FileNotFoundError(
            f"model folder {model_dir} {problem}: pass a Hugging Face model folder "
            f"(config.json, optionally with safetensors weights) or a PretrainedConfig"
        )
    return AutoConfig.from_pretrained(model_dir)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating tensors in ``dtype``, as ``from_pretrained(dtype=...)`` builds
    a model: buffers HF computes in float32 on purpose (rotary ``inv_freq``) stay so."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def hf_initializer(config: PretrainedConfig) -> Callable[[nn.Module], None]:
    """The family's ``PreTrainedModel._init_weights``, applied to every submodule of a
    layer children first, as ``PreTrainedModel.initialize_weights`` does. The method
    reads the model's config, so it is bound to the HF model built on the meta device
    (free: no memory, no initialisation)."""
    model = meta_model(config)

    @torch.no_grad()
    def initialize(layer: nn.Module) -> None:
        with hf_init.guard_torch_init_functions():
            layer.apply(model._init_weights)

    return initialize


def _with_build(spec, build: Callable[[], nn.Module]):
    """A copy of ``spec`` built by ``build``. DeepSpeed only calls ``spec.build()``,
    and keeping the spec's class and typename keeps TiedLayerSpec handling and
    'type:' partitioning unchanged."""
    spec = copy.copy(spec)
    spec.build = lambda log=False: build()
    return spec


def layout_free_specs(
    specs: list, *, dtype: torch.dtype, seed: int, initialize: Callable[[nn.Module], None] | None
) -> list:
    """``specs`` built in ``dtype``, each the same whatever rank and chunk builds it.

    ``initialize`` None: no random initialisation (the weights will be loaded).
    Otherwise a spec is built under ``seed + its index`` (a tied module: the index of
    its first use, so every rank that holds it builds the same values) and then
    ``initialize``'d; on a tensor axis it is built and initialised whole, and each
    rank keeps its part, so the values do not depend on the tensor size either. Built on the meta device (only counted, for 'parameters'
    partitioning), nothing is seeded or initialised.
    """
    first_use: dict[str, int] = {}
    out = []
    for idx, spec in enumerate(specs):
        if isinstance(spec, TiedLayerSpec):
            idx = first_use.setdefault(spec.key, idx)

        def build(spec=spec, idx=idx) -> nn.Module:
            with default_dtype(dtype):
                if torch.get_default_device().type == "meta":
                    return spec.build()
                if initialize is None:
                    with hf_init.no_init_weights():
                        return spec.build()
                set_random_seed(seed + idx)
                with tp.using(tp.TensorAxis()):
                    whole = spec.build()
                initialize(whole)
                if tp.current() == tp.TensorAxis():  # one rank, no vocabulary padded
                    return whole
                with hf_init.no_init_weights():
                    layer = spec.build()
                tp.load_parts(layer, whole.state_dict())
                return layer

        out.append(_with_build(spec, build))
    return out


def indexed_layers(module: ChunkedPipelineModule) -> list[tuple[int, nn.Module]]:
    """``(global index, layer)`` of each layer module this rank built (a tied module at
    each of its uses)."""
    return [pair for chunk in range(module.chunks) for pair in module.indexed_chunk_modules(chunk)]


def local_layers(module: ChunkedPipelineModule) -> list[nn.Module]:
    """The layer modules this rank built, each once."""
    return _unique(layer for _, layer in indexed_layers(module))


def build_pipeline_module(
    model: str | Path | PretrainedConfig,
    *,
    num_stages: int | None = None,
    topology=None,
    chunks: int = 1,
    placement: str = "loop",
    partition_method="parameters",
    loss_fn=None,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    activation_checkpoint_interval: int = 0,
    seed: int = 1234,
    make_vocab_size_divisible_by: int = 1,
    expert: int = 1,
    **kwargs,
) -> ChunkedPipelineModule:
    """A :class:`ChunkedPipelineModule` of the HF model ``model`` (a folder with
    config.json and optionally safetensors weights, or a PretrainedConfig), in
    ``dtype``; each rank builds only its own layers and loads only their weights.

    Without weights (a config, or a folder with config.json only) the layers get the
    family's HF initialisation under per-layer seeds, identical for any layout (see
    :func:`layout_free_specs`). A topology with a model axis makes the layers
    tensor-parallel on it (:mod:`pp_ext.tp`); each rank then reads only its part of
    each sharded tensor; a vocabulary is padded to a multiple of
    ``make_vocab_size_divisible_by`` x tensor (Megatron's rule, :mod:`pp_ext.tp.vocab`:
    zero rows, masked logits). ``expert`` > 1 spreads each MoE layer's experts over that
    many data ranks (:mod:`pp_ext.moe.dispatch`); each rank reads only its experts. Other keyword arguments go to DeepSpeed's
    ``PipelineModule`` (e.g. ``checkpointable_layers``, ``dynamic_shape``).
    """
    config = load_config(model)
    if topology is not None:  # a config that cannot be cut tensor ways fails here, in one line
        tp.check_tensor_split(config, max(1, topology.get_dim("model")))
    # the folder whose weights the layers load (None: HF's initialisation)
    weights = None if isinstance(model, PretrainedConfig) or not has_weights(model) else model
    specs = layout_free_specs(
        layer_specs(config, attn_implementation),
        dtype=to_dtype(dtype),
        seed=seed,
        initialize=None if weights is not None else hf_initializer(config),
    )
    module = ChunkedPipelineModule(
        specs,
        num_stages=num_stages,
        topology=topology,
        loss_fn=loss_fn,
        chunks=chunks,
        placement=placement,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        **kwargs,
    )
    if expert > 1:
        axis = dispatch.expert_axis(module._grid, expert)
        for layer in local_layers(module):
            for sub in list(layer.modules()):
                if isinstance(sub, experts.DeferrableExperts):
                    dispatch.shard(sub, axis)
    if weights is not None:
        load_hf_weights(local_layers(module), weights)
    return module
