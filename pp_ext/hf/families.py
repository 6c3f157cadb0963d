"""Which HF architectures pp-ext can split, keyed by ``config.model_type``.

One registry so that an unsupported model fails once, up front, with the list of
what is supported, instead of deep inside a family's module.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PretrainedConfig

from pp_ext.hf import gpt, llama, moe

BUILDERS: dict[str, Callable[[PretrainedConfig, str | None], list]] = {
    **{model_type: llama.layer_specs for model_type in llama.FAMILIES},
    **{model_type: gpt.layer_specs for model_type in gpt.ARCHITECTURES},
    **{model_type: moe.layer_specs for model_type in moe.FAMILIES},
}


def supported() -> list[str]:
    return sorted(BUILDERS)


def layer_specs(config: PretrainedConfig, attn_implementation: str | None = None) -> list:
    """The model's pipeline layers (DeepSpeed LayerSpec / TiedLayerSpec), in order.

    ``attn_implementation`` None takes HF's default for the family (sdpa, or eager where
    HF has no sdpa for it, as Gemma2)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BUILDERS:
        raise ValueError(
            f"pp-ext cannot split HF model_type {model_type!r} "
            f"({type(config).__name__}) into pipeline stages: supported model types are "
            f"{', '.join(supported())}"
        )
    return BUILDERS[model_type](config, attn_implementation)


def position_table(config: PretrainedConfig) -> int | None:
    """Positions the model's learned absolute position table holds (GPT-2's ``wpe``,
    ``max_position_embeddings`` rows): a position id past it indexes past the table.
    None for rotary positions, which take any position."""
    return config.max_position_embeddings if config.model_type in gpt.LEARNED_POSITIONS else None
