"""pp-ext bench: structure of its output (no timed assertions: benchmarks report, tests check shape)."""
import json

import pytest

from pp_ext.cli import main

KEYS = {"schedule", "stages", "micro_batches", "chunks", "step_time_s", "ratio_vs_deepspeed", "predicted_ratio"}


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


@pytest.mark.parametrize("args,message", [
    (["--schedules", "zbw"], "unknown schedule 'zbw': did you mean 'zbv'?"),
    (["--schedules", "dualpipev", "--micro-batches", "2"], "dualpipev needs micro_batches >= 2*stages"),
])
def test_bench_refuses_bad_input_before_launching(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pp-ext: error: ") and message in err and len(err.strip().splitlines()) == 1
