"""The recipe's ``peft`` section as a ``peft.LoraConfig``, and what it selects.

Which modules get adapters is PEFT's decision, not pp-ext's: :func:`target_names` lets
``peft.inject_adapter_in_model`` wrap the full HF model built on the meta device (no
memory, no initialisation) and reads back the modules it wrapped, so a list, a regex,
``all-linear`` (every linear layer but the LM head) and ``None`` (PEFT's default for the
family) select exactly the modules ``peft.get_peft_model`` would; a pipeline stage then
wraps only the ones among its own layers. Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
)
from peft.tuners.lora import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from pp_ext.hf.weights import meta_model

ADAPTER_CONFIG = "adapter_config.json"  # the name PEFT's save_pretrained writes


class PeftError(ValueError):
    """A ``peft`` section or adapter folder the user must fix (one line)."""


def lora_config(section, config: PretrainedConfig) -> LoraConfig:
    """PEFT's ``LoraConfig`` of the recipe's ``peft`` section (same names, same meaning)
    for the model of ``config``: ``fan_in_fan_out`` where its linear layers are
    transformers' ``Conv1D`` (GPT-2 stores weights [in, out]; PEFT would set it itself,
    with a warning, on every build)."""
    targets = section.target_modules
    conv1d = any(isinstance(module, Conv1D) for module in meta_model(config).modules())
    return LoraConfig(
        fan_in_fan_out=conv1d,
        task_type=TaskType.CAUSAL_LM,
        r=section.r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=targets if targets is None or isinstance(targets, str) else list(targets),
        use_rslora=section.use_rslora,
        modules_to_save=None if section.modules_to_save is None else list(section.modules_to_save),
        target_parameters=(
            None if section.target_parameters is None else list(section.target_parameters)
        ),
    )


def _linear_names(model: PreTrainedModel) -> list[str]:
    """The last name of every linear module (what a target list usually names)."""
    return sorted(
        {
            name.rpartition(".")[2]
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))
        }
    )


def stacked_names(model: nn.Module) -> list[str]:
    """The last two names of every 3-D parameter (an MoE model's fused experts,
    ``experts.gate_up_proj``): what ``target_parameters`` names."""
    return sorted(
        {".".join(name.split(".")[-2:]) for name, p in model.named_parameters() if p.dim() == 3}
    )


def target_names(lora: LoraConfig, config: PretrainedConfig) -> list[str]:
    """The HF module names of the model of ``config`` that PEFT wraps with ``lora``'s
    ``target_modules`` (its ``target_parameters`` are :func:`target_parameters`); raises
    :class:`PeftError` naming the model's linear modules (3-D parameters) when a target
    matches none."""
    return [
        name
        for name, layer in _wrapped(lora, config).items()
        if not isinstance(layer, ParamWrapper)
    ]


def target_parameters(lora: LoraConfig, config: PretrainedConfig) -> list[str]:
    """The HF names of the parameters PEFT adapts directly (``target_parameters``)."""
    return [
        f"{name.replace('.base_layer', '')}.{layer.parameter_name}"
        for name, layer in _wrapped(lora, config).items()
        if isinstance(layer, ParamWrapper)
    ]


# the per-expert projections of MoE checkpoints (Mixtral's w1/w2/w3, Qwen-MoE's and OLMoE's
# gate_proj/up_proj/down_proj), which transformers v5 fuses into 3-D parameters
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def check_experts(lora: LoraConfig, config: PretrainedConfig) -> None:
    """On a model with fused 3-D experts, ``all-linear`` or a list naming an expert
    projection (``EXPERT_PROJECTIONS``) means the experts; where PEFT's rules (its v4 name
    conversion included, :func:`converted`) still adapt none of them (gpt-oss, and Qwen2-MoE
    which peft 0.21 does not convert: there ``gate_proj`` is the shared expert's only),
    PEFT would train without them, silently: :class:`PeftError`, unless
    ``target_parameters`` says which (``[]``: none)."""
    stacked = stacked_names(meta_model(config))
    targets = lora.target_modules
    if not stacked or lora.target_parameters is not None:
        return
    if isinstance(targets, str):
        meant = targets == "all-linear"
    else:
        meant = bool({t.rpartition(".")[2] for t in targets or ()} & set(EXPERT_PROJECTIONS))
    adapted = {".".join(name.split(".")[-2:]) for name in target_parameters(lora, config)}
    if meant and not adapted & set(stacked):
        raise PeftError(
            f"peft.target_modules {_shown(targets)!r} adapts no expert of this {config.model_type} model: "
            f"PEFT wraps linear modules, and its experts are 3-D parameters ({', '.join(stacked)}); "
            f"set peft.target_parameters=[{','.join(stacked)}] to adapt them too, or "
            f"peft.target_parameters=[] to leave the experts frozen"
        )


def embedding_targets(lora: LoraConfig, config: PretrainedConfig) -> list[str]:
    """Those of :func:`target_names` that are embeddings (PEFT's ``lora.Embedding``)."""
    return [
        name
        for name, layer in _wrapped(lora, config).items()
        if isinstance(layer.get_base_layer(), torch.nn.Embedding)
    ]


def converted(lora: LoraConfig, config: PretrainedConfig) -> LoraConfig:
    """``lora`` as PEFT applies it to the model of ``config``: on MoE models whose experts
    transformers v5 fuses, peft (0.21 and 0.22) maps v4 names (``all-linear``, ``w1``/``w3``,
    ``gate_proj``/``up_proj``, ``w2``/``down_proj``, the router ``gate``) onto
    ``target_parameters`` (``experts.gate_up_proj`` with rank and alpha doubled for the
    two fused projections, ``experts.down_proj``, ``gate.weight``)
    (``peft.utils.transformers_weight_conversion``)."""
    return _inject(lora, config)[1]


def _wrapped(lora: LoraConfig, config: PretrainedConfig) -> dict[str, BaseTunerLayer]:
    """HF module name -> PEFT's layer wrapping it, on the meta model of ``config``."""
    return _inject(lora, config)[0]


def _shown(targets):
    """``target_modules`` as the user wrote it: LoraConfig keeps a list as a set."""
    return sorted(targets) if isinstance(targets, set) else targets


def _no_parameter(lora: LoraConfig, config: PretrainedConfig) -> PeftError:
    return PeftError(
        f"peft.target_parameters {sorted(lora.target_parameters or ())!r} matches no "
        f"parameter of this {config.model_type} model: name some of its 3-D parameters "
        f"({', '.join(stacked_names(meta_model(config))) or 'it has none'})"
    )


def _inject(
    lora: LoraConfig, config: PretrainedConfig
) -> tuple[dict[str, BaseTunerLayer], LoraConfig]:
    model = meta_model(config)
    lora = LoraConfig(**lora.to_dict())  # PEFT converts and expands the config it gets
    try:
        with warnings.catch_warnings(record=True) as unmatched:
            # PEFT only warns when one of target_modules / target_parameters matches nothing
            warnings.filterwarnings("always", ".* were set but no .* was matched", RuntimeWarning)
            with peft_model_warnings():
                inject_adapter_in_model(lora, model, low_cpu_mem_usage=True)
        for warning in unmatched:
            if "target_parameters" in str(warning.message):
                raise _no_parameter(lora, config)
            if "target_modules" in str(warning.message):
                raise ValueError("not found in the base model")
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    except ValueError as exc:
        if "not found in the base model" in str(exc):
            problem = f"peft.target_modules {_shown(lora.target_modules)!r} matches no module of"
        elif "specify `target_modules`" in str(exc):
            problem = "peft.target_modules is not set and PEFT has no default for"
        elif "no `target_parameters` found" in str(exc):
            raise _no_parameter(lora, config) from None
        elif "lora.ParamWrapper does not work with" in str(exc):
            raise PeftError(
                f"PEFT adapts this {config.model_type} model's 3-D parameters "
                f"({', '.join(stacked_names(model))}) with its ParamWrapper, which "
                f"{str(exc).removeprefix('lora.ParamWrapper ')[:-1]}: set it back to its default "
                f"or target no expert (no target_parameters; target_modules without all-linear "
                f"or an expert projection's name)"
            ) from None
        elif "because they are fused into" in str(exc):
            raise PeftError(
                f"peft.target_modules {_shown(lora.target_modules)!r}: PEFT's conversion to this "
                f"{config.model_type} model's fused experts refuses it: {exc}"
            ) from None
        else:
            raise
        raise PeftError(
            f"{problem} this {config.model_type} model: name some of its linear modules "
            f"({', '.join(_linear_names(model))}) or use all-linear"
        ) from None
    return {
        name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
    }, lora


@contextmanager
def peft_model_warnings() -> Iterator[None]:
    """Around building a ``PeftModel`` or injecting adapters: peft 0.21's reads
    transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning that is peft's
    to fix, not the user's), and its conversion of v4 MoE targets (:func:`converted`) adds
    a rank / alpha pattern for ``gate_up_proj`` that it applies and then reports as
    unmatched (its check looks at modules; the pattern names a parameter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        warnings.filterwarnings(
            "ignore", r"The following (rank|alpha)_pattern keys did not match", RuntimeWarning
        )
        yield


def _peft_model(lora: LoraConfig, config: PretrainedConfig) -> PeftModel:
    """``get_peft_model`` on the meta device: PEFT's own wrapping, for no memory."""
    with peft_model_warnings():
        # no base name: peft warns when it differs from the meta model's (a config's folder)
        unnamed = LoraConfig(**{**lora.to_dict(), "base_model_name_or_path": None})
        return get_peft_model(meta_model(config), unnamed)


def check_modules_to_save(lora: LoraConfig, config: PretrainedConfig) -> None:
    """Each ``modules_to_save`` name matches a module (PEFT skips one that matches nothing,
    silently), and none is one half of tied embeddings: PEFT trains an untied copy of it
    while the pipeline's stages share one tied module, so the two would train different
    models. Else :class:`PeftError`, naming the fix."""
    if not lora.modules_to_save:
        return
    with warnings.catch_warnings():  # peft's own about tied layers: refused below, in one line
        warnings.filterwarnings("ignore", ".*ensure_weight_tying", UserWarning)
        saved = saved_names(lora, config)
    for name in lora.modules_to_save:
        if not any(module == name or module.endswith(f".{name}") for module in saved):
            model = meta_model(config)
            top = [
                n for n, m in model.named_modules() if n and next(m.parameters(), None) is not None
            ]
            wholes = sorted({n.rpartition(".")[2] for n in top if n.count(".") <= 1})
            raise PeftError(
                f"peft.modules_to_save names {name!r}, which matches no module of this "
                f"{config.model_type} model: name one of its modules, e.g. {', '.join(wholes)}"
            )
    model = meta_model(config)
    tied = config.get_text_config().tie_word_embeddings
    halves = {
        name
        for name, module in model.named_modules()
        if module is model.get_input_embeddings() or module is model.get_output_embeddings()
    }
    if tied and (both := sorted(halves & set(saved))):
        raise PeftError(
            f"peft.modules_to_save trains {both[0]}, one half of this model's tied embedding "
            f"and LM head: PEFT would train an untied copy of it while the stages share one "
            f"module; use a model with untied embeddings (tie_word_embeddings: false) or leave "
            f"{both[0]} frozen"
        )


def saved_names(lora: LoraConfig, config: PretrainedConfig) -> list[str]:
    """The HF module names of the model of ``config`` that PEFT trains whole
    (``modules_to_save``), found by ``get_peft_model`` itself."""
    if not lora.modules_to_save:
        return []
    return [
        name.removeprefix("base_model.model.")
        for name, module in _peft_model(lora, config).named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    ]


def adapter_keys(lora: LoraConfig, config: PretrainedConfig) -> set[str]:
    """The keys of the ``adapter_model.safetensors`` PEFT saves for ``lora`` on the model
    of ``config`` (``get_peft_model_state_dict``)."""
    return set(get_peft_model_state_dict(_peft_model(lora, config)))


def _base_name(path: str | None) -> str | None:
    """A base model's name as it is compared: a folder that exists by its resolved path."""
    return str(Path(path).resolve()) if path and Path(path).is_dir() else path


def check_adapter(adapter_path: str | Path, lora: LoraConfig, base_model: str) -> dict:
    """The adapter folder's ``adapter_config.json``, checked against the recipe: a LoRA
    adapter of rank ``lora.r`` made for ``base_model``; else :class:`PeftError` naming both."""
    path = Path(adapter_path) / ADAPTER_CONFIG
    if not path.is_file():
        raise PeftError(
            f"peft.adapter_path {adapter_path} holds no {ADAPTER_CONFIG}: give a PEFT adapter "
            f"folder (save_pretrained's) or drop the key"
        )
    saved = json.loads(path.read_text())
    if saved.get("peft_type") != "LORA":
        raise PeftError(
            f"peft.adapter_path {adapter_path} is a {saved.get('peft_type')} adapter, not LoRA: "
            f"give a LoRA adapter folder"
        )
    if saved.get("r") != lora.r:
        raise PeftError(
            f"peft.adapter_path {adapter_path} has rank r={saved.get('r')} but the recipe has "
            f"peft.r={lora.r}: set peft.r={saved.get('r')} or give an adapter of rank {lora.r}"
        )
    made_for = saved.get("base_model_name_or_path")
    if made_for is not None and _base_name(made_for) != _base_name(base_model):
        raise PeftError(
            f"peft.adapter_path {adapter_path} was made for base model {made_for}, not "
            f"model.path {base_model}: give the adapter's base model or an adapter made for it"
        )
    return saved
