"""Checks of a training launch's inputs that need no process group: each rank runs
them before it joins one (:func:`pp_ext.train.check_before_launch`, and ``pp-ext
plan`` / ``tune`` through it), so a mistake is one line and exit code 2 on every
rank, with nothing written, instead of a traceback once the ranks run.

The model against its tokenizer and its data: every token id the tokenizer can
produce must index the embedding (past it, a CPU run dies with an ``IndexError``
and a GPU run with a device-side assert that names nothing), and a learned absolute
position table (GPT-2's ``wpe``) must hold ``data.seq_len`` positions. The run's
folders must be folders this user can write. The data's first records must have
the columns of ``data.kind`` (:func:`pp_ext.data.check`).

transformers, torch and datasets are imported inside the functions, as in
:mod:`pp_ext.train`: ``pp-ext plan`` imports this module and starts fast.
"""
from __future__ import annotations

import os
from pathlib import Path

from pp_ext.recipe import RecipeError

# what transformers' AutoTokenizer reads a tokenizer from (any one suffices)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_folder(recipe) -> Path:
    return Path(recipe.model.tokenizer or recipe.model.path)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path):
    """The tokenizer in ``folder``; one that transformers cannot read is a RecipeError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for broken files
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise RecipeError(f"the tokenizer in {folder} cannot be loaded ({first}): set model.tokenizer to a "
                          f"Hugging Face tokenizer folder") from None


def check_tokenizer(recipe, config) -> None:
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
        raise RecipeError(f"the tokenizer in {folder} has token ids up to {highest} ({highest + 1} tokens), but "
                          f"model.path {recipe.model.path} has vocab_size {vocab}: use the model's own tokenizer "
                          f"(model.tokenizer), or a model whose embedding has at least {highest + 1} rows "
                          f"(resize_token_embeddings({highest + 1}) and save_pretrained)")


def check_positions(recipe, config) -> None:
    """``data.seq_len`` fits a learned absolute position table. Packed documents
    restart their positions, so a shorter table only fails on the first document
    longer than it: refused here, whatever the data."""
    from pp_ext.hf import position_table

    rows = position_table(config)
    if rows is not None and recipe.data.seq_len > rows:
        raise RecipeError(f"data.seq_len={recipe.data.seq_len} is longer than the learned position table of "
                          f"model.path {recipe.model.path} ({config.model_type}: {rows} positions): set "
                          f"data.seq_len <= {rows}")


def _writable_folder(key: str, path: Path) -> None:
    """``path`` is a folder, or can be made one, by this user."""
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{key} {path} is a file: give a folder (made if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RecipeError(f"{key} {path} cannot be made: {existing} is a file: give a folder (made if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"{key} {path} cannot be written: {existing} is not writable by this user: give a "
                          f"folder you can write")


def check_folders(recipe, save_dir: Path) -> None:
    """The run's folders: ``output_dir`` and the checkpoints' ``save_dir``."""
    _writable_folder("output_dir", Path(recipe.output_dir))
    _writable_folder("checkpoint.dir", save_dir)  # default: output_dir/checkpoints


def check_data(recipe) -> None:
    """The data is there, readable, of the kind the recipe says, with a tokenizer it
    needs (:func:`pp_ext.data.check`)."""
    from pp_ext import data

    folder = tokenizer_folder(recipe)
    if not has_tokenizer(folder):
        raise RecipeError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): set model.tokenizer "
                          f"to the folder that has them (a config-only model folder has none)")
    data.check(recipe.data, load_tokenizer(folder))
