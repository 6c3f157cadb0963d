"""Records -> fixed-length training samples -> the pipeline engine's micro-batches.

A sample is four int64 columns of length ``data.seq_len``: ``input_ids``,
``attention_mask``, ``position_ids`` and pre-shifted ``labels`` (``labels[t]`` is the
token that should follow position ``t``, -100 where no loss is taken), the contract
of :mod:`pp_ext.hf.llama`'s first and last stages. Tokenisation runs through
``datasets.map`` (batched, ``data.num_proc`` workers) so it is cached and
fingerprinted by ``datasets``.

Two passes. First every record becomes one *document*: its token ids and a 0/1
``targets`` flag per token (is this token learned?): all tokens of plain text, the
completion and EOS of a prompt/completion record, the assistant turns of a chat.
Then documents become samples, and ``labels[t] = ids[t+1]`` only when ``t+1`` is a
target of the same document, so no label ever crosses a document boundary:

* plain text with ``data.pack``: documents (EOS appended) are concatenated and cut
  into ``seq_len`` blocks, the remainder of each ``datasets.map`` batch dropped, as
  transformers' ``run_clm.py`` ``group_texts`` does; positions restart at every
  document start and block start, which is how HF models recognise packed
  sequences (``transformers.masking_utils.find_packed_sequence_indices``);
* records (or text without ``data.pack``), truncated to ``seq_len``: padded one per
  sample (pad token, attention 0, labels -100), or with ``data.pack`` packed in order
  several per sample with restarting positions; the packed filler is a last pad
  "document" with attention 1, because HF only detects packing from positions when
  the attention mask is all ones.

:func:`micro_batches` then shuffles per epoch and deals global micro-batches to
data-parallel ranks so that one step's micro-batches do not depend on the data
degree, and resumes at any step.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator

import datasets
import torch
import torch.distributed as dist
from transformers import BatchEncoding, PreTrainedTokenizerBase

from pp_ext.config.schema import DataConfig
from pp_ext.data import IGNORE_INDEX
from pp_ext.data.records import DataError, load_records, split_columns

KINDS = ("text", "prompt_completion", "chat")
COLUMNS = ("input_ids", "attention_mask", "position_ids", "labels")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
log = logging.getLogger(__name__)


def detect_kind(columns: list[str], cfg: DataConfig) -> str:
    """``data.kind``, or the kind whose columns the records have when it is "auto"."""
    need = {
        "text": [("data.text_field", cfg.text_field)],
        "prompt_completion": [
            ("data.prompt_field", cfg.prompt_field),
            ("data.completion_field", cfg.completion_field),
        ],
        "chat": [("data.messages_field", cfg.messages_field)],
    }
    if cfg.kind == "auto":
        for kind in ("chat", "prompt_completion", "text"):
            if all(column in columns for _, column in need[kind]):
                return kind
        raise DataError(
            f"data: no column tells the kind of records (columns: {', '.join(columns)}): set "
            "data.text_field, data.prompt_field + data.completion_field or data.messages_field"
        )
    if cfg.kind not in need:
        raise DataError(
            f"data.kind {cfg.kind!r} is unknown: choose one of auto, {', '.join(KINDS)}"
        )
    for key, column in need[cfg.kind]:
        if column not in columns:
            raise DataError(
                f"{key} {column!r} is not a column of data.path (columns: {', '.join(columns)}): "
                f"set {key} to one of them, or data.kind=auto if these are not {cfg.kind} records"
            )
    return cfg.kind


def _check_tokenizer(kind: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """What records of ``kind`` need of the tokenizer: an EOS token, and a chat template for chats."""
    if kind == "chat" and not tokenizer.chat_template:
        raise DataError(
            "data.kind is chat but the tokenizer has no chat template: set model.tokenizer to a "
            "tokenizer folder with one (chat_template.jinja or tokenizer_config.json)"
        )
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token: set one in its tokenizer_config.json")


def check(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """What :func:`tokenize` would refuse, found before any rank starts from the first
    record of each split (:func:`pp_ext.data.records.split_columns`): missing splits,
    unreadable files, the kind's columns, what the kind needs of the tokenizer. A hub
    dataset, read only when loaded, is checked against ``data.kind`` alone."""
    splits = split_columns(cfg)
    kinds = {detect_kind(columns, cfg) for columns in splits.values()} if splits else {cfg.kind}
    for kind in kinds:
        _check_tokenizer(kind, tokenizer)


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


def _assistant_targets_by_prefix(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict]
) -> tuple[list, list]:
    """Assistant-token flags for templates without ``{% generation %}`` markers.

    Each assistant turn spans from the rendering of the conversation before it with
    the generation prompt to the rendering that includes it (TRL's and axolotl's
    prefix method); tokens are flagged by their character offsets in the full text.
    """

    def render(conversation: list[dict], **kwargs) -> str:
        # tokenize=False renders text; transformers types all its return kinds as one
        return tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)  # type: ignore[return-value]

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
            if not (full.startswith(start) and full.startswith(end)):
                raise DataError(
                    "the tokenizer's chat template renders a conversation's beginning differently "
                    "from the whole conversation: add {% generation %} markers to it"
                )
            spans.append((len(start), len(end)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], [
        int(any(a <= s < b for a, b in spans)) for s, _ in encoded["offset_mapping"]
    ]


def _documents(batch: dict, *, kind: str, tokenizer: PreTrainedTokenizerBase, fields: dict) -> dict:
    """One batch of records -> ``input_ids`` and ``targets`` per record (first pass)."""
    eos = tokenizer.eos_token_id
    if kind == "text":
        ids = [_with_eos(x, eos) for x in tokenizer(batch[fields["text"]])["input_ids"]]
        targets = [[1] * len(x) for x in ids]
    elif kind == "prompt_completion":
        prompts = tokenizer(batch[fields["prompt"]])["input_ids"]
        answers = [
            _with_eos(x, eos)
            for x in tokenizer(batch[fields["completion"]], add_special_tokens=False)["input_ids"]
        ]
        ids = [p + a for p, a in zip(prompts, answers)]
        targets = [[0] * len(p) + [1] * len(a) for p, a in zip(prompts, answers)]
    elif GENERATION_TAG.search(tokenizer.get_chat_template()):
        # return_dict=True gives a BatchEncoding; transformers types all its return kinds as one
        out: BatchEncoding = tokenizer.apply_chat_template(  # type: ignore[assignment]
            batch[fields["messages"]], return_dict=True, return_assistant_tokens_mask=True
        )
        ids, targets = out["input_ids"], out["assistant_masks"]
    else:
        ids, targets = map(
            list,
            zip(*(_assistant_targets_by_prefix(tokenizer, m) for m in batch[fields["messages"]])),
        )
    return {"input_ids": ids, "targets": targets, "length": [len(x) for x in ids]}


def _labels(ids: list[int], targets: list[int]) -> list[int]:
    """Pre-shifted labels of one document: the next token where it is a target."""
    return [nxt if learn else IGNORE_INDEX for nxt, learn in zip(ids[1:], targets[1:])] + [
        IGNORE_INDEX
    ]


def _stream_blocks(batch: dict, *, seq_len: int) -> dict:
    """Concatenated documents cut into ``seq_len`` blocks (plain text with ``data.pack``)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc, targets in zip(batch["input_ids"], batch["targets"]):
        ids += doc
        # labels over the whole stream, so a block's last label is the document's next token
        labels += _labels(doc, targets)
        positions += range(len(doc))
    blocks = len(ids) // seq_len
    out: dict[str, list[list[int]]] = {
        "input_ids": [],
        "attention_mask": [[1] * seq_len] * blocks,
        "position_ids": [],
        "labels": [],
    }
    for b in range(blocks):
        cut = slice(b * seq_len, (b + 1) * seq_len)
        out["input_ids"].append(ids[cut])
        out["labels"].append(labels[cut])
        # a document continued from the previous block counts from 0 again
        starts = positions[cut]
        first_start = next((i for i, p in enumerate(starts) if p == 0), seq_len)
        out["position_ids"].append(list(range(first_start)) + starts[first_start:])
    return out


def _record_samples(batch: dict, *, seq_len: int, pad: int, pack: bool) -> dict:
    """Records truncated to ``seq_len``, padded one per sample or packed several per sample."""
    out: dict[str, list[list[int]]] = {name: [] for name in COLUMNS}
    row: dict[str, list[int]] = {name: [] for name in COLUMNS}

    def close(row: dict) -> None:
        free = seq_len - len(row["input_ids"])
        row["input_ids"] += [pad] * free
        row["labels"] += [IGNORE_INDEX] * free
        if pack:  # the filler is one more document: attention 1, its own positions
            row["attention_mask"] += [1] * free
            row["position_ids"] += range(free)
        else:  # as HF pads: attention 0, positions counting on
            row["attention_mask"] += [0] * free
            row["position_ids"] = list(range(seq_len))
        for name in COLUMNS:
            out[name].append(row[name])

    for doc, targets in zip(batch["input_ids"], batch["targets"]):
        doc, targets = doc[:seq_len], targets[:seq_len]
        if row["input_ids"] and (not pack or len(row["input_ids"]) + len(doc) > seq_len):
            close(row)
            row = {name: [] for name in COLUMNS}
        row["input_ids"] += doc
        row["attention_mask"] += [1] * len(doc)
        row["position_ids"] += range(len(doc))
        row["labels"] += _labels(doc, targets)
    if row["input_ids"]:
        close(row)
    return out


def tokenize(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> datasets.Dataset:
    """Fixed-length samples (``COLUMNS``, int64 torch format) from raw records."""
    kind = detect_kind(records.column_names, cfg)
    _check_tokenizer(kind, tokenizer)
    fields = {
        "text": cfg.text_field,
        "prompt": cfg.prompt_field,
        "completion": cfg.completion_field,
        "messages": cfg.messages_field,
    }
    # None runs in this process: datasets (5.x) starts a pool of worker processes for num_proc=1 too
    workers = cfg.num_proc if cfg.num_proc > 1 else None
    docs = records.map(
        functools.partial(_documents, kind=kind, tokenizer=tokenizer, fields=fields),
        batched=True,
        num_proc=workers,
        remove_columns=records.column_names,
        desc="tokenizing",
    )
    if kind == "text" and cfg.pack:
        layout = functools.partial(_stream_blocks, seq_len=cfg.seq_len)
    else:
        truncated = sum(n > cfg.seq_len for n in docs["length"])
        if truncated and (not dist.is_initialized() or dist.get_rank() == 0):
            log.warning(
                "%d of %d records are longer than data.seq_len=%d tokens and were truncated",
                truncated,
                len(docs),
                cfg.seq_len,
            )
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        layout = functools.partial(_record_samples, seq_len=cfg.seq_len, pad=pad, pack=cfg.pack)
    samples = docs.map(
        layout,
        batched=True,
        num_proc=workers,
        remove_columns=docs.column_names,
        desc="packing" if cfg.pack else "padding",
    )
    return samples.with_format("torch", columns=list(COLUMNS))


def load(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str, seed: int = 0
) -> datasets.Dataset | None:
    """:func:`pp_ext.data.records.load_records` then :func:`tokenize`; None when there is no eval data."""
    records = load_records(cfg, split, seed)
    return None if records is None else tokenize(records, tokenizer, cfg)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Whole global batches in one pass over the data (the last partial batch is skipped)."""
    if num_samples < global_batch:
        raise DataError(
            f"the data has {num_samples} samples, fewer than one global batch of {global_batch} "
            "(micro_batch_size x micro_batches x data-parallel ranks): add data or lower them"
        )
    return num_samples // global_batch


def micro_batches(
    dataset: datasets.Dataset,
    *,
    micro_batch_size: int,
    micro_batches: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[tuple[tuple, torch.Tensor]]:
    """Endless ``((input_ids, attention_mask, position_ids), labels)`` micro-batches of one rank.

    Epoch ``e`` visits the samples in ``torch.randperm`` order seeded with ``seed + e``.
    Step ``s`` takes the next ``micro_batches x dp_size`` groups of ``micro_batch_size``
    samples (global micro-batches ``j``); rank ``d`` gets ``j = k * dp_size + d`` as its
    ``k``-th. So a step's set of micro-batches depends only on the global batch, not on
    how it is split between data and accumulation (DeepSpeed sums gradients over both),
    and ``start_step`` resumes exactly where step ``start_step`` begins. The first and
    last pipeline stages of a data rank build identical iterators, as DeepSpeed needs.
    """
    per_step = micro_batches * dp_size
    per_epoch = steps_per_epoch(len(dataset), micro_batch_size * per_step)
    step, epoch = start_step, None
    order = torch.empty(0, dtype=torch.long)  # the epoch's order, drawn at its first step
    while True:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order = torch.randperm(
                len(dataset), generator=torch.Generator().manual_seed(seed + epoch)
            )
        first = (step % per_epoch) * per_step
        for k in range(micro_batches):
            j = first + k * dp_size + dp_rank
            batch = dataset[order[j * micro_batch_size : (j + 1) * micro_batch_size].tolist()]
            yield (
                (batch["input_ids"], batch["attention_mask"], batch["position_ids"]),
                batch["labels"],
            )
        step += 1
