"""`pp-ext schedule list|show|compare`, in process through main() and once as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pp_ext.cli import main
from pp_ext.schedules.actions import Action, Kind
from pp_ext.schedules.placement import Placement
from pp_ext.schedules.registry import REGISTRY, ScheduleSpec
from pp_ext.schedules.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "schedule",
    "stages",
    "micro_batches",
    "chunks",
    "bubble_ratio",
    "peak_activations",
    "weight_copies",
    "steady_bubble_ratio",
    "messages",
    "makespan",
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pp-ext: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------- list


def test_list_names_every_registered_schedule(capsys):
    code, out, _ = run(capsys, "schedule", "list")
    assert code == 0
    for spec in REGISTRY.values():
        assert (
            spec.name in out
            and spec.summary in out
            and spec.constraints in out
            and spec.source in out
        )


def test_list_json(capsys):
    code, out, _ = run(capsys, "schedule", "list", "--json")
    assert code == 0
    entries = json.loads(out)
    assert [e["name"] for e in entries] == list(REGISTRY)
    assert {"name", "summary", "constraints", "source"} <= set(entries[0])


# ---------------------------------------------------------------- show


def test_show_prints_time_grid_and_metrics(capsys):
    code, out, err = run(
        capsys, "schedule", "show", "interleaved-1f1b", "--stages", "4", "--micro-batches", "8"
    )
    assert code == 0, err
    assert "r0   F0" in out and "r3" in out and "F0.c1" in out and "B7" in out
    assert "0.1579" in out  # bubble (p-1)/(v*m+p-1) = 3/19 at the default v = 2
    assert "peak activations     5.5" in out  # p + (p-1)/v
    for name in ("makespan", "bubble ratio", "steady-state bubble", "weight copies", "messages"):
        assert name in out


def test_show_steps_prints_lowered_program(capsys):
    code, out, _ = run(capsys, "schedule", "show", "1f1b", "-p", "3", "-m", "3", "--steps")
    assert code == 0
    assert "sF0>r1" in out and "rF0<r0" in out and "sB0>r1" in out


def test_show_costs_string_and_file(capsys, tmp_path):
    code, out, _ = run(
        capsys, "schedule", "show", "gpipe", "-p", "2", "-m", "2", "--costs", "1,1,1,1/2"
    )
    assert code == 0 and "comm=0.5" in out
    costs = tmp_path / "costs.json"
    costs.write_text(
        json.dumps({"comm": 0, "stages": [{"forward": 1, "input_grad": 2, "weight_grad": 0}] * 2})
    )
    code, out, _ = run(
        capsys, "schedule", "show", "gpipe", "-p", "2", "-m", "2", "--costs", str(costs)
    )
    assert code == 0 and "per-stage file" in out


def test_show_writes_svg(capsys, tmp_path):
    target = tmp_path / "pic.svg"
    code, out, _ = run(
        capsys, "schedule", "show", "looped-bfs", "-p", "4", "-m", "8", "--svg", str(target)
    )
    assert code == 0
    assert f"wrote {target}" in out
    root = ET.parse(target).getroot()
    actions = [
        r
        for r in root.iter("{http://www.w3.org/2000/svg}rect")
        if "action" in (r.get("class") or "")
    ]
    assert len(actions) == 4 * 8 * 2 * 2  # p ranks x m micro-batches x v chunks x (F, B)


def test_show_writes_png(capsys, tmp_path):
    pytest.importorskip(
        "matplotlib", reason="PNG output needs matplotlib: pip install 'pp-ext[plot]'"
    )
    target = tmp_path / "pic.png"
    code, _, err = run(
        capsys, "schedule", "show", "1f1b", "-p", "2", "-m", "4", "--png", str(target)
    )
    assert code == 0, err
    assert target.read_bytes()[:4] == b"\x89PNG"


def test_png_without_matplotlib_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = run(
        capsys,
        "schedule",
        "show",
        "1f1b",
        "-p",
        "2",
        "-m",
        "4",
        "--svg",
        str(tmp_path / "a.svg"),
        "--png",
        str(tmp_path / "a.png"),
    )
    assert_one_line_error(code, out, err, "pip install 'pp-ext[plot]'")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- compare


def test_compare_json_rows(capsys):
    code, out, _ = run(capsys, "schedule", "compare", "-p", "4", "-m", "8", "--json")
    assert code == 0
    rows = {row["schedule"]: row for row in json.loads(out)}
    assert set(rows) == set(REGISTRY)
    for name in ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs"):
        assert KEYS <= set(rows[name]), name
        assert isinstance(rows[name]["bubble_ratio"], float)
    assert rows["gpipe"]["bubble_ratio"] == pytest.approx(3 / 11)
    assert rows["1f1b"]["peak_activations"] == 4.0
    assert rows["gpipe"]["peak_activations"] == 8.0
    # without --chunks each schedule takes its own default
    assert rows["interleaved-1f1b"]["chunks"] == REGISTRY["interleaved-1f1b"].default_chunks == 2
    assert rows["gpipe"]["chunks"] == 1
    assert rows["interleaved-1f1b"]["bubble_ratio"] == pytest.approx(3 / 19)


def test_compare_refusals_are_error_rows(capsys):
    code, out, _ = run(
        capsys, "schedule", "compare", "-p", "4", "-m", "8", "--chunks", "1", "--json"
    )
    assert code == 0
    rows = {row["schedule"]: row for row in json.loads(out)}
    refused = rows["interleaved-1f1b"]
    assert "chunks >= 2" in refused["error"]
    assert "bubble_ratio" not in refused
    assert {"schedule", "stages", "micro_batches", "chunks"} <= set(refused)
    assert "error" not in rows["1f1b"]

    code, out, _ = run(capsys, "schedule", "compare", "-p", "4", "-m", "8", "--chunks", "1")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("interleaved-1f1b"))
    assert "refuses:" in line and "chunks >= 2" in line
    gpipe = next(line for line in out.splitlines() if line.startswith("gpipe"))
    assert "0.2727" in gpipe


def test_compare_is_generic_over_the_registry(capsys, monkeypatch):
    """A newly registered schedule appears in compare; a broken one is reported, not crashed on."""

    def broken(p: int, m: int, v: int) -> Schedule:  # forgets every backward
        return Schedule(
            "broken",
            Placement.loop(p),
            m,
            tuple(tuple(Action(Kind.F, k) for k in range(m)) for _ in range(p)),
        )

    spec = ScheduleSpec("broken", "test only", "-", "-", "loop", 1, broken, lambda p, m, v: None)
    monkeypatch.setitem(REGISTRY, "broken", spec)
    code, out, _ = run(capsys, "schedule", "compare", "-p", "2", "-m", "2", "--json")
    assert code == 0
    row = {r["schedule"]: r for r in json.loads(out)}["broken"]
    assert "invalid schedule" in row["error"]

    code, out, err = run(capsys, "schedule", "show", "broken", "-p", "2", "-m", "2")
    assert code == 1 and out == ""
    assert err.startswith("pp-ext: error: the generated schedule is invalid")
    assert "Traceback" not in err


# ---------------------------------------------------------------- errors


def test_unknown_schedule(capsys):
    code, out, err = run(capsys, "schedule", "show", "interleaved", "-p", "4", "-m", "8")
    assert_one_line_error(
        code, out, err, "unknown schedule 'interleaved'", "did you mean 'interleaved-1f1b'"
    )


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["schedule", "show", "interleaved-1f1b", "-p", "4", "-m", "8", "-v", "1"], "chunks >= 2"),
        (["schedule", "show", "gpipe", "-p", "0", "-m", "8"], "--stages"),
        (["schedule", "show", "gpipe", "-p", "4", "-m", "x"], "--micro-batches"),
        (["schedule", "compare", "-p", "4", "-m", "-1"], "--micro-batches"),
        (["schedule", "show", "gpipe", "-p", "4"], "--micro-batches"),
    ],
)
def test_bad_sizes(capsys, argv, needle):
    assert_one_line_error(*run(capsys, *argv), needle)


@pytest.mark.parametrize(
    "costs,needle",
    [
        ("1,2", "F,I,W"),
        ("a,b,c", "F,I,W"),
        ("1,-1,1", ">= 0"),
        ("missing.json", "does not exist"),
    ],
)
@pytest.mark.parametrize("command", ["show", "compare"])
def test_bad_costs(capsys, command, costs, needle):
    argv = (
        ["schedule", command]
        + (["gpipe"] if command == "show" else [])
        + ["-p", "2", "-m", "2", "--costs", costs]
    )
    assert_one_line_error(*run(capsys, *argv), needle)


def test_invalid_cost_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_error(
        *run(capsys, "schedule", "show", "gpipe", "-p", "2", "-m", "2", "--costs", str(bad)),
        "not valid",
    )


def test_cost_file_with_wrong_stage_count(capsys, tmp_path):
    costs = tmp_path / "c.json"
    costs.write_text(
        json.dumps({"stages": [{"forward": 1, "input_grad": 1, "weight_grad": 1}] * 3})
    )
    assert_one_line_error(
        *run(capsys, "schedule", "show", "gpipe", "-p", "2", "-m", "2", "--costs", str(costs)),
        "3 stages",
    )


def test_missing_output_directory_writes_nothing(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "schedule",
        "show",
        "gpipe",
        "-p",
        "2",
        "-m",
        "2",
        "--svg",
        str(tmp_path / "ok.svg"),
        "--png",
        str(tmp_path / "no" / "x.png"),
    )
    assert_one_line_error(code, out, err, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_usage(capsys):
    code, out, err = run(capsys)
    assert_one_line_error(code, out, err, "COMMAND")
    assert main(["--help"]) == 0
    assert "schedule" in capsys.readouterr().out
    assert main(["schedule", "show", "--help"]) == 0
    assert "--micro-batches" in capsys.readouterr().out


# ---------------------------------------------------------------- as a program


@pytest.mark.slow  # starts a process
def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "pp_ext.cli", "schedule", "compare", "-p", "2", "-m", "4", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert {row["schedule"] for row in json.loads(done.stdout)} == set(REGISTRY)

    done = subprocess.run(
        [sys.executable, "-m", "pp_ext.cli", "schedule", "show", "nope", "-p", "2", "-m", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        "pp-ext: error: unknown schedule 'nope'"
    )


@pytest.mark.slow  # starts a process
def test_console_script():
    script = shutil.which("pp-ext")
    if script is None:
        pytest.skip("the pp-ext console script is not installed (pip install -e .)")
    done = subprocess.run([script, "schedule", "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1f1b" in done.stdout


def test_a_package_outside_the_tested_range_is_one_line(capsys, monkeypatch):
    """setup.cfg's install_requires is the tested range: a transformers 4.x installed
    over it, or a package missing, is one line naming what is installed and what is
    needed, exit 2, before a command that builds models runs; `pp-ext schedule` needs
    none of them and runs."""
    import configparser

    from packaging.requirements import Requirement

    from pp_ext.tools import versions

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options"]["install_requires"].split("\n")
    required = [Requirement(line) for line in lines if line.strip()]
    assert {r.name for r in required} >= {"torch", "deepspeed", "transformers", "peft"}
    monkeypatch.setattr(versions, "_requirements", lambda: required)
    versions.require_versions()  # this environment is in the range
    real = versions.metadata.version

    def version(name: str) -> str:
        if name == "peft":
            raise versions.metadata.PackageNotFoundError(name)
        return "4.57.1" if name == "transformers" else real(name)

    monkeypatch.setattr(versions.metadata, "version", version)
    assert main(["plan", "--recipe", "recipes/quickstart.yaml", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "pp-ext: error: transformers 4.57.1 is installed, pp-ext needs transformers<6,>=5.21; "
        "peft is not installed, pp-ext needs peft<0.23,>=0.21: pip install "
        "'transformers<6,>=5.21' 'peft<0.23,>=0.21'\n"
    )
    assert main(["schedule", "list"]) == 0
