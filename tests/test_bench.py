"""pp-ext bench: structure of its output (no timed assertions: benchmarks report, tests check shape)."""

import json

import pytest

from pp_ext.cli import main
from pp_ext.schedules import REGISTRY, get

KEYS = {
    "schedule",
    "stages",
    "micro_batches",
    "chunks",
    "asynchronous",
    "step_time_s",
    "ratio_vs_deepspeed",
    "predicted_ratio",
}


@pytest.mark.slow
def test_bench_json_has_one_row_per_schedule_with_the_baseline_first(capsys):
    code = main(
        [
            "bench",
            "--stages",
            "2",
            "--micro-batches",
            "4",
            "--schedules",
            "1f1b,zbv",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--hidden",
            "64",
            "--seq",
            "16",
            "--micro-batch-size",
            "2",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == ["deepspeed-1f1b", "1f1b", "zbv"]
    for row in rows:
        assert KEYS <= set(row)
        assert row["step_time_s"] > 0 and row["predicted_ratio"] > 0
        assert len(row["costs"]["stages"]) == 2 * row["chunks"]
    assert rows[0]["ratio_vs_deepspeed"] == 1.0 and rows[0]["predicted_ratio"] == 1.0
    assert not any(row["asynchronous"] for row in rows)


@pytest.mark.slow
def test_bench_times_autos_best_simulated_programs_and_keeps_the_fastest(capsys):
    code = main(
        [
            "bench",
            "--stages",
            "2",
            "--micro-batches",
            "4",
            "--schedules",
            "zbv,chimera,auto",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--auto-candidates",
            "2",
            "--auto-trials",
            "2",
            "--hidden",
            "64",
            "--seq",
            "16",
            "--micro-batch-size",
            "2",
            "--json",
        ]
    )
    assert code == 0
    rows = {row["schedule"]: row for row in json.loads(capsys.readouterr().out)}
    trials = rows["auto"]["auto_trials"]
    assert (
        len(trials) == 2
        and sum(t["chosen"] for t in trials) == 1
        and all(t["trial_s"] > 0 for t in trials)
    )
    assert trials[0]["predicted_step_s"] == min(
        t["predicted_step_s"] for t in trials
    )  # ranked by the simulator
    kept = next(t for t in trials if t["chosen"])
    assert kept["trial_s"] == min(t["trial_s"] for t in trials)
    # the row is the kept program's: a fixed schedule's placement, or "auto (PLACEMENT)"
    placement = (
        get(kept["origin"]).placement
        if kept["origin"] in REGISTRY
        else kept["origin"][len("auto (") : -1]
    )
    assert rows["auto"]["placement"] == placement
    for row in rows.values():
        paired = row["vs_fastest_fixed"]
        assert paired["schedule"] in ("deepspeed-1f1b", "zbv", "chimera") and paired["rounds"] == 2
        assert ("auto_trials" in row) == (row["schedule"] == "auto")


def test_paired_ratios_are_taken_round_by_round_against_the_fastest_fixed_row():
    from pp_ext.bench.pipeline import paired_with_fastest_fixed

    def row(name, times, asynchronous=False):
        return {
            "schedule": name,
            "partition": "type:Block",
            "asynchronous": asynchronous,
            "step_times_s": times,
            "step_time_s": sorted(times)[len(times) // 2],
        }

    rows = [
        row("deepspeed-1f1b", [1.0, 1.2, 1.4]),
        row("zbv", [0.8, 1.0, 0.9]),
        row("auto", [0.7, 1.1, 0.9]),
        row("pipedream", [0.5, 0.5, 0.5], asynchronous=True),
    ]
    paired_with_fastest_fixed(rows)
    auto = rows[2]["vs_fastest_fixed"]
    assert (auto["schedule"], auto["faster_rounds"], auto["rounds"]) == ("zbv", 1, 3)
    assert auto["median_ratio"] == pytest.approx(1.0)  # 0.875, 1.1, 1.0
    assert rows[1]["vs_fastest_fixed"]["median_ratio"] == 1.0


def test_bench_plans_the_asynchronous_schedules_that_accept_the_sizes():
    from pp_ext.bench.pipeline import BenchOptions

    heard = []
    plan = BenchOptions(stages=3, micro_batches=2).plan(report=heard.append)
    assert {"pipedream", "pipemare"} <= {row[0] for row in plan} and "pipedream-2bw" not in {
        row[0] for row in plan
    }
    assert any(
        line.startswith("skipping pipedream-2bw: pipedream-2bw needs micro_batches >= 3")
        for line in heard
    )


@pytest.mark.slow
def test_bench_times_a_steady_call_of_each_asynchronous_schedule(capsys):
    code = main(
        [
            "bench",
            "--stages",
            "2",
            "--micro-batches",
            "4",
            "--schedules",
            "pipedream,pipedream-2bw,pipemare",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--hidden",
            "64",
            "--seq",
            "16",
            "--micro-batch-size",
            "2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "timed 'steady call'" in out
    table = out[out.index("schedule ") :].splitlines()[1:]
    rows = {line.split()[0]: line.split() for line in table}
    assert list(rows) == ["deepspeed-1f1b", "pipedream", "pipedream-2bw", "pipemare"]
    assert rows["deepspeed-1f1b"][-1] == "step"
    for name in ("pipedream", "pipedream-2bw", "pipemare"):
        assert rows[name][-2:] == ["steady", "call"]
        assert rows[name][3] == "loop"
        step, simulated = float(rows[name][4]), float(rows[name][6])
        assert step > 0 and simulated > 0, rows[name]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--schedules", "zbw"], "unknown schedule 'zbw': did you mean 'zbv'?"),
        (
            ["--schedules", "dualpipev", "--micro-batches", "2"],
            "dualpipev needs micro_batches >= 2*stages",
        ),
    ],
)
def test_bench_refuses_bad_input_before_launching(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("pp-ext: error: ") and message in err and len(err.strip().splitlines()) == 1
    )
