"""Before a launch: what a recipe will run, checked and decided where no process
group is needed, the same on every rank (``pp-ext plan``, ``pp-ext tune`` and the
training job call it first), so a mistake is one line and exit code 2 on every
rank, with nothing written, instead of a traceback once the ranks run.

:func:`check_before_launch` resolves the rank layout and checks the schedule's
constraints, the model, its tokenizer and the run's folders: every token id the
tokenizer can produce must index the embedding (past it, a CPU run dies with an
``IndexError`` and a GPU run with a device-side assert that names nothing), a
learned absolute position table (GPT-2's ``wpe``) must hold ``data.seq_len``
positions, the run's folders must be folders this user can write, and a checkpoint
to resume from must be complete. :func:`check_data` (the training job's) checks
that the data's first records have the columns of ``data.kind``
(:func:`pp_ext.data.check`). :func:`recipe_schedule` is ``parallel.schedule: auto``
with ``parallel.profile`` on the recipe's model, searched in planning
(:func:`pp_ext.planning.search.profiled_auto`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import cast

from omegaconf import OmegaConf
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from pp_ext import tp
from pp_ext.checkpoint import tags as checkpoints
from pp_ext.config.layout import Layout
from pp_ext.config.recipe import RecipeError, resolve_parallel
from pp_ext.config.schema import Recipe
from pp_ext.engine.module import partition
from pp_ext.hf import layer_specs, moe, position_table, supported
from pp_ext.hf.loading import load_config
from pp_ext.peft import (
    PeftError,
    check_adapter,
    check_experts,
    check_modules_to_save,
    embedding_targets,
    lora_config,
    target_names,
)
from pp_ext.planning.search import profiled_auto
from pp_ext.schedules import InvalidScheduleError, Schedule, ScheduleError, get, lower
from pp_ext.schedules.registry import BASELINE
from pp_ext.schedules.validate import expert_dry_run

# what transformers' AutoTokenizer reads a tokenizer from (any one suffices)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_before_launch(recipe: Recipe, world_size: int) -> tuple[Layout, Schedule | None]:
    """``(layout, prebuilt)``; raises RecipeError for what can
    be known without a process group about the layout (ranks, schedule constraints),
    the model, its tokenizer and the run's folders (the data is :func:`check_data`'s).
    ``prebuilt``: ``auto`` computed from ``parallel.profile`` (its chunks are its
    choice), built here once; None otherwise."""
    pipe, tensor, data = resolve_parallel(recipe, world_size)
    name = recipe.parallel.schedule
    if tensor > 1 and name == BASELINE:
        raise RecipeError(
            "parallel.schedule=deepspeed-1f1b runs DeepSpeed's own engine, whose Megatron-shaped "
            "partitioned p2p pp-ext does not check with tensor parallelism: use 1f1b (the same "
            "schedule on pp-ext's engine) with parallel.tensor > 1"
        )
    chunks, prebuilt, built = recipe.parallel.chunks, None, None
    if name != BASELINE:
        spec = get(name)
        chunks = spec.resolve_chunks(chunks)
        try:
            built = spec.build(pipe, recipe.parallel.micro_batches, chunks)
            if (
                name == "auto" and recipe.parallel.profile is not None
            ):  # auto chooses its chunks from the profile
                prebuilt = recipe_schedule(recipe, pipe)
                chunks = prebuilt.chunks
        except ScheduleError as exc:
            raise RecipeError(
                f"parallel.schedule={name} with pipeline={pipe}, "
                f"micro_batches={recipe.parallel.micro_batches}, chunks={chunks}: "
                f"{' '.join(str(exc).split())}"
            ) from None
        except ValueError as exc:  # a profile of other shapes or another model
            raise RecipeError(
                f"parallel.profile={recipe.parallel.profile}: {' '.join(str(exc).split())}"
            ) from None
    elif chunks not in (None, 1):
        raise RecipeError(
            "parallel.schedule=deepspeed-1f1b runs one chunk per rank: drop parallel.chunks"
        )
    chunks = chunks or 1
    model = Path(recipe.model.path)
    if not (model / "config.json").is_file():
        raise RecipeError(
            f"model.path {model} has no config.json: point it at a Hugging Face model folder"
        )
    raw = json.loads((model / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in supported() and (experts := moe.routed_experts(raw)):
        raise RecipeError(
            f"model.path {model} is a {model_type!r} mixture-of-experts model ({experts} routed "
            f"experts), which pp-ext cannot split into pipeline stages yet: supported MoE model "
            f"types are {', '.join(moe.supported())}"
        )
    if model_type not in supported():
        raise RecipeError(
            f"model.path {model} is a {model_type!r} model, which pp-ext cannot split into "
            f"pipeline stages: supported model types are {', '.join(supported())}"
        )
    # DeepSeek-V3's hub weights are fp8 with per-block scales (weight_scale_inv): read as
    # they are, they would load as wrong numbers without a word
    if (raw.get("quantization_config") or {}).get("quant_method") == "fp8":
        raise RecipeError(
            f"model.path {model} holds fp8-quantized weights (config.json's quantization_config), "
            f"which pp-ext does not dequantize: save a bf16 copy first (from_pretrained with "
            f"FineGrainedFP8Config(dequantize=True), then save_pretrained)"
        )
    config = AutoConfig.from_pretrained(model)
    check_baseline_router_loss(name, pipe, config)
    check_expert(recipe.parallel.expert, data, model, raw)
    check_bias_update(recipe, model, model_type)
    if recipe.parallel.expert > 1 and built is not None:
        check_expert_order(prebuilt or built, recipe.parallel.expert)
    if tensor > 1:
        try:
            tp.check_tensor_split(config, tensor)
        except ValueError as exc:
            raise RecipeError(f"parallel.tensor={tensor}: {exc}") from None
    tokenizer = tokenizer_folder(recipe)
    if not tokenizer.is_dir():
        raise RecipeError(
            f"model.tokenizer {tokenizer} is not a folder: point it at the tokenizer's files"
        )
    check_tokenizer(recipe, config)
    check_positions(recipe, config)
    check_peft(recipe, config)
    check_peft_vocabulary(recipe, config)
    save_dir = checkpoints.save_dir(recipe)
    check_folders(recipe, save_dir)
    if (resume_from := checkpoints.resume_point(recipe.checkpoint.resume, save_dir)) is not None:
        checkpoints.verify(*resume_from)
        check_resume_peft(recipe, *resume_from)
    if prebuilt is not None:
        placement = prebuilt.placement.name
    else:
        placement = "loop" if name == BASELINE else get(name).placement_for(chunks)
    return Layout.of(recipe, pipe, tensor, data, chunks, placement), prebuilt


def check_baseline_router_loss(name: str, pipe: int, config: PretrainedConfig) -> None:
    """DeepSpeed's own engine pools its receive and gradient buffers by their place in the
    tuple, whatever their dtype (``PipelineEngine._allocate_or_extend_buffers``): a middle
    stage (pipeline >= 3) receives the router probabilities' gradient into the int64 buffer
    of the positions and trains wrong (NaN weights here) without a word. With two stages
    there is no middle stage, and the router loss is HF's (test_hf_training)."""
    if name == BASELINE and pipe > 2 and moe.router_loss_coef(config) is not None:
        raise RecipeError(
            f"parallel.schedule=deepspeed-1f1b with parallel.pipeline={pipe} on a "
            f"{config.model_type!r} model with its router loss on (output_router_logits): "
            f"DeepSpeed's own engine receives a middle stage's router-statistics gradient into "
            f"an int64 buffer and trains wrong: use 1f1b (the same schedule on pp-ext's engine) "
            f"or parallel.pipeline=2"
        )


def check_expert_runs(recipe: Recipe, layout: Layout) -> None:
    """The training job's own limits on expert parallelism (``pp-ext plan`` and ``tune``
    lay any out): its checkpoints (:mod:`pp_ext.checkpoint.experts`) save the experts of
    one pipeline (not Chimera's two)."""
    if layout.expert == 1:
        return
    if recipe.parallel.schedule == BASELINE:
        # its stock engine finds no DeepSpeed MoE layer (has_moe_layers stays False), so it
        # would all-reduce the expert ranks' different experts over every data rank
        raise RecipeError(
            f"parallel.expert={layout.expert} with parallel.schedule={BASELINE}: DeepSpeed's own "
            f"engine would sum different experts' gradients over the data ranks: use "
            f"parallel.schedule=1f1b (the same order, pp-ext's engine) or parallel.expert=1"
        )
    if layout.placement == "bidirectional":  # two ranks would save each expert
        raise RecipeError(
            f"parallel.expert={layout.expert} with parallel.schedule={recipe.parallel.schedule}: "
            f"the training job does not save the experts of Chimera's two pipelines yet: use "
            f"another schedule or parallel.expert=1"
        )


def check_expert(expert: int, data: int, model: Path, raw: dict) -> None:
    """``parallel.expert`` > 1 needs routed experts and must divide them and the data ranks
    (each expert group is ``expert`` of a stage's data ranks, holding ``experts / expert``
    experts each)."""
    if expert == 1:
        return
    experts = moe.routed_experts(raw)
    if not experts:
        raise RecipeError(
            f"parallel.expert={expert} on model.path {model}, a dense {raw.get('model_type')!r} "
            f"model without routed experts: set parallel.expert=1"
        )
    if experts % expert:
        raise RecipeError(
            f"parallel.expert={expert} does not divide the {experts} routed experts of model.path "
            f"{model}: use a divisor of {experts}"
        )
    if data % expert:
        raise RecipeError(
            f"parallel.expert={expert} does not divide the {data} data-parallel ranks (expert "
            f"groups are taken out of them): use a divisor of {data} or launch more ranks"
        )


def check_bias_update(recipe: Recipe, model: Path, model_type: str) -> None:
    """``moe.bias_update_speed`` > 0 needs routers that choose with a correction bias
    (:mod:`pp_ext.moe.bias_update`), and a step boundary: a synchronous schedule."""
    speed = recipe.moe.bias_update_speed
    if not speed:
        return
    family = moe.FAMILIES.get(model_type)
    if family is None or not family.expert_bias:
        raise RecipeError(
            f"moe.bias_update_speed={speed:g} on model.path {model}, a {model_type!r} model whose "
            f"routers have no e_score_correction_bias to update (DeepSeek-V3's have): set "
            f"moe.bias_update_speed=0"
        )
    name = recipe.parallel.schedule
    if name != BASELINE and not get(name).synchronous:
        raise RecipeError(
            f"moe.bias_update_speed={speed:g} counts each step's tokens, and "
            f"parallel.schedule={name} keeps micro-batches in flight across steps: use a "
            f"synchronous schedule (e.g. 1f1b) or set moe.bias_update_speed=0"
        )


def check_expert_order(schedule: Schedule, expert: int) -> None:
    """The schedule's program on the pipe x expert grid, each MoE layer's all-to-alls
    on its expert group, finishes under NCCL's rules (:func:`pp_ext.schedules.validate.
    expert_dry_run`, an MoE layer on every chunk: the strictest placement of them)."""
    try:
        # the pipelines of one expert group stand for all: the others run the same
        # programs on communicators of their own (seconds saved at p = 8, data 8)
        expert_dry_run(lower(schedule), expert, expert)
    except InvalidScheduleError as exc:
        raise RecipeError(
            f"parallel.schedule={schedule.name} with parallel.expert={expert}: "
            f"{' '.join(exc.reason.split())}: choose another schedule or parallel.expert=1"
        ) from None


def tokenizer_folder(recipe: Recipe) -> Path:
    return Path(recipe.model.tokenizer or recipe.model.path)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path):
    """The tokenizer in ``folder``; one that transformers cannot read is a RecipeError."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for broken files
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise RecipeError(
            f"the tokenizer in {folder} cannot be loaded ({first}): set model.tokenizer to a "
            f"Hugging Face tokenizer folder"
        ) from None


def check_tokenizer(recipe: Recipe, config: PretrainedConfig) -> None:
    """Every id the tokenizer can produce (its vocabulary, added and special tokens)
    is below the model's ``vocab_size``. Skipped where there is no tokenizer (a
    shape-only config being planned)."""
    folder = tokenizer_folder(recipe)
    if not has_tokenizer(folder):
        return
    tokenizer = load_tokenizer(folder)
    ids = [*tokenizer.get_vocab().values(), *tokenizer.all_special_ids, len(tokenizer) - 1]
    highest, vocab = max(ids), config.get_text_config().vocab_size
    if highest >= vocab:
        raise RecipeError(
            f"the tokenizer in {folder} has token ids up to {highest} ({highest + 1} tokens), but "
            f"model.path {recipe.model.path} has vocab_size {vocab}: use the model's own tokenizer "
            f"(model.tokenizer), or a model whose embedding has at least {highest + 1} rows "
            f"(resize_token_embeddings({highest + 1}) and save_pretrained)"
        )


def check_positions(recipe: Recipe, config: PretrainedConfig) -> None:
    """``data.seq_len`` fits a learned absolute position table. Packed documents
    restart their positions, so a shorter table only fails on the first document
    longer than it: refused here, whatever the data."""
    rows = position_table(config)
    if rows is not None and recipe.data.seq_len > rows:
        raise RecipeError(
            f"data.seq_len={recipe.data.seq_len} is longer than the learned position table of "
            f"model.path {recipe.model.path} ({config.model_type}: {rows} positions): set "
            f"data.seq_len <= {rows}"
        )


def check_peft(recipe: Recipe, config: PretrainedConfig) -> None:
    """The ``peft`` section against the model: its targets match some module (PEFT's rules
    on the full model), none an embedding when the tensor axis cuts it, and ``adapter_path``
    is a LoRA adapter of this rank for this base."""
    if recipe.peft.type == "none":
        return
    lora = lora_config(recipe.peft, config)
    try:
        target_names(lora, config)
        check_experts(lora, config)
        check_modules_to_save(lora, config)
        embeddings = embedding_targets(lora, config)
        if recipe.parallel.tensor > 1 and embeddings:
            # PEFT's lora.Embedding looks up whole-vocabulary ids in this rank's rows
            raise RecipeError(
                f"peft.target_modules selects the embedding {embeddings[0]}, which "
                f"parallel.tensor={recipe.parallel.tensor} cuts by vocabulary, where LoRA's "
                f"embedding adapter cannot run: leave it out of peft.target_modules (train it "
                f"whole with peft.modules_to_save) or set parallel.tensor=1"
            )
        if recipe.peft.adapter_path is not None:
            check_adapter(recipe.peft.adapter_path, lora, recipe.model.path)
    except PeftError as exc:
        raise RecipeError(str(exc)) from None


def check_peft_vocabulary(recipe, config) -> None:
    """LoRA on an unpadded vocabulary only: PEFT's embedding adapters and saved copies of
    the embedding and head would hold the padded rows (:mod:`pp_ext.tp.vocab`), which no
    PEFT folder of this base can."""
    if recipe.peft.type == "none":
        return
    tensor, multiple = recipe.parallel.tensor, recipe.parallel.make_vocab_size_divisible_by
    vocab = config.get_text_config().vocab_size
    axis = tp.TensorAxis(tensor, make_vocab_size_divisible_by=multiple)
    if (padded := tp.padded_vocab_size(vocab, axis)) != vocab:
        raise RecipeError(
            f"peft.type=lora with parallel.make_vocab_size_divisible_by={multiple} x tensor={tensor}: "
            f"the vocabulary of {vocab} would be padded to {padded} rows, which LoRA's adapters "
            f"cannot hold: set parallel.make_vocab_size_divisible_by=1 (and a tensor size that "
            f"divides {vocab})"
        )


def check_resume_peft(recipe: Recipe, save_dir: Path, tag: str) -> None:
    """The checkpoint to resume was trained as the recipe trains: full fine-tuning and
    LoRA checkpoints hold different tensors (a LoRA one has no base weights)."""
    saved = checkpoints.info(save_dir, tag).get("peft", "none")
    if saved != recipe.peft.type:
        kinds = {"none": "a full fine-tune", "lora": "LoRA"}
        raise RecipeError(
            f"checkpoint {save_dir / tag} was saved by {kinds[saved]} (peft.type={saved}) but the "
            f"recipe has peft.type={recipe.peft.type}: to start LoRA from a full fine-tune, export "
            f"it (pp-ext export) and set model.path to the export with checkpoint.resume=never"
        )


def _writable_folder(key: str, path: Path) -> None:
    """``path`` is a folder, or can be made one, by this user."""
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{key} {path} is a file: give a folder (made if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RecipeError(
            f"{key} {path} cannot be made: {existing} is a file: give a folder (made if missing)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(
            f"{key} {path} cannot be written: {existing} is not writable by this user: give a "
            f"folder you can write"
        )


def check_folders(recipe: Recipe, save_dir: Path) -> None:
    """The run's folders: ``output_dir`` and the checkpoints' ``save_dir``."""
    _writable_folder("output_dir", Path(recipe.output_dir))
    _writable_folder("checkpoint.dir", save_dir)  # default: output_dir/checkpoints


def check_data(recipe: Recipe) -> None:
    """The data is there, readable, of the kind the recipe says, with a tokenizer it
    needs (:func:`pp_ext.data.check`)."""
    from pp_ext.data import (
        batches as data,
    )  # here, not at the top: it imports datasets, which plan and tune never need

    folder = tokenizer_folder(recipe)
    if not has_tokenizer(folder):
        raise RecipeError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): set model.tokenizer "
            f"to the folder that has them (a config-only model folder has none)"
        )
    data.check(recipe.data, load_tokenizer(folder))


def recipe_layer_specs(recipe: Recipe) -> list:
    """The pipeline layers of the recipe's model (what a profile measures, in order)."""
    return layer_specs(load_config(recipe.model.path), recipe.model.attn_implementation)


def recipe_schedule(recipe: Recipe, pipe: int) -> Schedule:
    """``parallel.schedule: auto`` with ``parallel.profile`` on the recipe's model
    (:func:`pp_ext.planning.search.profiled_auto`, cut by ``parallel.partition``)."""
    specs, method = recipe_layer_specs(recipe), recipe.parallel.partition
    limit = recipe.parallel.memory_limit
    limit = cast(list, OmegaConf.to_container(limit)) if OmegaConf.is_config(limit) else limit
    return profiled_auto(recipe, pipe, lambda stages: partition(specs, stages, method), limit)
