"""What one rank holds, estimated before anything runs: one model for ``pp-ext plan``
and ``pp-ext tune``.

State (per trainable parameter a rank holds): weights and gradients in the model's
dtype; torch's AdamW keeps two moments in the parameter's dtype (SGD, without momentum,
none); with DeepSpeed's bf16 optimizer the step works on fp32 masters instead (a master
copy and two fp32 moments), split over the data ranks by ZeRO stage >= 1 (Rajbhandari
et al. 2020, "ZeRO", Sec. 5.1: 2 + 2 + 12/N_d bytes per parameter at stage 1), and it
accumulates the gradients in a buffer of ``data_types.grad_accum_dtype`` (DeepSpeed's
``BF16_Optimizer``: whole on every data rank, 4 more bytes in fp32). A frozen parameter
(LoRA's base weights, Hu et al. 2021) is its weight in the model's dtype and nothing
else: no gradient, no master copy, no optimizer state.

Activations of one micro-batch of ``b`` samples of ``s`` tokens through one decoder
layer of hidden size ``h`` (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Sec. 4.1, eq. 1-2): ``s b h (34 + 5 a s /
h)`` bytes at 2 bytes a value, ``s b h (10 + 24 / t)`` over ``t`` tensor ranks, without
the ``5 a s^2 b`` attention scores where the attention is fused (sdpa, flash); with
activation checkpointing a layer keeps only its input (``2 s b h``); the logits (fp32,
``4 s b V / t``) sit on the last stage.

Experts (mixture-of-experts layers, Lepikhin et al. 2021, "GShard"; Rajbhandari et al.
2022, "DeepSpeed-MoE", Sec. 5): with expert parallelism over ``E`` ranks taken out of a
stage's ``N_d`` data ranks, a rank holds ``num_experts / E`` routed experts of each MoE
layer, whole, and each expert is replicated on the ``N_d / E`` expert-data ranks, which
alone reduce its gradients and split its optimizer state (DeepSpeed-MoE's expert-data
group; Megatron-Core's ``expert_data_parallel``): per routed parameter of the layer the
rank holds ``1/E`` of the state of :func:`state_bytes` at ``N_d / E`` data ranks. Shared
experts (Qwen2-MoE's) run on every token and are dense parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

WIDTHS = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(dtype: str) -> int:
    return WIDTHS[dtype]


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter a rank holds: its weight, gradient and optimizer state."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def state_bytes(
    dtype: str, optimizer: str, bf16: bool, zero_stage: int, data: int, grad_accum: str
) -> StateBytes:
    """Per trainable parameter, for ``model.dtype``, ``train.optimizer`` ('adamw' |
    'sgd'), DeepSpeed's bf16 optimizer on or off, its ZeRO stage, the data ranks and the
    dtype its gradients accumulate in."""
    width = dtype_bytes(dtype)
    moments = 2 if optimizer == "adamw" else 0
    if bf16:
        shards = data if zero_stage >= 1 else 1
        return StateBytes(width, width + dtype_bytes(grad_accum), 4 * (1 + moments) / shards)
    return StateBytes(width, width, width * moments)


@dataclass(frozen=True)
class RankState:
    """Bytes one rank holds for its parameters: the frozen ones (``base``, weights only)
    and the trainable ones' weights, gradients and optimizer state."""

    base: float
    trainable: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.base + self.trainable + self.gradients + self.optimizer


def rank_state(frozen: int, trainable: int, per_param: StateBytes) -> RankState:
    """What a rank holding ``frozen`` and ``trainable`` parameters keeps for them, at
    ``per_param`` bytes a trainable parameter (:func:`state_bytes`) and a frozen one's
    weight alone."""
    return RankState(
        frozen * per_param.weights,
        trainable * per_param.weights,
        trainable * per_param.gradients,
        trainable * per_param.optimizer,
    )


def layer_activation_bytes(
    *,
    seq_len: int,
    micro_batch_size: int,
    hidden_size: int,
    heads: int,
    vocab_size: int,
    dtype: str,
    checkpointing: bool,
    eager_attention: bool,
    tensor: int = 1,
) -> tuple[float, float]:
    """``(per decoder layer, logits)`` bytes of one micro-batch on one of ``tensor``
    tensor ranks (see the module doc)."""
    s, b, h, a = seq_len, micro_batch_size, hidden_size, heads
    width = dtype_bytes(dtype)
    if checkpointing:
        per_layer = 2 * s * b * h * width / 2
    else:
        per_layer = s * b * h * (10 + 24 / tensor) * width / 2  # 34 with one tensor rank
        if eager_attention:  # the softmax's scores and dropout mask, materialised
            per_layer += 5 * a * s * s * b / tensor
    return per_layer, 4.0 * s * b * vocab_size / tensor


@dataclass(frozen=True)
class ExpertShare:
    """How a rank holds a model's routed experts under expert parallelism over ``expert``
    ranks: ``experts`` of each MoE layer's, replicated on ``expert_data`` ranks."""

    expert: int
    experts: int
    expert_data: int


def expert_share(num_experts: int, expert: int, data: int) -> ExpertShare:
    """The share of one of ``expert`` expert ranks out of ``data`` data ranks (see the
    module doc); a ValueError where ``expert`` divides either not."""
    if expert < 1 or num_experts % expert or data % expert:
        raise ValueError(
            f"expert parallelism over {expert} ranks must divide the {num_experts} experts "
            f"and the {data} data ranks"
        )
    return ExpertShare(expert, num_experts // expert, data // expert)


def expert_state(
    frozen: int, trainable: int, share: ExpertShare, per_param: StateBytes
) -> RankState:
    """What a rank keeps for its routed experts, of the ``frozen`` and ``trainable``
    routed parameters its stage has: ``1/E`` of them, at ``per_param`` bytes a trainable
    one (:func:`state_bytes` at ``share.expert_data`` data ranks)."""
    return rank_state(frozen // share.expert, trainable // share.expert, per_param)
