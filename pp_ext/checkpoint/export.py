"""Export a pp-ext (DeepSpeed pipeline) checkpoint as a Hugging Face ``from_pretrained`` folder.

DeepSpeed's ``PipelineModule.save_state_dict`` writes one file per layer spec,
``layer_XX-model_states.pt`` for global layer index XX (``ckpt_layer_path``; with a
model-parallel axis the name carries ``-model_YY``: one file per tensor rank YY),
and no file for a tied head called through ``forward_fn``. Tensor-parallel parts are
merged back (:meth:`pp_ext.tp.Split.merge`, the inverse of the cut loading made, which
drops a padded vocabulary's zero rows, so the folder has the model's own ``vocab_size``;
:func:`layer_tensors`, which :mod:`pp_ext.checkpoint.reshape` reads layers with too);
replicated tensors are taken from tensor rank 0. The layers' ``hf_keys()`` (built on the meta device
from ``layer_specs(config)``, the order training used) name every tensor as the HF
model does; the config and tokenizer come from ``<tag>/hf_meta/``, which
:func:`save_hf_metadata` writes next to the checkpoint on rank 0.

The export holds about one shard (and one layer file) in memory: layer files are
read one at a time, memory-mapped where torch's format allows, shards are planned
from shapes alone (huggingface_hub's ``split_state_dict_into_shards_factory``, as
``save_pretrained`` shards) and each is materialised, written and dropped in turn. Everything is written into a temporary
sibling folder renamed into place at the end, so a crash never leaves a half-written
``out_dir``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.constants import SAFETENSORS_WEIGHTS_FILE_PATTERN
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME

from pp_ext import tp
from pp_ext.checkpoint import experts
from pp_ext.checkpoint.tags import LATEST, MARKER, info
from pp_ext.hf.families import layer_specs
from pp_ext.hf.loading import hf_initializer, layout_free_specs, load_config, to_dtype
from pp_ext.hf.weights import hf_keys, meta_model, saved_form
from pp_ext.peft import Targets, add_adapters, expert_parts, peft_keys
from pp_ext.peft.adapters import ADAPTER
from pp_ext.peft.config import ADAPTER_CONFIG, adapter_keys, peft_model_warnings

HF_META = "hf_meta"
MODEL_FILES = (CONFIG_NAME, GENERATION_CONFIG_NAME)
# a LoRA run on a base without weights (a config: seeded initialisation): how the ranks built it
BASE_INIT = "base_init.json"
BASE_DIR = "base"  # where such a run's export writes that base, next to the adapter


class ExportError(Exception):
    """A checkpoint that cannot be exported, said in one line with what to do."""


def save_hf_metadata(
    tag_dir: str | Path,
    model: str | Path | PretrainedConfig,
    tokenizer_dir: str | Path | None = None,
    adapter: LoraConfig | None = None,
    base_init: dict | None = None,
) -> Path:
    """Write ``<tag_dir>/hf_meta/``: what rebuilds the HF model from the checkpoint.

    From the model folder: config.json and generation_config.json (a config: its
    config.json). From ``tokenizer_dir`` (default: the model folder): the tokenizer
    as transformers saves it (``AutoTokenizer.from_pretrained(...).save_pretrained``:
    tokenizer.json, tokenizer_config.json, chat template, vocab/merges, ...), so
    whatever tokenizer format the model uses travels with it and nothing else from the
    folder does (scripts, READMEs). ``adapter``: a LoRA run's config, saved as PEFT
    saves it (``adapter_config.json``, naming the model folder as its base). ``base_init``
    (``{"seed", "dtype"}``): the base had no weights and the ranks initialised it so
    (:func:`pp_ext.hf.loading.layout_free_specs`); the export rebuilds it from that. Rank 0
    calls this after ``engine.save_checkpoint``.
    """
    meta = Path(tag_dir) / HF_META
    meta.mkdir(parents=True, exist_ok=True)
    if base_init is not None:
        (meta / BASE_INIT).write_text(json.dumps(base_init) + "\n")
    if adapter is not None:
        weighted = base_init is None and not isinstance(model, PretrainedConfig)
        base = str(Path(model).resolve()) if weighted else None
        saved = LoraConfig(**{**adapter.to_dict(), "base_model_name_or_path": base})
        saved.inference_mode = True  # as PeftModel.save_pretrained writes it
        saved.save_pretrained(str(meta))
    if isinstance(model, PretrainedConfig):
        model.save_pretrained(meta)
    else:
        load_config(model)  # one clear error for a folder that is no HF model
        for name in MODEL_FILES:
            if (Path(model) / name).is_file():
                shutil.copy2(Path(model) / name, meta / name)
        tokenizer_dir = model if tokenizer_dir is None else tokenizer_dir
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise FileNotFoundError(
                f"tokenizer folder {tokenizer_dir} does not exist: pass the folder that holds "
                f"tokenizer.json / tokenizer_config.json"
            )
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(meta)
    return meta


def tag_dir_of(checkpoint: str | Path, tag: str | None = None) -> Path:
    """The tag folder to export: ``checkpoint/tag``, ``checkpoint/<latest>``, or
    ``checkpoint`` itself when it is a tag folder (holds ``hf_meta``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ExportError(
            f"checkpoint folder {checkpoint} does not exist: pass a DeepSpeed save dir or one of its tags"
        )
    if tag is None and (checkpoint / HF_META).is_dir():
        return checkpoint
    if tag is None:
        if not (checkpoint / LATEST).is_file():
            raise ExportError(
                f"{checkpoint} has no '{LATEST}' file and no {HF_META}/: pass --tag TAG "
                f"(or the tag folder itself)"
            )
        tag = (checkpoint / LATEST).read_text().strip()
    if not (checkpoint / tag).is_dir():
        tags = sorted(p.name for p in checkpoint.iterdir() if p.is_dir())
        raise ExportError(
            f"{checkpoint} has no tag {tag!r}: its tags are {', '.join(tags) or 'none'}"
        )
    return checkpoint / tag


def layer_files(tag_dir: Path, idx: int) -> list[Path]:
    """The files of layer ``idx`` (DeepSpeed's ``ckpt_layer_path_list`` pattern), one per
    tensor rank, in rank order."""
    files = sorted(tag_dir.glob(f"layer_{idx:02d}-*model_states.pt"))
    if not files:
        raise ExportError(
            f"{tag_dir} has no layer_{idx:02d}-model_states.pt: the checkpoint is incomplete "
            f"or was saved from another model than {HF_META}/{CONFIG_NAME} describes"
        )
    expected = [f"layer_{idx:02d}-model_{rank:02d}-model_states.pt" for rank in range(len(files))]
    if len(files) > 1 and [f.name for f in files] != expected:
        raise ExportError(
            f"{tag_dir} holds layer {idx} in {len(files)} tensor-parallel slices "
            f"({', '.join(f.name for f in files)}) that are not {expected[0]} .. {expected[-1]}: "
            f"the checkpoint mixes runs; export a tag written by one run"
        )
    return files


def saved_layers(specs: list) -> list[tuple[int, LayerSpec]]:
    """``(index, spec)`` of each layer with its own file: a tied module once, at its
    first use; a tied head called through ``forward_fn`` (no file) or a function never."""
    seen, out = set(), []
    for idx, spec in enumerate(specs):
        if not isinstance(spec, LayerSpec):
            continue
        if isinstance(spec, TiedLayerSpec):
            if spec.forward_fn is not None or spec.key in seen:
                continue
            seen.add(spec.key)
        out.append((idx, spec))
    return out


@dataclass(frozen=True)
class Stored:
    """Where one tensor of the checkpoint lies: its layer file(s) and the key in them,
    with the whole tensor's shape. Parts of a tensor-parallel tensor lie in one file
    per tensor rank and are merged by ``split``; a whole tensor lies in ``paths[0]``."""

    paths: tuple[Path, ...]
    key: str
    shape: torch.Size
    dtype: torch.dtype
    split: tp.Split | None = None

    def read(self, load) -> torch.Tensor:
        """The whole tensor, each file read by ``load(path)`` (a state dict)."""
        if self.split is None:
            return load(self.paths[0])[self.key]
        return self.split.merge([load(path)[self.key] for path in self.paths])


def load_layer(path: Path) -> dict[str, torch.Tensor]:
    """A layer file's state dict: memory-mapped (read on demand) when it is torch's zip
    format, DeepSpeed's default; the legacy format (``checkpoint_serialization: false``)
    cannot be mapped and is read whole."""
    return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)


def vocab_multiple(tag_dir: Path) -> int:
    """The ``make_vocab_size_divisible_by`` a checkpoint was saved with (its marker's
    layout; 1 where the marker has none or there is no marker)."""
    if not (tag_dir / MARKER).is_file():
        return 1
    return info(tag_dir.parent, tag_dir.name).get("make_vocab_size_divisible_by", 1)


def layer_tensors(
    tag_dir: Path, idx: int, spec: LayerSpec, adapters: Targets | None = None
) -> tuple[torch.nn.Module, dict[str, Stored]]:
    """Layer ``idx`` of the checkpoint: ``spec`` built on the meta device for the saved
    tensor size (one file per tensor rank) and vocabulary padding, and where each of its
    tensors lies, under its ``state_dict`` name, with the cut that merges its parts (a
    padded vocabulary's without its padding). ``adapters``: a LoRA
    run's checkpoint, whose files hold all but the frozen parameters (DeepSpeed's
    ``exclude_frozen_parameters``)."""
    paths = tuple(layer_files(tag_dir, idx))
    axis = tp.TensorAxis(len(paths), make_vocab_size_divisible_by=vocab_multiple(tag_dir))
    try:
        with torch.device("meta"), tp.using(axis):  # every rank's part has one shape
            layer = spec.build()
            if adapters is not None:
                add_adapters([(idx, layer)], adapters, seed=0)
    except ValueError as err:  # a config that cannot be cut so many ways
        raise ExportError(
            f"{paths[0].name} is one of {len(paths)} tensor-parallel slices: {err}"
        ) from None
    frozen = {name for name, param in layer.named_parameters() if not param.requires_grad}
    expected = {k: v for k, v in layer.state_dict().items() if k not in frozen}
    cut = tp.splits(layer)
    # an expert-parallel run's experts: one file per global expert (pp_ext.checkpoint.experts)
    rows = tuple(experts.weight_files(tag_dir, idx))
    in_rows = load_layer(rows[0]).keys() if rows else set()
    parts = expert_parts(layer, ADAPTER) if rows else {}  # one part per expert, by its cut
    whole, dtypes = {k: v.shape for k, v in expected.items()}, {}
    for path in (*paths, *rows):
        state, want = (
            load_layer(path),
            {
                k: parts[k].part_shape(whole[k]) if path in rows and k in parts else v.shape
                for k, v in expected.items()
                if (k in in_rows) == (path in rows)
            },
        )
        if state.keys() != want.keys() or any(state[k].shape != want[k] for k in state):
            raise ExportError(
                f"{path.name} does not hold the tensors of {type(layer).__name__} as "
                f"{HF_META}/{CONFIG_NAME} describes it (names or shapes differ): export with the "
                f"config the checkpoint was trained with"
            )
        dtypes.update({k: v.dtype for k, v in state.items()})
    if rows and any(parts[k].size != len(rows) for k in in_rows):
        raise ExportError(
            f"{tag_dir} holds {len(rows)} expert files of layer {idx}, whose experts number "
            f"{parts[next(iter(in_rows))].size}: the checkpoint is incomplete; export another tag"
        )
    return layer, {
        local: Stored(rows, local, tensor.shape, dtypes[local], parts[local])
        if local in in_rows
        else Stored(
            paths if local in cut else paths[:1],
            local,
            cut[local].whole_shape(tensor.shape) if local in cut else tensor.shape,
            dtypes[local],
            cut.get(local),
        )
        for local, tensor in expected.items()
    }


def checkpoint_tensors(
    tag_dir: Path, config: PretrainedConfig, adapters: Targets | None = None
) -> dict[str, Stored]:
    """Every tensor of the checkpoint under its HF name, one layer (its tensor ranks'
    files) at a time; a LoRA run's (``adapters``) under its key in PEFT's adapter file."""
    try:
        specs = layer_specs(config)
    except ValueError as err:
        raise ExportError(str(err)) from None
    tensors = {}
    for idx, spec in saved_layers(specs):
        layer, stored = layer_tensors(tag_dir, idx, spec, adapters)
        names = hf_keys(layer) if adapters is None else peft_keys(layer)
        tensors.update({names[local]: stored[local] for local in names})
    return tensors


def _check_keys(tensors: dict, expected: set[str]) -> None:
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ExportError(
            f"the checkpoint's tensors are not the HF model's: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'} (e.g. saved with exclude_frozen_parameters, "
            f"or another config)"
        )


def _write_weights(
    tensors: dict[str, Stored],
    model: PreTrainedModel,
    dtype: torch.dtype,
    folder: Path,
    max_shard_size: int | str,
) -> None:
    """Safetensors shards (+ index) of ``tensors`` (the model's names) stored as
    ``save_pretrained`` stores them (:func:`~pp_ext.hf.weights.saved_form`: renamed,
    fused experts split into one tensor per expert), one shard in memory at a time, in
    save_pretrained's order and so its shards. Keeping the last layer's files (one per
    tensor rank) open reads each file about once where that order is the layers' (one
    file per layer and tensor rank: a few opens more where it is not)."""

    def cast(t: Stored) -> torch.dtype:
        return dtype if t.dtype.is_floating_point else t.dtype

    metas = {
        name: torch.empty(stored.shape, dtype=cast(stored), device="meta")
        for name, stored in tensors.items()
    }
    source = {key: name for name, meta in metas.items() for key in saved_form(model, {name: meta})}
    # save_pretrained's shards: its whole state dict reverted at once (that order), the parts
    # of one model tensor (views of it) kept together and counted once, as its storage
    # (a 1-tuple: the factory skips plain strings, bitsandbytes' metadata)
    entries = {key: (source[key],) for key in saved_form(model, metas)}
    try:
        plan = split_state_dict_into_shards_factory(
            entries,
            get_storage_size=lambda entry: metas[entry[0]].nbytes,
            get_storage_id=lambda entry: entry[0],
            filename_pattern=SAFETENSORS_WEIGHTS_FILE_PATTERN,
            max_shard_size=max_shard_size,
        )
    except ValueError as err:
        raise ExportError(f"max shard size {max_shard_size!r}: {err}") from None
    load = functools.lru_cache(maxsize=max(len(t.paths) for t in tensors.values()))(load_layer)

    @functools.lru_cache(maxsize=1)  # the parts of one tensor follow each other
    def parts(name: str) -> dict[str, torch.Tensor]:
        stored = tensors[name]
        return saved_form(model, {name: stored.read(load).to(cast(stored), copy=True)})

    for filename, keys in plan.filename_to_tensors.items():
        shard = {key: parts(source[key])[key].contiguous() for key in keys}
        save_file(shard, folder / filename, metadata={"format": "pt"})
        del shard
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an old ``out_dir`` goes only after."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    merge: bool = False,
) -> Path:
    """Write the HF folder of a pp-ext checkpoint to ``out_dir`` (returned).

    ``checkpoint`` is a DeepSpeed save dir (its ``latest`` tag, or ``tag``) or a tag
    folder; it needs ``hf_meta/`` (:func:`save_hf_metadata`). ``dtype`` None keeps the
    checkpoint's. Writes safetensors (``model.safetensors``, or shards of at most
    ``max_shard_size`` and ``model.safetensors.index.json``), config.json with its
    dtype (and no ``quantization_config``: a model loaded from MXFP4 is written
    dequantized, bf16 or fp32 tensors), and the other hf_meta files. The tensor names must be exactly those of the
    HF model (``from_config`` on the meta device, tied copies left out), else nothing
    is written. An existing non-empty ``out_dir`` is an error unless ``overwrite``.

    A LoRA run's checkpoint (``hf_meta/adapter_config.json``) exports as a PEFT adapter
    folder (``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer), its
    tensors exactly those ``get_peft_model`` would save; ``merge``: the merged full
    model instead, which ``from_pretrained`` loads.
    """
    tag_dir, out_dir = tag_dir_of(checkpoint, tag), Path(out_dir)
    meta = tag_dir / HF_META
    if not (meta / CONFIG_NAME).is_file():
        raise ExportError(
            f"{tag_dir} has no {HF_META}/{CONFIG_NAME}: the training job writes it with "
            f"pp_ext.hf.save_hf_metadata(tag_dir, model_dir) on rank 0 after save_checkpoint"
        )
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite):
        raise ExportError(
            f"output folder {out_dir} already exists and is not empty: pass overwrite "
            f"(--overwrite) to replace it, or choose another folder"
        )
    try:
        out_dtype = None if dtype is None else to_dtype(dtype)
    except ValueError as err:
        raise ExportError(str(err)) from None
    config = AutoConfig.from_pretrained(meta)
    lora = LoraConfig.from_pretrained(str(meta)) if (meta / ADAPTER_CONFIG).is_file() else None
    rebuilt = lora is not None and (meta / BASE_INIT).is_file()
    if merge:
        if lora is None:
            raise ExportError(
                f"{tag_dir} is a full fine-tune's checkpoint: --merge is for LoRA checkpoints "
                f"(drop --merge; the export is the whole model already)"
            )
        if not rebuilt and not Path(lora.base_model_name_or_path or "").is_dir():
            raise ExportError(
                f"{tag_dir} is a LoRA adapter of base model {lora.base_model_name_or_path}, which "
                f"is not a folder: --merge needs the base's weights (restore the folder, or drop "
                f"--merge)"
            )
    adapters = None if lora is None else Targets.of(lora, config)
    tensors = checkpoint_tensors(tag_dir, config, adapters)
    model = meta_model(config)
    if lora is None:
        _check_keys(tensors, set(model.state_dict()) - set(model.all_tied_weights_keys))
    else:
        _check_keys(tensors, adapter_keys(lora, config))
    out_dtype = out_dtype or next(t.dtype for t in tensors.values() if t.dtype.is_floating_point)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        if lora is None:
            _write_weights(tensors, model, out_dtype, tmp, max_shard_size)
            config.dtype = out_dtype
            # the weights are dequantized (a gpt-oss checkpoint in MXFP4), as from_pretrained's
            # Mxfp4Config(dequantize=True) leaves them: transformers drops the config's too
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
        # the tokenizer, generation_config.json, and a LoRA run's adapter_config.json
        for path in meta.iterdir():
            if path.is_file() and path.name != CONFIG_NAME:
                shutil.copy2(path, tmp / path.name)
        if lora is not None:
            _write_adapter(tensors, out_dtype, tmp)
            (tmp / BASE_INIT).unlink(missing_ok=True)
            if rebuilt:
                _write_base(meta, config, tmp / BASE_DIR, out_dtype)
                lora.base_model_name_or_path = str(out_dir.resolve() / BASE_DIR)
                lora.save_pretrained(str(tmp))
            if merge:  # a rebuilt base lies in tmp until the folder is renamed into place
                _merge(tmp, tmp / BASE_DIR if rebuilt else lora.base_model_name_or_path, out_dtype)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_adapter(tensors: dict[str, Stored], dtype: torch.dtype, folder: Path) -> None:
    """PEFT's ``adapter_model.safetensors`` (adapters are small: one file, no shards)."""
    load = functools.lru_cache(maxsize=max(len(t.paths) for t in tensors.values()))(load_layer)
    weights = {key: t.read(load).to(dtype, copy=True).contiguous() for key, t in tensors.items()}
    save_file(weights, folder / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})


def _write_base(meta: Path, config: PretrainedConfig, folder: Path, dtype: torch.dtype) -> None:
    """The base a LoRA run trained on when its model folder held no weights: rebuilt as the
    ranks built it (each layer under ``seed + index``, the family's HF initialisation), in
    the run's dtype, and saved as transformers saves a model (whole, in memory once)."""
    init = json.loads((meta / BASE_INIT).read_text())
    specs = layout_free_specs(
        layer_specs(config),
        dtype=to_dtype(init["dtype"]),
        seed=init["seed"],
        initialize=hf_initializer(config),
    )
    state = {}
    for _, spec in saved_layers(specs):
        layer = spec.build()
        own = layer.state_dict()
        state.update({hf: own[local] for local, hf in hf_keys(layer).items()})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(model.all_tied_weights_keys):
        raise ExportError(
            f"the rebuilt base model's tensors are not the HF model's: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.save_pretrained(folder)


def _merge(folder: Path, base_dir: str | Path | None, dtype: torch.dtype) -> None:
    """Replace the adapter in ``folder`` by the merged model, W + (lora_alpha / r) B A,
    through PEFT's own ``merge_and_unload`` on the base model in ``base_dir`` (the whole
    model is held in memory once, in ``dtype``); a rebuilt base goes with it."""
    assert base_dir is not None  # export_checkpoint checked or rebuilt it
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    with peft_model_warnings():
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    for name in (SAFETENSORS_WEIGHTS_NAME, ADAPTER_CONFIG):
        (folder / name).unlink()
    shutil.rmtree(folder / BASE_DIR, ignore_errors=True)
    merged.save_pretrained(folder)
