"""The DeepSpeed boundary: the ``PipelineEngine`` methods pp-ext's engines override.

:class:`~pp_ext.engine.engine.ScheduleEngine` replaces DeepSpeed's schedule through
``_train_schedule`` and ``_inference_schedule`` and names the loss rank through
``_loss_stage_global_rank``; these hooks first shipped in DeepSpeed 0.19.8 (0.19.7 and
earlier have none of them, checked on the released sources). Where they are missing,
``train_batch`` would silently run DeepSpeed's own 1F1B instead, so the engine refuses
to load (:func:`require_hooks`), in one line naming the fix, as a version outside
setup.cfg's range is (:mod:`pp_ext.tools.versions`).
"""

from __future__ import annotations

import warnings

from pp_ext.tools.versions import UnsupportedVersion

HOOKS = ("_train_schedule", "_inference_schedule", "_loss_stage_global_rank")
FIRST_RELEASE = "0.19.8"


class DeepSpeedTooOld(UnsupportedVersion):
    """The installed DeepSpeed lacks the pipeline hooks pp-ext overrides."""


def missing_hooks(engine_class: type) -> list[str]:
    return [name for name in HOOKS if not callable(getattr(engine_class, name, None))]


def require_hooks(engine_class: type, version: str) -> None:
    if missing := missing_hooks(engine_class):
        raise DeepSpeedTooOld(
            f"DeepSpeed {version} has no PipelineEngine.{', '.join(missing)}, which pp-ext's "
            f"engine overrides (its schedule would not run): install deepspeed>={FIRST_RELEASE}"
        )


def ignore_deepspeed_deprecations() -> None:
    """DeepSpeed 0.19.8's ZeRO and bf16 optimizers call ``torch.distributed`` by names torch
    2.13 deprecates (a FutureWarning per call site, DeepSpeed's to fix): not shown to users."""
    warnings.filterwarnings(
        "ignore",
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        FutureWarning,
    )
