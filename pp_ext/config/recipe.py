"""Loading and checking a recipe: YAML file + ``key=value`` overrides -> typed config.

OmegaConf does the merging and the type checks against :mod:`pp_ext.config.schema`;
this module turns its exceptions into one line that names the recipe key and the
nearest valid one, and adds the checks a type cannot express (choices, ranges, the
world size). Every user error is a :class:`RecipeError`.

No torch here: ``pp-ext plan`` and the launcher's error paths stay fast.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from pp_ext.config.schema import Recipe
from pp_ext.planning import memory
from pp_ext.schedules import names as schedule_names
from pp_ext.schedules.registry import BASELINE

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEEPSPEED_BASES = CONFIGS / "deepspeed"

DTYPES = ("float32", "bfloat16", "float16")
# DeepSpeed's names of data_types.grad_accum_dtype -> the model's dtype names
GRAD_ACCUM_DTYPES = {
    **{name: "float32" for name in ("fp32", "float32")},
    **{name: "bfloat16" for name in ("bf16", "bfloat16")},
    **{name: "float16" for name in ("fp16", "float16")},
}
# pp_ext.hf.common.ATTN_IMPLEMENTATIONS, repeated here to keep this module free of torch
# (tests/test_recipe.py checks that the two agree)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
OPTIMIZERS = ("adamw", "sgd")
DATA_FORMATS = ("auto", "json", "csv", "parquet", "text", "hub")
DATA_KINDS = ("auto", "text", "prompt_completion", "chat")
# DeepSpeed keys that pp-ext derives from the recipe: setting them in `deepspeed:` would
# make two sources of truth, so each names the recipe key to set instead
DERIVED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "parallel.micro_batches",
    "train_batch_size": "train.micro_batch_size and parallel.micro_batches",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.optimizer / train.lr",
    "scheduler": "train.lr / train.warmup_steps / train.min_lr",
}


class RecipeError(ValueError):
    """A recipe the user must fix; the message is one line naming key and fix."""


def _section_keys(object_type: Any) -> list[str]:
    if dataclasses.is_dataclass(object_type):
        return [f.name for f in dataclasses.fields(object_type)]
    return []


def _nearest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(choices)}"


def _explain(exc: OmegaConfBaseException, source: str) -> RecipeError:
    key = exc.full_key or exc.key
    if isinstance(exc, ConfigKeyError):
        parent = key.rpartition(".")[0]
        where = f"section '{parent}'" if parent else "the recipe's top level"
        hint = _nearest(str(exc.key), _section_keys(exc.object_type))
        return RecipeError(f"{source}: recipe key '{key}' does not exist in {where}{hint}")
    if isinstance(exc, MissingMandatoryValue):
        return RecipeError(
            f"{source}: recipe key '{key}' is required: set it in the recipe or as {key}=..."
        )
    if isinstance(exc, ValidationError):
        first = str(exc.msg).splitlines()[0]
        return RecipeError(f"{source}: recipe key '{key}' has the wrong type: {first}")
    return RecipeError(f"{source}: {str(exc.msg).splitlines()[0]} (key '{key}')")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"recipe key '{key}' is {value!r}: choose one of {', '.join(map(str, choices))}{hint}"
        )


def _positive(key: str, value: Any, minimum: int = 1) -> None:
    if value is None or value < minimum:
        raise RecipeError(f"recipe key '{key}' must be >= {minimum}, got {value!r}")


def _number(key: str, value: Any, minimum: float = 0.0, *, above: bool = False) -> None:
    """A finite number >= ``minimum`` (> with ``above``): a float key's type lets nan
    and inf through, and torch only refuses them once every rank has started."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
        or above
        and value == minimum
    ):
        raise RecipeError(
            f"recipe key '{key}' must be a finite number {'>' if above else '>='} {minimum:g}, "
            f"got {value!r}"
        )


# each layer is built under seed + its index (DeepSpeed's set_random_seed), and numpy.random.seed
# takes seeds below 2**32: 2**31 leaves room for the indices (and datasets' seeds must be >= 0)
MAX_SEED = 2**31
# the largest timeout datetime.timedelta holds (init_process_group takes one)
MAX_TIMEOUT_S = int(datetime.timedelta.max.total_seconds())


def _check_numbers(recipe: DictConfig) -> None:
    """Ranges of the numeric keys (AdamW's as torch.optim.AdamW checks them)."""
    train = recipe.train
    _number("train.lr", train.lr)
    _number("train.min_lr", train.min_lr)
    if train.min_lr > train.lr:
        raise RecipeError(
            f"recipe key 'train.min_lr' is {train.min_lr:g}, above train.lr {train.lr:g}: the "
            f"learning rate decays from lr down to min_lr, so set min_lr <= lr"
        )
    _number("train.weight_decay", train.weight_decay)
    _number("train.eps", train.eps, above=True)
    _number("train.grad_clip", train.grad_clip)  # 0: no clipping
    _number("moe.bias_update_speed", recipe.moe.bias_update_speed)  # 0: off
    betas = list(train.betas)
    if len(betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    ):
        raise RecipeError(
            f"recipe key 'train.betas' must be two numbers in [0, 1) (AdamW's beta1, beta2), "
            f"got {betas!r}"
        )
    if not 0 <= train.seed < MAX_SEED:
        raise RecipeError(f"recipe key 'train.seed' must be in [0, 2**31), got {train.seed}")
    if recipe.parallel.comm_timeout_s > MAX_TIMEOUT_S:
        raise RecipeError(
            f"recipe key 'parallel.comm_timeout_s' must be <= {MAX_TIMEOUT_S} (the longest "
            f"timeout Python's timedelta holds), got {recipe.parallel.comm_timeout_s}"
        )


PEFT_TYPES = ("none", "lora")


def _check_peft(peft: DictConfig) -> None:
    """The ``peft`` section's values as PEFT's ``LoraConfig`` would take them (the
    model-dependent checks, targets and the adapter folder's base, are
    :func:`pp_ext.peft.config.check_targets` and :func:`~pp_ext.peft.config.check_adapter`)."""
    _choice("peft.type", peft.type, PEFT_TYPES)
    if peft.type == "none":
        if peft.merge:
            raise RecipeError(
                "recipe key 'peft.merge' merges LoRA adapters into the export, but peft.type=none "
                "(a full fine-tune exports the whole model already): drop peft.merge or set "
                "peft.type=lora"
            )
        return
    _positive("peft.r", peft.r)
    _number("peft.lora_alpha", peft.lora_alpha, above=True)
    _number("peft.lora_dropout", peft.lora_dropout)
    if peft.lora_dropout >= 1:
        raise RecipeError(
            f"recipe key 'peft.lora_dropout' must be in [0, 1), got {peft.lora_dropout}"
        )
    targets = peft.target_modules
    if not (
        targets is None
        or isinstance(targets, str)
        and targets
        or isinstance(targets, ListConfig)
        and targets
        and all(isinstance(t, str) for t in targets)
    ):
        raise RecipeError(
            f"recipe key 'peft.target_modules' must be a list of module names, a regex string or "
            f"all-linear (as PEFT's LoraConfig reads it), got {targets!r}"
        )
    params = peft.target_parameters
    if not (
        params is None
        or isinstance(params, ListConfig)
        and all(isinstance(t, str) and t for t in params)
    ):
        raise RecipeError(
            f"recipe key 'peft.target_parameters' must be a list of parameter names (as PEFT's "
            f"LoraConfig reads it, e.g. [experts.gate_up_proj, experts.down_proj]), got {params!r}"
        )
    if (
        peft.adapter_path is not None
        and not (Path(peft.adapter_path) / "adapter_config.json").is_file()
    ):
        raise RecipeError(
            f"recipe key 'peft.adapter_path' is {peft.adapter_path}, which holds no "
            f"adapter_config.json: give a PEFT adapter folder (save_pretrained's) or drop the key"
        )


def _check(recipe: DictConfig) -> None:
    """What the schema's types cannot say."""
    _choice("model.dtype", recipe.model.dtype, DTYPES)
    if recipe.model.attn_implementation is not None:
        _choice("model.attn_implementation", recipe.model.attn_implementation, ATTN_IMPLEMENTATIONS)
    _choice("data.format", recipe.data.format, DATA_FORMATS)
    _choice("data.kind", recipe.data.kind, DATA_KINDS)
    _choice("train.optimizer", recipe.train.optimizer, OPTIMIZERS)
    _choice("train.nonfinite", recipe.train.nonfinite, ("stop", "skip"))
    _choice("parallel.schedule", recipe.parallel.schedule, tuple(schedule_names()) + (BASELINE,))
    for key in (
        "parallel.pipeline",
        "parallel.tensor",
        "parallel.expert",
        "parallel.make_vocab_size_divisible_by",
        "parallel.micro_batches",
        "parallel.comm_timeout_s",
        "train.micro_batch_size",
        "data.seq_len",
        "data.num_proc",
        "train.log_interval",
        "train.eval_batches",
    ):
        _positive(key, OmegaConf.select(recipe, key))
    for key in (
        "train.warmup_steps",
        "train.eval_interval",
        "checkpoint.interval",
        "checkpoint.keep",
        "model.activation_checkpoint_interval",
    ):
        _positive(key, OmegaConf.select(recipe, key), minimum=0)
    data = recipe.parallel.data
    if data != "auto" and not (isinstance(data, int) and not isinstance(data, bool) and data >= 1):
        raise RecipeError(
            f"recipe key 'parallel.data' must be 'auto' or an integer >= 1, got {data!r}"
        )
    if recipe.parallel.chunks is not None:
        _positive("parallel.chunks", recipe.parallel.chunks)
    limit = recipe.parallel.memory_limit
    if limit is not None:
        if recipe.parallel.schedule != "auto":
            raise RecipeError(
                f"recipe key 'parallel.memory_limit' is read by parallel.schedule=auto only "
                f"(got schedule {recipe.parallel.schedule}): drop it or use schedule auto"
            )
        values = list(limit) if isinstance(limit, ListConfig) else [limit]
        if not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in values
        ):
            raise RecipeError(
                f"recipe key 'parallel.memory_limit' must be a number >= 1 (micro-batches of "
                f"activations per rank) or a list of them, one per pipeline rank; got {limit!r}"
            )
    if recipe.parallel.profile is not None and not Path(recipe.parallel.profile).is_file():
        raise RecipeError(
            f"recipe key 'parallel.profile' is {recipe.parallel.profile}, which does not exist: "
            f"write it with pp-ext tune --recipe R --out FILE (it names the profile it writes)"
        )
    steps, epochs = recipe.train.steps, recipe.train.epochs
    if (steps is None) == (epochs is None):
        raise RecipeError(
            "set exactly one of recipe keys 'train.steps' and 'train.epochs' "
            f"(got steps={steps!r}, epochs={epochs!r})"
        )
    if steps is not None and steps < 0 or epochs is not None and not 0 < epochs < math.inf:
        raise RecipeError(
            "recipe key 'train.steps' must be >= 0 (0: convert and export) "
            f"and 'train.epochs' a finite number > 0 (got steps={steps!r}, epochs={epochs!r})"
        )
    if recipe.data.path is None and steps != 0:
        raise RecipeError(
            "recipe key 'data.path' is required: set it in the recipe or as data.path=... "
            "(only train.steps=0, a conversion, runs without data)"
        )
    if not 0.0 <= recipe.data.eval_fraction < 1.0:
        raise RecipeError(
            f"recipe key 'data.eval_fraction' must be in [0, 1), got {recipe.data.eval_fraction}"
        )
    if not isinstance(recipe.deepspeed.get("bases", []), (list, ListConfig)):
        raise RecipeError(
            "recipe key 'deepspeed.bases' must be a list of names from configs/deepspeed/"
        )
    if unknown := sorted(set(recipe.deepspeed) - {"bases", "overrides"}):
        raise RecipeError(
            f"recipe key 'deepspeed.{unknown[0]}' does not exist: the deepspeed section has "
            f"'bases' (names from configs/deepspeed/) and 'overrides' (DeepSpeed config keys)"
        )
    for key, instead in DERIVED_DEEPSPEED_KEYS.items():
        if key in (recipe.deepspeed.get("overrides") or {}):
            raise RecipeError(
                f"deepspeed.overrides.{key} is derived by pp-ext: set {instead} instead"
            )
    _check_numbers(recipe)
    _check_peft(recipe.peft)


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe at ``path`` with ``overrides`` (``key=value`` strings) applied, typed
    and checked. Raises :class:`RecipeError` with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file {path} does not exist: pass --recipe recipes/NAME.yaml "
            f"(available: {', '.join(sorted(p.name for p in available()))})"
        )
    try:
        recipe = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path)) from None
    except Exception as exc:  # noqa: BLE001 - YAML syntax errors come in several types
        raise RecipeError(
            f"{path}: not a valid YAML recipe: {' '.join(str(exc).split())}"
        ) from None
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value (e.g. train.steps=100)")
    try:
        recipe = OmegaConf.merge(recipe, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.to_container(recipe, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "command line" if overrides else str(path)) from None
    assert isinstance(recipe, DictConfig)
    _check(recipe)
    # OmegaConf's structured config: a DictConfig that reads (and is typed) as its dataclass
    return cast(Recipe, recipe)


def available() -> list[Path]:
    """The recipes shipped in ``recipes/``."""
    return sorted((CONFIGS.parent / "recipes").glob("*.yaml"))


def deepspeed_bases() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_BASES.glob("*.json"))


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            _deep_merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def resolve_parallel(recipe: Recipe, world_size: int) -> tuple[int, int, int]:
    """``(pipeline, tensor, data)`` for ``world_size`` ranks; ``data: auto`` fills the rest."""
    pipe, tensor, data = recipe.parallel.pipeline, recipe.parallel.tensor, recipe.parallel.data
    model_parallel = pipe * tensor
    if data == "auto":
        if world_size % model_parallel:
            raise RecipeError(
                f"world size {world_size} is not a multiple of parallel.pipeline x parallel.tensor "
                f"= {pipe} x {tensor}: launch a multiple of {model_parallel} ranks or change them"
            )
        data = world_size // model_parallel
    if pipe * tensor * data != world_size:
        raise RecipeError(
            f"world size {world_size} != parallel.pipeline x tensor x data = {pipe} x {tensor} x "
            f"{data} = {pipe * tensor * data}: launch {pipe * tensor * data} ranks "
            f"(deepspeed --num_gpus) or set parallel.data=auto"
        )
    return pipe, tensor, data


def state_bytes(recipe: Recipe, data_parallel: int) -> memory.StateBytes:
    """Bytes per trainable parameter a rank holds under this recipe
    (:mod:`pp_ext.planning.memory`): its dtype, optimizer, and the DeepSpeed config's
    bf16, ZeRO stage and gradient accumulation dtype (DeepSpeed's default: the model's)."""
    config = deepspeed_config(recipe, data_parallel)
    return memory.state_bytes(
        recipe.model.dtype,
        recipe.train.optimizer,
        bf16=bool(config.get("bf16", {}).get("enabled")),
        zero_stage=config.get("zero_optimization", {}).get("stage", 0),
        data=data_parallel,
        grad_accum=GRAD_ACCUM_DTYPES.get(
            config.get("data_types", {}).get("grad_accum_dtype"), recipe.model.dtype
        ),
    )


def batch_config(micro_batch_size: int, micro_batches: int, data_parallel: int) -> dict:
    """DeepSpeed's three batch keys, which it requires to agree: a step is
    ``micro_batches`` (its gradient accumulation) of ``micro_batch_size`` samples on each
    of ``data_parallel`` replicas."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batch_size * micro_batches * data_parallel,
    }


def deepspeed_config(recipe: Recipe, data_parallel: int, output_dir: str | None = None) -> dict:
    """DeepSpeed's config: ``deepspeed.bases`` merged in order, ``deepspeed.overrides`` on
    top, and the keys pp-ext derives from the recipe (batch sizes, clipping, the
    monitors). The optimizer and the learning-rate schedule are passed to
    ``initialize`` as objects (:mod:`pp_ext.training.entry`)."""
    config: dict = {}
    for name in recipe.deepspeed.get("bases", []):
        path = DEEPSPEED_BASES / f"{name}.json"
        if not path.is_file():
            raise RecipeError(
                f"deepspeed base {name!r} does not exist: choose from "
                f"{', '.join(deepspeed_bases())} (configs/deepspeed/)"
            )
        config = _deep_merge(config, json.loads(path.read_text()))
    section = cast(dict, OmegaConf.to_container(cast(DictConfig, recipe.deepspeed)))
    config = _deep_merge(config, section.get("overrides") or {})
    train, parallel = recipe.train, recipe.parallel
    config.update(
        batch_config(train.micro_batch_size, parallel.micro_batches, data_parallel),
        gradient_clipping=train.grad_clip,
    )
    config.setdefault("steps_per_print", 10**9)  # pp-ext logs progress itself
    if output_dir is not None:
        monitor = {"output_path": str(Path(output_dir) / "monitor"), "job_name": "train"}
        if recipe.logging.csv:
            config["csv_monitor"] = {"enabled": True, **monitor}
        if recipe.logging.tensorboard:
            config["tensorboard"] = {"enabled": True, **monitor}
    return config
