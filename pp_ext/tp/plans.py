"""Sharding plans: which linear layers of each family's decoder layer are column- and
which row-parallel, and the checks that a config can be cut ``tensor`` ways.

Megatron's attention and MLP blocks (Shoeybi et al. 2019, Sec. 3) cut attention by
heads (q, k, v column-parallel, output projection row-parallel) and the MLP by
intermediate features (first GEMM(s) column-, second row-parallel), so each block
communicates once forward and once backward. With grouped-query attention the key
and value heads are cut as well, so each rank keeps whole groups (its query heads
with their own key/value heads). Norms stay replicated; Qwen3's and Gemma3's q/k
norms share one weight over all heads, so each rank's gradient covers only its heads
and is summed over the axis (:func:`~pp_ext.tp.layers.sum_gradients`).

The local layer is HF's own class built from :func:`local_config` (heads, key/value
heads and intermediate size divided by ``tensor``, ``head_dim`` kept), so its linear
layers have exactly the shard shapes and its forward splits heads at the local
counts. GPT-NeoX and GPT-2 derive their head size from the hidden size, so their
attention linears are rebuilt at the local width instead (a module of the same class,
``nn.Linear`` or transformers' ``Conv1D``). GPT-NeoX's fused ``query_key_value`` rows
are stored head by head ([q_h, k_h, v_h] per head), so a contiguous block of rows is
a block of heads. GPT-2's fused ``c_attn`` is a ``Conv1D`` whose weight is stored
transposed ([in, out], out = [q; k; v]), cut section by section along its output
dimension; ``GPT2Attention`` splits it at ``split_size``, which becomes the local
width, and the MLP (``c_fc``, ``c_proj``) is built from ``n_inner / tensor``. Phi3's
fused ``qkv_proj`` ([q; k; v]) and ``gate_up_proj`` ([gate; up]) are cut section by
section (:class:`~pp_ext.tp.split.Split`).

Mixture-of-experts families are cut as Megatron-Core cuts them with expert tensor
parallel size 1: attention as above, a dense layer's MLP (Qwen2/3-MoE's
``mlp_only_layers``) and Qwen2-MoE's shared expert as a dense MLP, while the router
(``mlp.gate``), the routed experts and the shared expert's sigmoid gate stay whole on
every tensor rank. After the row-parallel attention all-reduce every rank holds the same
hidden states, so each computes the same routing and the same experts' output; the
gradient reaching them is whole on every rank too (the column-parallel ``f`` sums the
shared expert's share of the input gradient), so their gradients are equal across the
axis and, like the norms', summed by no one.

OLMoE normalises q and k over all heads (``OlmoeAttention.q_norm`` over ``hidden_size``):
each rank holds its heads' features and its rows of the norm's weight, and the sum of
squares, a [tokens, 1] statistic, is summed over the axis forward and backward
(:func:`~pp_ext.tp.layers.rms_norm_over_axis`). gpt-oss's attention sinks, one logit per
head, are cut with their heads (:func:`~pp_ext.tp.layers.shard_rows`); its q/k/v biases
are cut with their rows and o_proj's is added once, after the reduction. DeepSeek-V3's
multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2", Sec. 2.1) keeps the
down-projections ``q_a_proj`` and ``kv_a_proj_with_mqa`` and their norms whole (every head
reads the latents), cuts the up-projections ``q_b_proj`` and ``kv_b_proj`` by heads (their
rows are head-major, [q_nope_h, q_rope_h] and [k_nope_h, v_h] per head, so a contiguous
block of rows is a block of heads) and ``o_proj`` by input; the shared rotary key ``k_pe``
stays whole and its gradient is summed over the axis
(:func:`~pp_ext.tp.layers.shared_rope_key`). Its dense first layers' MLP and its shared
experts are Megatron MLPs; the shared experts are rebuilt at local width, since their
width ``n_shared_experts x moe_intermediate_size`` shares its key with the routed experts,
which stay whole with the router (``e_score_correction_bias`` included).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from pp_ext.tp.axis import TensorAxis
from pp_ext.tp.layers import (
    column_parallel,
    rms_norm_over_axis,
    row_parallel,
    shard_rows,
    shared_rope_key,
    sum_gradients,
)
from pp_ext.tp.vocab import padded_vocab_size

Sections = Callable[[PretrainedConfig], tuple[int, ...]]


def head_dim(config: PretrainedConfig) -> int:
    """The per-head width HF's attention uses (``head_dim`` when the config sets it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qkv(config: PretrainedConfig) -> tuple[int, ...]:
    kv = config.num_key_value_heads * head_dim(config)
    return config.num_attention_heads * head_dim(config), kv, kv


def _gate_up(config: PretrainedConfig) -> tuple[int, ...]:
    return config.intermediate_size, config.intermediate_size


def _gpt2_qkv(config: PretrainedConfig) -> tuple[int, ...]:
    return (config.hidden_size,) * 3


SHARED_EXPERTS_WIDTH = "n_shared_experts x moe_intermediate_size"


def mlp_features(config: PretrainedConfig, key: str = "intermediate_size") -> int:
    """The MLP width ``key`` of ``config`` (GPT-2's ``n_inner``: default 4 x hidden)."""
    if key == "n_inner":
        return config.n_inner or 4 * config.hidden_size
    if key == SHARED_EXPERTS_WIDTH:  # DeepSeek-V3's shared experts, one MLP of their width
        return config.n_shared_experts * config.moe_intermediate_size
    return getattr(config, key)


@dataclass(frozen=True)
class Plan:
    """``columns``: submodule name -> its fused sections (None: one); ``rows``: row-parallel
    submodules; ``per_head``: replicated submodules applied to each local head, whose
    gradients are summed over the axis, where the layer has them; ``rebuilt``: linears
    of ``columns`` or ``rows`` rebuilt at local width first (GPT-NeoX, GPT-2);
    ``local_widths``: attributes (submodule -> names) divided by the tensor size after
    the rebuild (GPT-2's ``split_size`` and head count); ``features``: the config's MLP
    widths divided by the tensor size (an MoE family's experts keep theirs);
    ``optional``: submodules of ``columns``, ``rows`` and ``rebuilt`` only some layers have
    (an MoE family's dense MLP or shared expert); ``rebuilt_features``: MLP widths checked
    and divided as ``features`` are, by rebuilding their linears (DeepSeek-V3's shared
    experts); ``head_rows``: parameters holding one row per head, cut with the heads
    (gpt-oss's sinks); ``axis_norms``: norm -> the column-parallel linear whose whole output
    it normalises (OLMoE's q/k norms); ``shared_rope``: latent attentions whose shared
    rotary key's gradient is summed (DeepSeek-V3's)."""

    columns: dict[str, Sections | None]
    rows: tuple[str, ...]
    per_head: tuple[str, ...] = ()
    kv_heads: bool = True  # the family has grouped key/value heads to divide
    rebuilt: tuple[str, ...] = ()
    local_widths: dict[str, tuple[str, ...]] = field(default_factory=dict)
    features: tuple[str, ...] = ("intermediate_size",)
    optional: tuple[str, ...] = ()
    moe: bool = False  # routers and experts, kept whole
    rebuilt_features: tuple[str, ...] = ()
    head_rows: tuple[str, ...] = ()
    axis_norms: dict[str, str] = field(default_factory=dict)
    shared_rope: tuple[str, ...] = ()


LLAMA = Plan(
    columns=dict.fromkeys(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    ),
    rows=("self_attn.o_proj", "mlp.down_proj"),
    per_head=("self_attn.q_norm", "self_attn.k_norm"),
)
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_EXPERT = tuple(f"mlp.shared_expert.{name}" for name in ("gate_proj", "up_proj", "down_proj"))
SHARED_EXPERTS = tuple(f"mlp.shared_experts.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
# DeepSeek's latent attention: the up-projections by heads (q_proj without a query rank)
MLA = ("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_b_proj")


def _moe(
    mlps: tuple[str, ...],
    features: tuple[str, ...],
    per_head: tuple[str, ...] = (),
    attention: tuple[str, ...] = ATTENTION,
    optional: tuple[str, ...] = (),
    **rest,
) -> Plan:
    """An MoE family's plan: ``attention``'s column-parallel linears (Llama's q, k, v) and
    o_proj, the dense ``mlps`` (gate, up, down) where a layer has them (and the
    ``optional`` attention linears); router and experts whole; ``rest``: more of
    :class:`Plan`'s fields."""
    return Plan(
        columns=dict.fromkeys(attention + tuple(m for m in mlps if not m.endswith("down_proj"))),
        rows=("self_attn.o_proj", *(m for m in mlps if m.endswith("down_proj"))),
        per_head=per_head,
        features=features,
        optional=mlps + optional,
        moe=True,
        **rest,
    )


PHI3 = Plan(
    columns={"self_attn.qkv_proj": _qkv, "mlp.gate_up_proj": _gate_up},
    rows=("self_attn.o_proj", "mlp.down_proj"),
)
GPT_NEOX = Plan(
    columns=dict.fromkeys(("attention.query_key_value", "mlp.dense_h_to_4h")),
    rows=("attention.dense", "mlp.dense_4h_to_h"),
    kv_heads=False,
    rebuilt=("attention.query_key_value", "attention.dense"),
)
GPT2 = Plan(
    columns={"attn.c_attn": _gpt2_qkv, "mlp.c_fc": None},
    rows=("attn.c_proj", "mlp.c_proj"),
    kv_heads=False,
    rebuilt=("attn.c_attn", "attn.c_proj"),
    local_widths={"attn": ("split_size", "num_heads")},
    features=("n_inner",),
)
PLANS = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), LLAMA
    ),
    "phi3": PHI3,
    "gpt_neox": GPT_NEOX,
    "gpt2": GPT2,
    "mixtral": _moe((), (), ()),
    "qwen2_moe": _moe(
        DENSE_MLP + SHARED_EXPERT, ("intermediate_size", "shared_expert_intermediate_size"), ()
    ),
    "qwen3_moe": _moe(DENSE_MLP, ("intermediate_size",), LLAMA.per_head),
    "olmoe": _moe(
        (),
        (),
        axis_norms={"self_attn.q_norm": "self_attn.q_proj", "self_attn.k_norm": "self_attn.k_proj"},
    ),
    "gpt_oss": _moe((), (), head_rows=("self_attn.sinks",)),
    "deepseek_v3": _moe(
        DENSE_MLP + SHARED_EXPERTS,
        ("intermediate_size",),
        attention=MLA,
        optional=MLA[:2],  # q_proj without q_lora_rank, else q_b_proj
        rebuilt=SHARED_EXPERTS,
        rebuilt_features=(SHARED_EXPERTS_WIDTH,),
        shared_rope=("self_attn",),
    ),
}


def supported() -> list[str]:
    return sorted(PLANS)


def check_tensor_split(config: PretrainedConfig, tensor: int) -> None:
    """Raise ValueError (one line, with the fix) unless ``config`` can be cut ``tensor``
    ways (a vocabulary that does not divide is padded, :mod:`pp_ext.tp.vocab`)."""
    if tensor == 1:
        return
    model_type = getattr(config, "model_type", None)
    if model_type not in PLANS:
        raise ValueError(
            f"tensor parallelism has no sharding plan for {model_type!r} models (it has for "
            f"{', '.join(supported())}): set parallel.tensor=1"
        )
    plan = PLANS[model_type]
    counts = {"num_attention_heads": config.num_attention_heads} | {
        key: mlp_features(config, key) for key in plan.features + plan.rebuilt_features
    }
    if plan.kv_heads:
        counts["num_key_value_heads"] = config.num_key_value_heads
    for name, count in counts.items():
        if count % tensor:
            raise ValueError(
                f"{model_type} config has {name}={count}, which does not divide by tensor={tensor}: "
                f"choose a tensor size that divides it"
            )


def local_config(config: PretrainedConfig, tensor: int) -> PretrainedConfig:
    """``config`` with the counts one tensor rank holds; the same object when ``tensor`` is 1."""
    if tensor == 1:
        return config
    check_tensor_split(config, tensor)
    plan, local = PLANS[config.model_type], copy.deepcopy(config)
    for key in plan.features:
        setattr(local, key, mlp_features(config, key) // tensor)
    if plan.kv_heads:
        local.head_dim = head_dim(config)
        local.num_attention_heads = config.num_attention_heads // tensor
        local.num_key_value_heads = config.num_key_value_heads // tensor
    return local


def shard_layer(layer: nn.Module, config: PretrainedConfig, axis: TensorAxis) -> nn.Module:
    """Make ``layer`` (HF's decoder layer built from ``local_config(config, axis.size)``)
    tensor-parallel on ``axis`` by its family's plan."""
    if axis.size == 1:
        return layer
    plan = PLANS[config.model_type]
    for name in plan.rebuilt:
        if name in plan.optional and not _has(layer, name):
            continue
        parent, _, child = name.rpartition(".")
        setattr(
            layer.get_submodule(parent),
            child,
            _local_width(layer.get_submodule(name), name in plan.columns, axis.size),
        )
    for name, attributes in plan.local_widths.items():
        module = layer.get_submodule(name)
        for attribute in attributes:
            setattr(module, attribute, getattr(module, attribute) // axis.size)
    present = [n for n in (*plan.columns, *plan.rows) if n not in plan.optional or _has(layer, n)]
    for name, sections in plan.columns.items():
        if name in present:
            column_parallel(layer.get_submodule(name), axis, sections(config) if sections else None)
    for name in plan.rows:
        if name in present:
            row_parallel(layer.get_submodule(name), axis)
    for name in plan.per_head:
        parent, _, child = name.rpartition(".")
        if hasattr(
            layer.get_submodule(parent), child
        ):  # Qwen3 and Gemma3 have q/k norms, Llama not
            sum_gradients(layer.get_submodule(name), axis)
    for name in plan.head_rows:
        shard_rows(layer.get_parameter(name), axis)
    for name, linear in plan.axis_norms.items():
        width = layer.get_submodule(linear).get_parameter("weight").shape[0]
        rms_norm_over_axis(layer.get_submodule(name), width, axis)
    for name in plan.shared_rope:
        shared_rope_key(layer.get_submodule(name), axis)
    return layer


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


def _local_width(whole: nn.Module, column: bool, tensor: int) -> nn.Module:
    """A linear of ``whole``'s class (``nn.Linear`` or ``Conv1D``) with its output
    (``column``) or input features divided by ``tensor``, on ``whole``'s device and dtype."""
    weight = whole.get_parameter("weight")
    if isinstance(whole, Conv1D):
        nf, nx = (whole.nf // tensor, whole.nx) if column else (whole.nf, whole.nx // tensor)
        with torch.device(weight.device):
            return Conv1D(nf, nx).to(weight.dtype)
    if not isinstance(whole, nn.Linear):
        raise TypeError(f"{type(whole).__name__} is neither nn.Linear nor Conv1D")
    out_features, in_features = (
        (whole.out_features // tensor, whole.in_features)
        if column
        else (whole.out_features, whole.in_features // tensor)
    )
    return nn.Linear(
        in_features,
        out_features,
        bias=whole.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )


def describe(config: PretrainedConfig, tensor: int, make_vocab_size_divisible_by: int = 1) -> str:
    """One line: what each tensor rank holds (for ``pp-ext plan``)."""
    axis = TensorAxis(tensor, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    plan = PLANS[config.model_type]
    parts = [f"{config.num_attention_heads // tensor} of {config.num_attention_heads} heads"]
    if plan.kv_heads:
        parts.append(
            f"{config.num_key_value_heads // tensor} of {config.num_key_value_heads} key/value heads"
        )
    names = dict.fromkeys(
        ("shared_expert_intermediate_size", SHARED_EXPERTS_WIDTH), "shared-expert features"
    )
    parts += [
        f"{mlp_features(config, key) // tensor} of {mlp_features(config, key)} "
        f"{names.get(key, 'MLP features')}"
        for key in plan.features + plan.rebuilt_features
    ]
    if plan.moe:
        parts.append("every router and expert whole")
    parts += [
        f"{padded_vocab_size(config.vocab_size, axis) // tensor} of {config.vocab_size} "
        f"vocabulary rows",
    ]
    if (padded := padded_vocab_size(config.vocab_size, axis)) != config.vocab_size:
        parts[-1] += f" (padded to {padded})"
    return "each tensor rank holds " + ", ".join(parts)
