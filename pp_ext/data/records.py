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

:func:`split_columns` reads only the first record of each split (``datasets``'
streaming mode: nothing loaded or cached), so the launcher can check the columns
before any rank starts.
"""

from __future__ import annotations

import glob
import os
from contextlib import contextmanager

import datasets
from datasets.exceptions import DatasetsError

from pp_ext.config.recipe import RecipeError
from pp_ext.config.schema import DataConfig

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
        raise DataError(
            f"data.format {cfg.format!r} is unknown: choose one of {', '.join(FORMATS)}"
        )
    if cfg.path is None:  # the recipe requires it wherever data is read
        raise DataError("data.path is not set: give a local file, folder or glob, or a hub dataset")
    if cfg.format == "hub":
        return cfg.path, {}
    files = _local_files(cfg.path)
    if not files:
        raise DataError(
            f"data.path {cfg.path} does not exist: give a local file, folder or glob, "
            "or a hub dataset name with data.format=hub"
        )
    if cfg.format != "auto":
        builder = cfg.format
    else:
        extensions = {os.path.splitext(f)[1].lower() for f in files}
        kinds = {BUILDERS[e] for e in extensions if e in BUILDERS}
        if len(kinds) != 1:
            found = sorted({os.path.splitext(f)[1] or f for f in files})
            raise DataError(
                f"data.path {cfg.path}: cannot tell the format from the files' extensions "
                f"({', '.join(found)}): set data.format to one of {', '.join(FORMATS[1:-1])}"
            )
        builder = kinds.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    if os.path.isdir(cfg.path):  # datasets names the splits after the file names
        return builder, {"data_dir": cfg.path, **options}
    return builder, {"data_files": files, **options}


def _innermost(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # datasets wraps the parser's error in its own
        exc = exc.__cause__
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def _reading(cfg: DataConfig, builder: str):
    """What ``datasets`` (or pyarrow under it) raises on data it cannot read or reach, as
    one :class:`DataError` naming ``data.path``; datasets' own error log, which says the
    same, is held back, and so are its progress bars (the first run's "Generating train
    split", in the middle of the training log)."""
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    except DataError:
        raise
    except (
        DatasetsError,
        ConnectionError,
        FileNotFoundError,
        ValueError,
    ) as exc:  # pyarrow's are ValueErrors
        if cfg.format == "hub":
            raise DataError(
                f"data.path {cfg.path} (data.format=hub) cannot be loaded: {_innermost(exc)}: check "
                "the dataset's name, and that the hub is reachable or the dataset in datasets' "
                "cache"
            ) from exc
        raise DataError(
            f"data.path {cfg.path} cannot be read as {builder} data: {_innermost(exc)}: fix the "
            f"file, or set data.format to its format"
        ) from exc
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _split(dataset: datasets.DatasetDict, name: str, key: str, cfg: DataConfig) -> datasets.Dataset:
    if name not in dataset:
        raise DataError(
            f"{key} {name!r} is not a split of {cfg.path} (splits: {', '.join(dataset)}): "
            f"set {key} to one of them"
        )
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
    with _reading(cfg, path):
        loaded = datasets.load_dataset(path, **kwargs)
    if split == "eval" and cfg.eval_split:
        return _split(loaded, cfg.eval_split, "data.eval_split", cfg)
    records = _split(loaded, cfg.split, "data.split", cfg)
    if not cfg.eval_fraction:
        return records
    parts = records.train_test_split(test_size=cfg.eval_fraction, seed=seed)
    return parts["train" if split == "train" else "test"]


def split_columns(cfg: DataConfig) -> dict[str, list[str]]:
    """The columns of each split a run reads, by recipe key (``data.split``, and
    ``data.eval_split`` when set; ``data.eval_fraction`` holds out records of
    ``data.split``), from its first record read in ``datasets``' streaming mode:
    nothing is loaded or cached. Plain text has one column, ``text``, and a record is
    a whole file, so none is read. Empty for a hub dataset, which reading may
    download (it is checked when loaded)."""
    if cfg.format == "hub":
        return {}
    path, kwargs = dataset_source(cfg)
    splits = {
        "data.split": cfg.split,
        **({"data.eval_split": cfg.eval_split} if cfg.eval_split else {}),
    }
    columns = {}
    with _reading(cfg, path):
        loaded = datasets.load_dataset(path, streaming=True, **kwargs)
        for key, name in splits.items():
            records = _split(loaded, name, key, cfg)
            first = {"text": None} if path == "text" else next(iter(records), None)
            if first is None:
                raise DataError(
                    f"{key} {name!r} of data.path {cfg.path} has no records: give data with at "
                    f"least one"
                )
            columns[key] = list(first)
    return columns
