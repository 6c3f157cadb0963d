"""pp-ext bench: structure of its output (no timed assertions: benchmarks report, tests check shape)."""
import json

import pytest

from pp_ext.cli import main

KEYS = {"schedule", "stages", "micro_batches", "chunks", "asynchronous", "step_time_s", "ratio_vs_deepspeed",
        "predicted_ratio"}


@pytest.mark.slow
def test_bench_json_has_one_row_per_schedule_with_the_baseline_first(capsys):
    code = main(["bench", "--stages", "2", "--micro-batches", "4", "--schedules", "1f1b,zbv", "--repeats", "1",
                 "--warmup", "0", "--hidden", "64", "--seq", "16", "--micro-batch-size", "2", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == ["deepspeed-1f1b", "1f1b", "zbv"]
    for row in rows:
        assert KEYS <= set(row)
        assert row["step_time_s"] > 0 and row["predicted_ratio"] > 0
        assert len(row["costs"]["stages"]) == 2 * row["chunks"]
    assert rows[0]["ratio_vs_deepspeed"] == 1.0 and rows[0]["predicted_ratio"] == 1.0
    assert not any(row["asynchronous"] for row in rows)


def test_bench_plans_the_asynchronous_schedules_that_accept_the_sizes():
    from pp_ext.bench import BenchOptions

    heard = []
    plan = BenchOptions(stages=3, micro_batches=2).plan(report=heard.append)
    assert {"pipedream", "pipemare"} <= {row[0] for row in plan} and "pipedream-2bw" not in {row[0] for row in plan}
    assert any(line.startswith("skipping pipedream-2bw: pipedream-2bw needs micro_batches >= 3") for line in heard)


@pytest.mark.slow
def test_bench_times_a_steady_call_of_each_asynchronous_schedule(capsys):
    code = main(["bench", "--stages", "2", "--micro-batches", "4", "--schedules", "pipedream,pipedream-2bw,pipemare",
                 "--repeats", "2", "--warmup", "0", "--hidden", "64", "--seq", "16", "--micro-batch-size", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "timed 'steady call'" in out
    table = out[out.index("schedule "):].splitlines()[1:]
    rows = {line.split()[0]: line.split() for line in table}
    assert list(rows) == ["deepspeed-1f1b", "pipedream", "pipedream-2bw", "pipemare"]
    assert rows["deepspeed-1f1b"][-1] == "step"
    for name in ("pipedream", "pipedream-2bw", "pipemare"):
        assert rows[name][-2:] == ["steady", "call"]
        assert rows[name][3] == "loop"
        step, simulated = float(rows[name][4]), float(rows[name][6])
        assert step > 0 and simulated > 0, rows[name]


@pytest.mark.parametrize("args,message", [
    (["--schedules", "zbw"], "unknown schedule 'zbw': did you mean 'zbv'?"),
    (["--schedules", "dualpipev", "--micro-batches", "2"], "dualpipev needs micro_batches >= 2*stages"),
])
def test_bench_refuses_bad_input_before_launching(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pp-ext: error: ") and message in err and len(err.strip().splitlines()) == 1
