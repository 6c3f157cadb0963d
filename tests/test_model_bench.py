"""pp-ext bench --model: one device, pp-ext's layer and train step next to transformers'
and DeepSpeed's own. Counts are device-independent, so the CPU checks what a GPU pays:
at pipeline 1 pp-ext's step asks no more of the host than DeepSpeed's engine on the
HF model. Timings are reported, not asserted."""

from __future__ import annotations

import json

import pytest
import torch

from pp_ext.cli import main
from pp_ext.testing.spawn import free_port, init_rank


@pytest.fixture(scope="module")
def world():
    from deepspeed import comm as dist

    if not dist.is_initialized():
        init_rank(0, 1, free_port())


def test_a_one_stage_step_asks_no_more_of_the_host_than_deepspeeds_engine(world, tiny):
    """One step of 4 micro-batches, bf16 + ZeRO-1: pp-ext reads the host and synchronises
    no more often than DeepSpeed's engine on transformers' model (which reads once per
    forward to look for packed documents, as pp-ext does once per chunk), and
    dispatches at most 3 % more aten ops; zb-h1 runs 1f1b's work at one stage. The
    first step's losses agree within bf16's rounding."""
    from pp_ext.bench import model as model_bench

    options = model_bench.ModelBenchOptions(
        model=tiny, device="cpu", micro_batch_size=2, seq=16, steps=1, warmup=0
    )
    config = model_bench.bench_config(options)
    engines = model_bench.build_engines(config, options, torch.device("cpu"))
    data = model_bench.batches(options, config.vocab_size)
    losses = {name: float(step(data)) for name, (_, step) in engines.items()}
    counts = {name: model_bench.count_step(step, data) for name, (_, step) in engines.items()}
    theirs, ours = counts[model_bench.BASELINE], counts["pp-ext 1f1b"]
    assert (
        ours["host_reads"] <= theirs["host_reads"]
        and ours["synchronizations"] <= theirs["synchronizations"]
    )
    assert ours["aten_ops"] <= 1.03 * theirs["aten_ops"], counts
    assert counts["pp-ext zb-h1"] == ours
    assert losses["pp-ext 1f1b"] == pytest.approx(losses[model_bench.BASELINE], rel=1e-2)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model", "M", "--stages", "2"],
            "--stages is read by the schedule bench (without --model)",
        ),
        (["--layers", "2"], "--layers is read by the one-device bench: add --model DIR"),
        (
            ["--model", "{tiny}", "--steps", "3", "--warmup", "3"],
            "--steps 3 leaves nothing to time after --warmup 3",
        ),
        (["--model", "/no/such/model"], "model folder /no/such/model does not exist"),
        (["--model", "{tiny}", "--schedules", "zbw"], "unknown schedule 'zbw'"),
        (["--expert", "2"], "--expert is read by the one-device bench: add --model DIR"),
        (
            ["--model", "{tiny}", "--expert", "2"],
            "--expert 2: {tiny} is a dense 'llama' model without routed experts",
        ),
        (
            ["--model", "{tiny}", "--expert", "3"],
            "--expert 3 splits the 4 micro-batches over 3 data ranks",
        ),
        (
            ["--model", "{tiny}", "--device", "cuda"],
            "--device cuda: no CUDA device is visible here",
        ),
    ],
)
def test_bench_model_refuses_bad_input_before_launching(capsys, tiny, args, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert main(["bench", *(a.format(tiny=tiny) for a in args)]) == 2
    err = capsys.readouterr().err
    message = message.format(tiny=tiny)
    assert (
        err.startswith("pp-ext: error: ") and message in err and len(err.strip().splitlines()) == 1
    )


@pytest.mark.slow
def test_bench_model_reports_layer_and_steps_side_by_side(capsys, tiny, tmp_path):
    saved = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            tiny,
            "--device",
            "cpu",
            "--layers",
            "2",
            "--seq",
            "16",
            "--micro-batch-size",
            "2",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--save",
            str(saved),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    report = json.loads(saved.read_text())
    assert report["decoder_layers"] == 2 and report["device"].startswith("cpu")
    layer = report["layer"]
    assert layer["layer"] == "LlamaDecoderLayer" and layer["tokens"] == 32
    assert set(layer["pp_ext"]) == {
        "forward",
        "forward_first_in_chunk",
        "context_build",
        "forward_split",
        "input_grad",
        "weight_grad",
        "backward",
    }
    assert all(value > 0 for value in [*layer["pp_ext"].values(), *layer["transformers"].values()])
    rows = report["steps"]
    assert [row["engine"] for row in rows] == [
        "deepspeed (HF model)",
        "pp-ext 1f1b",
        "pp-ext zb-h1",
    ]
    assert rows[0]["vs_deepspeed"] == 1.0 and rows[1]["vs_1f1b"] == 1.0 and "vs_1f1b" not in rows[0]
    for row in rows:
        assert len(row["step_times_s"]) == 3 and row["tokens_per_s"] == pytest.approx(
            4 * 32 / row["step_time_s"]
        )
        assert row["host_reads"] >= 0 and row["aten_ops"] > 0
    for row in rows:
        assert row["engine"] in table
    assert "pp-ext / transformers" in table


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bench_model_runs_an_moe_model_beside_deepspeeds_engine(capsys, tmp_path, family):
    """An MoE model (4 experts, top 2, the aux loss on at weight 0.5; Qwen3-MoE's first
    layer dense), fp32: DeepSpeed's engine on transformers' model and pp-ext at pipeline
    1 train to the same losses, step after step, within 1e-5 (HF's loss adds the aux
    loss itself, pp-ext's LanguageModelLoss from the stream); the timed layer is an MoE
    layer; each row has tokens/s and a peak memory. Qwen3-MoE adds the row of pipeline 2
    x data 2 x expert 2 (4 ranks, ZeRO-1 over the data ranks with DeepSpeed's MoE
    groups, each data rank half the micro-batches): the same losses too."""
    from hf_models import MOE_CONFIGS

    MOE_CONFIGS[family](False).save_pretrained(tmp_path / "model")
    saved = tmp_path / "bench.json"
    args = ["--model", str(tmp_path / "model"), "--device", "cpu", "--dtype", "float32"]
    args += ["--seq", "16", "--micro-batch-size", "2", "--steps", "3", "--warmup", "1"]
    args += ["--expert", "2"] if family == "qwen3_moe" else []
    assert main(["bench", *args, "--repeats", "2", "--save", str(saved)]) == 0
    report = json.loads(saved.read_text())
    assert report["model_type"] == family
    assert report["layer"]["layer"].endswith("DecoderLayer")
    rows = report["steps"]
    assert [row["engine"] for row in rows] == [
        "deepspeed (HF model)",
        "pp-ext 1f1b",
        "pp-ext zb-h1",
    ] + (["pp-ext 1f1b p2 e2"] if family == "qwen3_moe" else [])
    reference = rows[0]["losses"]
    assert len(reference) == 3 and reference[0] != reference[-1]  # it trains
    for row in rows[1:]:
        assert row["losses"] == pytest.approx(reference, rel=1e-5, abs=1e-5), row["engine"]
    assert all(row["tokens_per_s"] > 0 for row in rows)
    assert all(row["peak_step_mib"] > 0 for row in rows[:3])
    table = capsys.readouterr().out
    assert "peak MiB" in table
    if family == "qwen3_moe":
        expert_row = rows[-1]
        assert expert_row["ranks"] == "pipe 2 x data 2 x expert 2"
        assert expert_row["loss_vs_pipeline_1"] == max(
            abs(a - b) for a, b in zip(expert_row["losses"], rows[1]["losses"])
        )
        assert "pp-ext 1f1b p2 e2: pipe 2 x data 2 x expert 2 (4 ranks" in table
