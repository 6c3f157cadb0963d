"""LoRA through the pipeline: the recipe's ``peft`` section as PEFT's own ``LoraConfig``,
PEFT's target-module rules on the full HF model, and the checks of an adapter folder."""

from pp_ext.peft.adapters import (
    Targets,
    add_adapters,
    apply_lora,
    load_adapter,
    peft_keys,
    planned_parameters,
)
from pp_ext.peft.config import (
    PeftError,
    check_adapter,
    check_experts,
    check_modules_to_save,
    embedding_targets,
    lora_config,
    saved_names,
    target_names,
)
from pp_ext.peft.experts import expert_parts

__all__ = [
    "Targets",
    "PeftError",
    "add_adapters",
    "apply_lora",
    "check_adapter",
    "check_experts",
    "check_modules_to_save",
    "embedding_targets",
    "expert_parts",
    "load_adapter",
    "lora_config",
    "peft_keys",
    "planned_parameters",
    "saved_names",
    "target_names",
]
