"""The data pipeline (pp_ext.data.records, pp_ext.data.batches), the answer metric and the quickstart assets.

References are Hugging Face's own: a LlamaForCausalLM run on each record alone gives
the per-record losses a packed or padded sample must reproduce, and the shipped
tokenizer's chat template marks the assistant tokens.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from pp_ext.config.schema import DataConfig
from pp_ext.data import batches as data
from pp_ext.data import records as data_io
from pp_ext.data.records import DataError, load_records
from pp_ext.training.accuracy import answer_accuracy, answer_counts

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "models" / "quickstart"
REVERSE = ROOT / "recipes" / "data" / "reverse"
RECORDS = [
    {"prompt": "reverse ab =", "completion": " ba"},
    {"prompt": "reverse xyz =", "completion": " zyx"},
    {"prompt": "reverse q =", "completion": " q"},
]
CHATS = [
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}],
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(QUICKSTART)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(QUICKSTART, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def samples(tok, rows, **kw) -> datasets.Dataset:
    return data.tokenize(datasets.Dataset.from_list(rows), tok, cfg("unused", **kw))


def ids(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(list(text))


# ---------------------------------------------------------------- loading


def write_all_formats(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    paths = {ext: folder / f"records.{ext}" for ext in ("jsonl", "json", "csv", "parquet")}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    paths["json"].write_text(json.dumps(RECORDS))
    datasets.Dataset.from_list(RECORDS).to_csv(paths["csv"], index=False)
    datasets.Dataset.from_list(RECORDS).to_parquet(paths["parquet"])
    return paths


def test_every_local_format_loads_the_same_records(tmp_path):
    for path in write_all_formats(tmp_path / "f").values():
        assert load_records(cfg(path), "train").to_list() == RECORDS, path
    assert load_records(cfg(tmp_path / "f" / "*.jsonl"), "train").to_list() == RECORDS  # a glob
    odd = tmp_path / "records.log"
    odd.write_text((tmp_path / "f" / "records.jsonl").read_text())
    assert load_records(cfg(odd, format="json"), "train").to_list() == RECORDS  # format given
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("one\ntwo lines\n")
    (texts / "b.txt").write_text("three")
    assert sorted(load_records(cfg(texts), "train")["text"]) == [
        "one\ntwo lines\n",
        "three",
    ]  # file = document


def test_loading_prints_no_progress_bar(tmp_path, capfd):
    """The first run builds datasets' cache: its "Generating train split" bars stay out
    of the training log (issue 25, point 3), and datasets' switch is given back."""
    path = write_all_formats(tmp_path / "f")["jsonl"]
    capfd.readouterr()  # the csv and parquet writers' bars
    assert datasets.is_progress_bar_enabled()
    assert load_records(cfg(path), "train").to_list() == RECORDS
    assert capfd.readouterr().err == ""
    assert datasets.is_progress_bar_enabled()


def test_eval_split_from_file_names_and_eval_fraction(tmp_path):
    train, evals = (
        load_records(cfg(REVERSE, eval_split="validation"), "train"),
        load_records(cfg(REVERSE, eval_split="validation"), "eval"),
    )
    assert (len(train), len(evals)) == (6000, 300)
    assert load_records(cfg(REVERSE), "eval") is None
    part = cfg(REVERSE / "train.jsonl", eval_fraction=0.1)
    a, b = load_records(part, "train", seed=3), load_records(part, "eval", seed=3)
    assert (len(a), len(b)) == (5400, 600)
    assert not set(a["prompt"]) & set(b["prompt"])
    assert set(a["prompt"]) | set(b["prompt"]) == set(train["prompt"])
    assert load_records(part, "eval", seed=3)["prompt"] == b["prompt"]  # deterministic
    assert load_records(part, "eval", seed=4)["prompt"] != b["prompt"]  # but the seed's


@pytest.mark.parametrize(
    "config, split, message",
    [
        (dict(path="nowhere/x.jsonl"), "train", "data.path nowhere/x.jsonl does not exist"),
        (dict(path=str(REVERSE), format="xml"), "train", "data.format 'xml' is unknown"),
        (dict(path=str(REVERSE), split="dev"), "train", "data.split 'dev' is not a split of"),
        (
            dict(path=str(REVERSE), eval_split="test"),
            "eval",
            "data.eval_split 'test' is not a split",
        ),
        (
            dict(path=str(REVERSE), eval_split="validation", eval_fraction=0.1),
            "train",
            "set one of data.eval_split",
        ),
    ],
)
def test_load_errors_name_the_recipe_key(config, split, message):
    with pytest.raises(DataError, match=message) as err:
        load_records(DataConfig(**config), split)
    assert "\n" not in str(err.value)


def test_split_columns_before_loading(tmp_path):
    """The columns the launcher checks before any rank starts: each split's, read from
    its first record, and plain text's one column; an empty split is refused."""
    assert data_io.split_columns(cfg(REVERSE, eval_split="validation")) == {
        "data.split": ["prompt", "completion"],
        "data.eval_split": ["prompt", "completion"],
    }
    (tmp_path / "doc.txt").write_text("a whole document\n")
    assert data_io.split_columns(cfg(tmp_path / "doc.txt")) == {"data.split": ["text"]}
    (tmp_path / "empty.csv").write_text("prompt,completion\n")
    with pytest.raises(
        DataError, match="data.split 'train' of data.path .*empty.csv has no records"
    ):
        data_io.split_columns(cfg(tmp_path / "empty.csv"))


def test_unreadable_data_is_one_line(tmp_path, monkeypatch, caplog):
    """A file datasets cannot parse, and a hub dataset it cannot reach, are one line
    naming data.path, from the first records and from the whole load alike; datasets'
    own error log is held back."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": no\n')
    expected = f"data.path {broken} cannot be read as json data: JSON parse error: Invalid value. in row 1: fix"
    for read in (lambda c: load_records(c, "train"), data_io.split_columns):
        with caplog.at_level(logging.ERROR), pytest.raises(DataError) as err:
            read(cfg(broken))
        assert str(err.value).startswith(expected) and not caplog.records, (
            str(err.value),
            caplog.records,
        )
    # offline as HF_HUB_OFFLINE=1 makes it (both libraries read it once, when imported)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_records(DataConfig(path="pp-ext-tests/no-such-dataset", format="hub"), "train")
    assert str(err.value).startswith(
        "data.path pp-ext-tests/no-such-dataset (data.format=hub) cannot be loaded: "
        "Couldn't reach 'pp-ext-tests/no-such-dataset' on the Hub"
    ), str(err.value)
    assert (
        data_io.split_columns(DataConfig(path="pp-ext-tests/no-such-dataset", format="hub")) == {}
    )


def test_mixed_extensions_need_a_format(tmp_path):
    write_all_formats(tmp_path / "f")
    with pytest.raises(
        DataError,
        match=r"cannot tell the format .*\(.csv, .json, .jsonl, .parquet\): set data.format",
    ):
        load_records(cfg(tmp_path / "f"), "train")


def test_column_errors_name_the_columns_and_the_key(tok):
    rows = [{"body": "x"}]
    with pytest.raises(DataError, match=r"columns: body\): set data.text_field"):
        samples(tok, rows)
    with pytest.raises(
        DataError, match=r"data.prompt_field 'prompt' is not a column .*columns: body"
    ):
        samples(tok, rows, kind="prompt_completion")
    with pytest.raises(DataError, match="data.kind 'qa' is unknown"):
        samples(tok, rows, kind="qa")
    assert (
        data.detect_kind(
            ["question", "answer"], cfg("x", prompt_field="question", completion_field="answer")
        )
        == "prompt_completion"
    )
    plain = AutoTokenizer.from_pretrained(QUICKSTART)
    plain.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template: set model.tokenizer"):
        samples(plain, [{"messages": CHATS[1]}])


# ---------------------------------------------------------------- tokenisation


def test_text_packing_by_hand(tok):
    """Documents "ab", "cde": <s>ab</s><s>cde</s> cut into blocks of 3, the remainder dropped."""
    out = samples(tok, [{"text": "ab"}, {"text": "cde"}], seq_len=3)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    a, b, c, d, e = ids(tok, "abcde")
    assert out[:]["input_ids"].tolist() == [[bos, a, b], [eos, bos, c], [d, e, eos]]
    # block 1's last label is the document's next token (in block 2); </s> -> <s> is a boundary
    assert out[:]["labels"].tolist() == [[a, b, eos], [-100, c, d], [e, eos, -100]]
    # positions restart at each document and at a block start (the continued "ab</s>")
    assert out[:]["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1], [0, 1, 2]]
    assert out[:]["attention_mask"].tolist() == [[1] * 3] * 3


def record_losses(model, tok, rows) -> list[torch.Tensor]:
    """Summed loss of each record run alone through HF, targets from HF-style unshifted labels."""
    losses = []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        answer = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = torch.tensor([prompt + answer])
        hf_labels = torch.tensor([[-100] * len(prompt) + answer])  # HF shifts these itself
        logits = model(input_ids=x).logits
        losses.append(F.cross_entropy(logits[0, :-1], hf_labels[0, 1:], reduction="sum"))
    return losses


def sample_loss(model, batch) -> torch.Tensor:
    # HF detects packed documents from position ids only without a mask and a KV cache
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=None if batch["attention_mask"].all() else batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")


@pytest.mark.parametrize("pack", [False, True])
def test_records_padded_or_packed_give_hf_per_record_losses(tok, model, pack):
    rows = RECORDS * 3
    out = samples(tok, rows, seq_len=40, pack=pack)
    assert len(out) == (5 if pack else len(rows))  # 9 records of 15-17 tokens, 2 per 40-token row
    with torch.no_grad():
        ours = sample_loss(model, out[:])
        reference = sum(record_losses(model, tok, rows))
    assert abs(ours - reference) <= 1e-5 * reference
    labelled = out[:]["labels"][out[:]["labels"] != -100]
    answers = "".join(r["completion"] + tok.eos_token for r in rows)
    assert tok.decode(labelled) == answers  # prompt tokens never get a label


def test_text_packing_equals_documents_run_alone(tok, model):
    texts = ["the cat sat", "on a mat today", "and slept", "zzz"]
    out = samples(tok, [{"text": t} for t in texts], seq_len=16)
    with torch.no_grad():
        ours = sample_loss(model, out[:])
        stream = [t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]]
        kept = stream[: len(out) * 16 + 1]  # the packed tokens and the next one (last label)
        reference = torch.tensor(0.0)
        for block in range(len(out)):  # each block's document pieces as separate sequences
            row = out[block]
            starts = (row["position_ids"] == 0).nonzero().flatten().tolist() + [16]
            for s, e in zip(starts, starts[1:]):
                piece = kept[block * 16 + s : block * 16 + e + 1]
                logits = model(input_ids=torch.tensor([piece[: e - s]])).logits[0]
                targets = torch.tensor(piece[1:])
                if len(targets) < e - s:
                    logits = logits[: len(targets)]
                crosses = (
                    torch.tensor(piece[: len(targets)]) == tok.eos_token_id
                )  # </s> predicts nothing
                reference = reference + F.cross_entropy(
                    logits[~crosses], targets[~crosses], reduction="sum"
                )
    assert abs(ours - reference) <= 1e-5 * reference


def test_truncation_is_counted(tok, caplog):
    rows = [{"prompt": "reverse abcdefghij =", "completion": " jihgfedcba"}] + RECORDS
    with caplog.at_level(logging.WARNING, logger="pp_ext.data.batches"):
        out = samples(tok, rows, seq_len=20, pack=False)
    assert "1 of 4 records are longer than data.seq_len=20" in caplog.text
    assert out[:]["input_ids"].shape == (4, 20)
    assert out[:]["labels"][0, -1] == -100  # the cut-off next token is not a label


def chat_labels(tok, out) -> list[str]:
    """The labelled tokens of each row, decoded, runs separated by |."""
    rows = []
    for labels in out[:]["labels"]:
        runs, current = [], []
        for label in labels.tolist() + [-100]:
            if label == -100 and current:
                runs.append(tok.decode(current))
                current = []
            elif label != -100:
                current.append(label)
        rows.append("|".join(runs))
    return rows


def test_chat_labels_only_assistant_turns(tok):
    out = samples(tok, [{"messages": m} for m in CHATS], seq_len=64, pack=False)
    assert chat_labels(tok, out) == ["yo</s>|4</s>", "cba</s>"]
    first = tok.convert_ids_to_tokens(out[:]["input_ids"][0][:4])
    assert first == ["<s>", "<|system|>", "\n", "b"]
    # a template without {% generation %} markers (prefix rendering): the same tokens, and the
    # turns' labels now also take what the template writes after a turn (here a newline)
    plain = AutoTokenizer.from_pretrained(QUICKSTART)
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    again = samples(plain, [{"messages": m} for m in CHATS], seq_len=64, pack=False)
    assert torch.equal(again[:]["input_ids"], out[:]["input_ids"])
    assert chat_labels(tok, again) == ["yo</s>\n|4</s>\n", "cba</s>\n"]


def test_shipped_tokenizer_round_trips_the_task(tok):
    for path in REVERSE.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            text = record["prompt"] + record["completion"]
            encoded = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in encoded and tok.decode(encoded) == text
            assert len(encoded) == len(text)  # one token per character: reversal is token-level


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_assets_are_what_their_scripts_make(tmp_path):
    load_script(QUICKSTART / "make.py").main(tmp_path / "model")
    load_script(REVERSE.parent / "make_reverse.py").main(tmp_path / "reverse")
    for folder, made in ((QUICKSTART, tmp_path / "model"), (REVERSE, tmp_path / "reverse")):
        names = sorted(p.name for p in made.iterdir())
        # HF stamps its own version into the configs it writes: a newer transformers
        # makes the same model, so that one field is left out of the comparison
        configs = [
            n
            for n in names
            if n.endswith(".json") and "transformers_version" in json.loads((made / n).read_text())
        ]
        for name in configs:
            shipped, remade = (json.loads((root / name).read_text()) for root in (folder, made))
            shipped.pop("transformers_version"), remade.pop("transformers_version")
            assert shipped == remade, name
        others = [n for n in names if n not in configs]
        assert filecmp.cmpfiles(folder, made, others, shallow=False)[0] == others
    config = AutoConfig.from_pretrained(QUICKSTART)
    assert config.model_type == "llama" and config.vocab_size == len(
        AutoTokenizer.from_pretrained(QUICKSTART)
    )
    train, held_out = (
        set(load_records(cfg(REVERSE / f), "train")["prompt"])
        for f in ("train.jsonl", "validation.jsonl")
    )
    assert not train & held_out


# ---------------------------------------------------------------- micro-batches


def numbered(n: int, seq_len: int = 3) -> datasets.Dataset:
    """Samples whose input_ids are all their index, so a batch tells which samples it holds."""
    rows = [
        {
            "input_ids": [i] * seq_len,
            "attention_mask": [1] * seq_len,
            "position_ids": list(range(seq_len)),
            "labels": [i] * seq_len,
        }
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows).with_format("torch")


def take(n, **kw) -> list[list[int]]:
    """``n`` micro-batches as lists of sample indices, checking every tensor on the way."""
    out = []
    it = data.micro_batches(**kw)
    for _ in range(n):
        (x, mask, pos), labels = next(it)
        mbs = kw["micro_batch_size"]
        for t in (x, mask, pos, labels):
            assert t.shape == (mbs, 3) and t.dtype == torch.int64
        assert torch.equal(x, labels)
        out.append(x[:, 0].tolist())
    return out


def test_micro_batches_shard_and_do_not_depend_on_the_data_degree():
    ds = numbered(50)  # global batch 2 x 4 = 8: 6 steps per epoch, 2 samples left over
    base = dict(dataset=ds, micro_batch_size=2, seed=7)
    steps = 14  # over two epoch boundaries
    one = take(4 * steps, **base, micro_batches=4, dp_rank=0, dp_size=1)
    two = [take(2 * steps, **base, micro_batches=2, dp_rank=d, dp_size=2) for d in range(2)]
    for s in range(steps):
        ranks = [two[d][2 * s : 2 * s + 2] for d in range(2)]
        assert sorted(ranks[0] + ranks[1]) == sorted(
            one[4 * s : 4 * s + 4]
        )  # same step, any degree
        # rank d's k-th micro-batch is global micro-batch k * dp + d
        assert [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]] == one[4 * s : 4 * s + 4]
    for epoch in range(2):
        seen = [i for mb in one[epoch * 24 : (epoch + 1) * 24] for i in mb]
        assert len(seen) == len(set(seen)) == 48  # an epoch never repeats a sample
    assert one[:24] != one[24:48]  # each epoch its own order


def test_micro_batches_resume_exactly():
    base = dict(dataset=numbered(50), micro_batch_size=2, micro_batches=2, dp_size=2, seed=7)
    for rank in range(2):
        full = take(2 * 20, **base, dp_rank=rank)
        for start in (1, 6, 13):  # 6 steps per epoch: 6 and 13 resume inside a later epoch
            assert (
                take(2 * (20 - start), **base, dp_rank=rank, start_step=start) == full[2 * start :]
            )


def test_micro_batches_need_one_global_batch():
    with pytest.raises(DataError, match="the data has 5 samples, fewer than one global batch of 8"):
        next(
            data.micro_batches(
                numbered(5), micro_batch_size=2, micro_batches=2, dp_rank=0, dp_size=2, seed=0
            )
        )


# ---------------------------------------------------------------- metric


def test_answer_accuracy_counts_whole_answers():
    labels = torch.tensor(
        [
            [-100, 3, 4, -100, -100, 5, -100],  # two packed answers
            [-100, -100, 1, 2, 2, -100, -100],
        ]
    )
    logits = F.one_hot(labels.clamp(min=0), 8).float()
    assert answer_counts(logits, labels).tolist() == [3, 3]
    logits[0, 2] = F.one_hot(torch.tensor(6), 8).float()  # one token of the first answer wrong
    logits[1, 0] = F.one_hot(torch.tensor(6), 8).float()  # an unlabelled position: no effect
    assert answer_counts(logits, labels).tolist() == [2, 3]
    assert answer_accuracy(logits, labels) == pytest.approx(2 / 3)
    # a run continuing across a row end is two answers (rows are separate sequences)
    assert answer_counts(
        F.one_hot(torch.ones(2, 2, dtype=torch.long), 3).float(), torch.ones(2, 2, dtype=torch.long)
    ).tolist() == [2, 2]
