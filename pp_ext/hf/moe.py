"""Mixture-of-experts HF causal LMs (Mixtral, Qwen2-MoE with its gated shared expert,
Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V3) as pipeline layers.

The decoder layers are transformers' own, built and called as the Llama-like families'
(:mod:`pp_ext.hf.llama`): attention, norms, the top-k router and the fused experts
(``experts.gate_up_proj`` / ``experts.down_proj``), Qwen2-MoE's sigmoid-gated shared
expert, Qwen2/3-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step``),
gpt-oss's attention sinks, router (``mlp.router``) and expert biases and clamped SwiGLU
come with them. So do DeepSeek-V3's (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report"):
multi-head latent attention (``q_lora_rank``, ``kv_lora_rank``, the rotary and
non-rotary head parts, interleaved rope with YaRN's softmax scale), the dense first
``first_k_dense_replace`` layers, the shared experts and the sigmoid router
(``DeepseekV3TopkRouter``: ``e_score_correction_bias`` added for the choice only,
group-limited top-k over ``n_group`` / ``topk_group``, weights renormalised with
``norm_topk_prob`` and scaled by ``routed_scaling_factor``). Checkpoints store one
tensor per expert; transformers' conversion mapping merges them on load and splits
them on save (:mod:`pp_ext.hf.weights`); gpt-oss's store them fused, on the hub in MXFP4,
which its converter dequantizes.

``DeepseekV3ForCausalLM`` computes the LM loss only: it adds no router loss whatever
``output_router_logits`` says (the config has no ``router_aux_loss_coef``), and nothing
in transformers updates ``e_score_correction_bias`` in training (a buffer, loaded and
saved, its gradient none). pp-ext computes the same by default; with
``moe.bias_update_speed`` the training job runs the paper's auxiliary-loss-free bias
update (Sec. 2.1.2) after each step (:mod:`pp_ext.moe.bias_update`).

With ``config.output_router_logits`` HF's model adds ``router_aux_loss_coef`` times the
load-balancing loss to the LM loss (:mod:`pp_ext.moe.router_loss`, pooled over all MoE
layers). The stream then carries the router statistics after the int tensors:
``(hidden, position_ids, attention_mask, counts, probabilities[, context])``. The
embedding starts them at zero, each MoE layer adds its router's (read from the router's
output, as HF's ``OutputRecorder`` reads it), and the final norm finishes the loss,
which the LM head passes on after the logits: ``(logits, aux_loss)``. Without it the
layers are the Llama-like ones and nothing more crosses a stage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from pp_ext.hf import llama
from pp_ext.hf.common import FinalNorm, Stream
from pp_ext.moe import experts, router_loss


def every_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """Mixtral, OLMoE: every layer's MLP is sparse."""
    return True


def after_dense(config: PretrainedConfig, layer_idx: int) -> bool:
    """DeepSeek-V3: the first ``first_k_dense_replace`` layers are dense
    (``DeepseekV3DecoderLayer.__init__``)."""
    return layer_idx >= config.first_k_dense_replace


def sparse_step(config: PretrainedConfig, layer_idx: int) -> bool:
    """Qwen2-MoE, Qwen3-MoE: a layer is sparse unless listed in ``mlp_only_layers``, every
    ``decoder_sparse_step``-th (``Qwen2MoeDecoderLayer.__init__``)."""
    return (
        layer_idx not in config.mlp_only_layers
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


@dataclass(frozen=True)
class MoEFamily:
    """An MoE family: its Llama-like classes, the config key of its expert count, which
    of its layers are sparse, its router's class suffix, whether HF's model adds the
    load-balancing loss with ``output_router_logits`` (DeepSeek-V3's does not), and whether
    its routers choose with ``e_score_correction_bias`` (DeepSeek-V3's,
    :mod:`pp_ext.moe.bias_update`)."""

    family: llama.Family
    experts_key: str
    sparse: Callable[[PretrainedConfig, int], bool]
    router: str = "TopKRouter"
    aux_loss: bool = True
    expert_bias: bool = False

    def num_experts(self, config: PretrainedConfig) -> int:
        return getattr(config, self.experts_key)

    def moe_layers(self, config: PretrainedConfig) -> int:
        return sum(self.sparse(config, i) for i in range(config.num_hidden_layers))


FAMILIES = {
    f.family.model_type: f
    for f in (
        MoEFamily(
            llama.Family("mixtral", "Mixtral", llama.sliding_window_set),
            "num_local_experts",
            every_layer,
        ),
        MoEFamily(
            llama.Family("qwen2_moe", "Qwen2Moe", llama.layer_type_sliding),
            "num_experts",
            sparse_step,
        ),
        MoEFamily(
            llama.Family("qwen3_moe", "Qwen3Moe", llama.sliding_window_set),
            "num_experts",
            sparse_step,
        ),
        MoEFamily(llama.Family("olmoe", "Olmoe", llama.never), "num_experts", every_layer),
        MoEFamily(
            llama.Family("gpt_oss", "GptOss", llama.layer_type_sliding, packed_documents=False),
            "num_local_experts",
            every_layer,
        ),
        MoEFamily(
            llama.Family("deepseek_v3", "DeepseekV3", llama.never),
            "n_routed_experts",
            after_dense,
            router="TopkRouter",
            aux_loss=False,
            expert_bias=True,
        ),
    )
}


# the config keys transformers' MoE families (supported or not) count their routed experts by
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def routed_experts(config: dict) -> int:
    """How many routed experts a ``config.json`` (as a dict) declares; 0 for a dense model."""
    return max((config.get(key) or 0 for key in EXPERT_KEYS), default=0)


def supported() -> list[str]:
    return sorted(FAMILIES)


def router_loss_coef(config: PretrainedConfig) -> float | None:
    """The weight HF's model gives the load-balancing loss in its training loss
    (``router_aux_loss_coef``), None where it adds none (a dense model, or
    ``output_router_logits`` off, HF's default; DeepSeek-V3, whose model never adds one)."""
    family = FAMILIES.get(config.model_type)
    if family is None or not family.aux_loss or not config.output_router_logits:
        return None
    return config.router_aux_loss_coef


class RouterEmbedding(llama.Embedding):
    """The token embedding, then empty router statistics for the MoE layers to fill."""

    def __init__(self, config: PretrainedConfig, family: llama.Family) -> None:
        super().__init__(config, family)
        self.num_experts = FAMILIES[family.model_type].num_experts(config)

    def forward(self, inputs) -> Stream:
        hidden, position_ids, attention_mask = super().forward(inputs)
        counts, probs = router_loss.empty_statistics(self.num_experts, hidden.device)
        return hidden, position_ids, attention_mask, counts, probs


class MoEDecoderLayer(llama.DecoderLayer):
    """The family's decoder layer, its experts' weight GEMMs deferrable to the W pass
    (:func:`pp_ext.moe.experts.deferrable`); ``router`` names its top-k router within
    ``layer``, None in a dense layer."""

    def __init__(self, config: PretrainedConfig, family: llama.Family, layer_idx: int) -> None:
        super().__init__(config, family, layer_idx)
        moe = FAMILIES[family.model_type]
        routers = [
            name
            for name, module in self.layer.named_modules()
            if isinstance(module, family.hf_class(moe.router))
        ]
        if len(routers) != moe.sparse(config, layer_idx):
            raise ValueError(
                f"{family.model_type} layer {layer_idx} has {len(routers)} routers, which "
                f"pp-ext's rule for its sparse layers does not expect: transformers changed"
            )
        self.router = routers[0] if routers else None
        self.experts = [
            module
            for module in self.layer.modules()
            if isinstance(module, family.hf_class("Experts"))
        ]
        for module in self.experts:
            experts.deferrable(module)

    def expert_parameters(self) -> tuple[int, int]:
        """``(routed, shared)``: the parameters of the layer's routed experts and of the
        rest of its sparse MoE block less the router (Qwen2-MoE's shared expert and its
        gate, which every token runs); ``(0, 0)`` in a dense layer."""
        if self.router is None:
            return 0, 0
        block = self.layer.get_submodule(self.router.rpartition(".")[0])
        routed = sum(p.numel() for module in self.experts for p in module.parameters())
        router = sum(p.numel() for p in self.layer.get_submodule(self.router).parameters())
        return routed, sum(p.numel() for p in block.parameters()) - routed - router


class RouterDecoderLayer(MoEDecoderLayer):
    """The family's decoder layer; a sparse one adds its router's statistics to the
    stream's (:func:`pp_ext.moe.router_loss.add_layer`), a dense one passes them on."""

    def __init__(self, config: PretrainedConfig, family: llama.Family, layer_idx: int) -> None:
        super().__init__(config, family, layer_idx)
        self.top_k = config.num_experts_per_tok
        self._router_logits: torch.Tensor | None = None
        if self.router is not None:
            self.layer.get_submodule(self.router).register_forward_hook(self._keep_router_logits)

    def _keep_router_logits(self, module: nn.Module, args, output) -> None:
        self._router_logits = output[0]  # HF's OutputRecorder(..., index=0)

    def forward(self, inputs: Stream) -> Stream:
        hidden, position_ids, attention_mask, counts, probs, *shared = inputs
        hidden, position_ids, attention_mask, context = super().forward(
            (hidden, position_ids, attention_mask, *shared)
        )
        if self._router_logits is not None:
            counts, probs = router_loss.add_layer(
                counts, probs, self._router_logits, attention_mask, self.top_k
            )
            self._router_logits = None
        return hidden, position_ids, attention_mask, counts, probs, context


class RouterLossNorm(FinalNorm):
    """The final norm; also finishes the load-balancing loss of the model's ``moe_layers``
    MoE layers from the statistics the stream carries: ``(hidden, aux_loss)``."""

    def __init__(self, moe_layers: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.moe_layers = moe_layers

    # the stream to the head carries the aux loss beside the hidden states
    def forward(self, inputs: Stream) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        hidden, _, attention_mask, counts, probs = inputs[:5]
        return self.norm(hidden), router_loss.pooled_loss(
            counts, probs, attention_mask, self.moe_layers
        )


def expert_parameters(specs: list) -> list[tuple[int, int]]:
    """``(routed, shared)`` expert parameters of each pipeline layer of ``specs``
    (:meth:`MoEDecoderLayer.expert_parameters`), built on the meta device."""
    counts = []
    for spec in specs:
        moe = isinstance(spec.typename, type) and issubclass(spec.typename, MoEDecoderLayer)
        with torch.device("meta"):
            counts.append(spec.build().expert_parameters() if moe else (0, 0))
    return counts


def layer_specs(config: PretrainedConfig, attn_implementation: str | None = None) -> list:
    """The Llama-like specs of the family; with ``output_router_logits`` the router
    statistics ride along and the head returns ``(logits, aux_loss)``."""
    moe = FAMILIES[config.model_type]
    # HF's default experts (PreTrainedModel.get_correct_experts_implementation): left None,
    # as on a bare config, transformers' experts warn and loop over experts instead
    config = copy.deepcopy(config)
    config._experts_implementation = "grouped_mm"
    if router_loss_coef(config) is None:
        return llama.family_specs(config, moe.family, attn_implementation, decoder=MoEDecoderLayer)
    return llama.family_specs(
        config,
        moe.family,
        attn_implementation,
        embedding=RouterEmbedding,
        decoder=RouterDecoderLayer,
        norm=RouterLossNorm,
        norm_args=(moe.moe_layers(config),),
    )
