"""pp-ext bench --lora: pp-ext's pipeline next to DeepSpeed ZeRO-3 + PEFT on the same LoRA
run. The expected figures come from PEFT's own model and the recipe's sizes: the same
trainable parameters (PEFT's count) and tokens per step on every row, the same losses
step by step (the same training), and optimizer state sized by the adapters. Timings
are reported, not asserted."""

from __future__ import annotations

import json
import warnings

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from pp_ext.cli import main

MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 16
TARGETS = "[q_proj,v_proj,down_proj]"


def overrides(model: str) -> list[str]:
    return [
        f"model.path={model}",
        "peft.type=lora",
        "peft.r=4",
        "peft.lora_alpha=8",
        f"peft.target_modules={TARGETS}",
        f"parallel.micro_batches={MICRO_BATCHES}",
        f"train.micro_batch_size={MICRO_BATCH_SIZE}",
        f"data.seq_len={SEQ}",
    ]


@pytest.mark.slow
def test_lora_bench_rows_train_the_same_adapters_on_the_same_tokens(capsys, tiny):
    code = main(
        [
            "bench",
            "--lora",
            "recipes/quickstart.yaml",
            *overrides(tiny),
            "--schedules",
            "zbv",
            "--warmup",
            "0",
            "--repeats",
            "2",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["engine"]: row for row in report["rows"]}
    assert list(rows) == ["pp-ext zbv", "zero-3 + peft"]
    with warnings.catch_warnings():  # peft 0.21 reads a name transformers deprecates
        warnings.simplefilter("ignore", FutureWarning)
        reference = get_peft_model(
            AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(tiny)),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        )
    trainable = reference.get_nb_trainable_parameters()[0]
    zero3 = rows["zero-3 + peft"]
    assert zero3["losses"][-1] < zero3["losses"][0] - 1e-3, zero3["losses"]
    for name, row in rows.items():
        assert row["trainable"] == trainable, name
        assert row["tokens_per_step"] == MICRO_BATCHES * MICRO_BATCH_SIZE * SEQ, name
        assert row["batch_digest"] == zero3["batch_digest"], name
    for name, row in rows.items():  # the same training: 2 timed steps and the measured one
        assert len(row["losses"]) == 2 + 1 and row["tokens_per_s"] > 0
        assert row["losses"] == pytest.approx(zero3["losses"], rel=1e-5), name
        held = row["memory"]
        assert len(held) == 2 and all(
            rank[kind] > 0 for rank in held for kind in ("weights", "activations")
        )
        # fp32 gradients of the adapters only, split over the ranks
        assert sum(rank["gradients"] for rank in held) == 4 * trainable, name
    # AdamW's two fp32 moments per adapter element (and a 4-byte step count per tensor);
    # ZeRO-3 also keeps an fp32 copy of its partition
    for name, per_element in (("pp-ext zbv", 8), ("zero-3 + peft", 12)):
        optimizer = sum(rank["optimizer"] for rank in rows[name]["memory"])
        assert per_element * trainable <= optimizer <= per_element * trainable + 4 * 64, name


@pytest.mark.parametrize(
    "args,message",
    [
        (["peft.type=none"], "the recipe trains in full (peft.type none)"),
        (["parallel.micro_batches=3"], "parallel.micro_batches=3 cannot be split over ZeRO-3's 2"),
        (["peft.target_modules=[nope]"], "peft.target_modules ['nope'] matches no module"),
        (["--seq", "32"], "--seq is not read by the LoRA bench: set data.seq_len=VALUE"),
        (["--model", "M"], "--model and --lora are two benches"),
        (["--schedules", "zbw"], "unknown schedule 'zbw'"),
    ],
)
def test_lora_bench_refuses_bad_input_before_launching(capsys, tiny, args, message):
    assert main(["bench", "--lora", "recipes/quickstart.yaml", *overrides(tiny), *args]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("pp-ext: error: ") and message in err and len(err.strip().splitlines()) == 1
    ), err


def test_recipe_overrides_need_the_lora_bench(capsys):
    assert main(["bench", "peft.r=4"]) == 2
    assert "peft.r=4: recipe overrides are read by the LoRA bench" in capsys.readouterr().err
