"""LoRA through the pipeline: the recipe's ``peft`` section as PEFT's own ``LoraConfig``,
PEFT's target-module rules on the full HF model, and the checks of an adapter folder."""

from pp_ext.peft.config import PeftError, check_adapter, lora_config, target_names

__all__ = ["PeftError", "check_adapter", "lora_config", "target_names"]
