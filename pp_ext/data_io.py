"""Load a recipe's raw records (train or eval) with Hugging Face ``datasets``.

Everything is ``datasets.load_dataset``: its packaged builders read local
jsonl/json/csv/parquet/txt files, folders and globs, and the same call fetches hub
datasets, caching as ``datasets`` always does. This module only maps the recipe's
``data`` section onto that call and turns the usual mistakes into one-line errors
that name the recipe key to fix.

A ``.txt`` file is one document (``sample_by="document"``), so the text pipeline
appends one EOS per file rather than one per line. A folder's files are split by
their names as ``datasets`` does (``train.jsonl``, ``validation.jsonl``, ...), so
``data.eval_split: validation`` picks the held-out file.
"""
from __future__ import annotations

import glob
import os

import datasets

from pp_ext.recipe import RecipeError
from pp_ext.recipe_schema import DataConfig

# file extension -> datasets packaged builder
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FORMATS = ("auto", "json", "csv", "parquet", "text", "hub")
SPLITS = ("train", "eval")


class DataError(RecipeError):
    """A data problem the user fixes in the recipe's ``data`` section or in the files."""


def _local_files(path: str) -> list[str]:
    pattern = os.path.join(path, "**", "*") if os.path.isdir(path) else path
    return sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))


def dataset_source(cfg: DataConfig) -> tuple[str, dict]:
    """``(path, kwargs)`` for ``datasets.load_dataset`` from ``data.path`` and ``data.format``."""
    if cfg.format not in FORMATS:
        raise DataError(f"data.format {cfg.format!r} is unknown: choose one of {', '.join(FORMATS)}")
    if cfg.format == "hub":
        return cfg.path, {}
    files = _local_files(cfg.path)
    if not files:
        raise DataError(f"data.path {cfg.path} does not exist: give a local file, folder or glob, "
                        "or a hub dataset name with data.format=hub")
    if cfg.format != "auto":
        builder = cfg.format
    else:
        kinds = {BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files} - {None}
        if len(kinds) != 1:
            found = sorted({os.path.splitext(f)[1] or f for f in files})
            raise DataError(f"data.path {cfg.path}: cannot tell the format from the files' extensions "
                            f"({', '.join(found)}): set data.format to one of {', '.join(FORMATS[1:-1])}")
        builder = kinds.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    if os.path.isdir(cfg.path):  # datasets names the splits after the file names
        return builder, {"data_dir": cfg.path, **options}
    return builder, {"data_files": files, **options}


def _split(dataset: datasets.DatasetDict, name: str, key: str, cfg: DataConfig) -> datasets.Dataset:
    if name not in dataset:
        raise DataError(f"{key} {name!r} is not a split of {cfg.path} (splits: {', '.join(dataset)}): "
                        f"set {key} to one of them")
    return dataset[name]


def load_records(cfg: DataConfig, split: str, seed: int = 0) -> datasets.Dataset | None:
    """The raw records of ``split`` ("train" or "eval"); None for "eval" without eval data.

    Eval data is ``data.eval_split`` (another split of the same dataset) or, with
    ``data.eval_fraction``, a held-out part of ``data.split`` drawn with ``seed``
    (``Dataset.train_test_split``: the same seed gives the same two parts, and the
    train records never include the held-out ones).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.eval_split and cfg.eval_fraction:
        raise DataError("set one of data.eval_split and data.eval_fraction, not both")
    if split == "eval" and not (cfg.eval_split or cfg.eval_fraction):
        return None
    path, kwargs = dataset_source(cfg)
    loaded = datasets.load_dataset(path, **kwargs)
    if split == "eval" and cfg.eval_split:
        return _split(loaded, cfg.eval_split, "data.eval_split", cfg)
    records = _split(loaded, cfg.split, "data.split", cfg)
    if not cfg.eval_fraction:
        return records
    parts = records.train_test_split(test_size=cfg.eval_fraction, seed=seed)
    return parts["train" if split == "train" else "test"]
