"""``pp-ext tune`` and ``parallel.schedule: auto`` from a profile (issue 8).

Quick tests read a written profile of the quickstart model (7 pipeline layers) whose
head is heavy; the slow one profiles the real model on 2 ranks with ``pp-ext tune``,
then trains the recipe with ``auto`` from that profile, and with the tuned
overrides, against 1f1b: synchronous schedules compute the same thing, so the losses
must agree (tests/test_train.py's tolerance)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pp_ext.cli import main
from pp_ext.config.recipe import RecipeError, load
from pp_ext.schedules.cost_model import LayerCost, Profile

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/quickstart.yaml"
# the quickstart model's layers: embedding, 4 decoder blocks, final norm, tied head
NAMES = ["Embedding", *["DecoderLayer"] * 4, "FinalNorm", "Embedding"]


def heavy_head_profile(path: Path, micro_batch_size: int = 4) -> Path:
    """A profile at the quickstart's 64 tokens whose head costs five blocks."""
    weights = [0.1, 1, 1, 1, 1, 0.1, 5]
    layers = tuple(
        LayerCost(
            name,
            0.01 * w,
            0.012 * w,
            0.008 * w if name == "DecoderLayer" else 0.0,
            0.019 * w,
            int(1e6 * w),
        )
        for name, w in zip(NAMES, weights)
    )
    return Profile(layers, 0.0005, micro_batch_size, 64).save(path)


def tune(tmp_path, *args: str) -> int:
    return main(["tune", "--recipe", str(RECIPE), *args, f"output_dir={tmp_path / 'run'}"])


def test_tune_ranks_candidates_and_writes_the_winner(tmp_path, capsys):
    profile = heavy_head_profile(tmp_path / "profile.json")
    out = tmp_path / "best.txt"
    assert (
        tune(
            tmp_path,
            "--profile",
            str(profile),
            "--out",
            str(out),
            "--top",
            "100",
            "train.micro_batch_size=4",
        )
        == 0
    )
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "micro-batch size 4 only" in captured.err
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert lines[header].split() == [
        "rank",
        "schedule",
        "v",
        "m",
        "x",
        "b",
        "partition",
        "step",
        "s",
        "(sim)",
        "bubble",
        "peak",
        "GiB",
        "per",
        "rank",
    ]
    rows = [line.split() for line in lines[header + 1 :] if line[:1].isdigit()]
    times = [float(row[7]) for row in rows]
    assert times == sorted(times) and f"; {len(rows)} candidate(s) simulated" in lines[0]
    # the heavy head pulls the balanced cut towards the first stage: faster than by parameters
    zb_h1 = {row[6]: float(row[7]) for row in rows if row[1] == "zb-h1"}
    assert zb_h1["balanced"] < zb_h1["parameters"], zb_h1
    written = out.read_text().split()
    assert written[:4] == [
        f"parallel.schedule={rows[0][1]}",
        "parallel.micro_batches=4",
        "train.micro_batch_size=4",
        f"parallel.chunks={rows[0][2]}",
    ]
    method = rows[0][6].split("=")[0]
    assert (
        written[4]
        == f"parallel.partition={f'balanced:{profile}' if method == 'balanced' else method}"
    )
    # the file is recipe overrides that load and pass the launch checks
    from pp_ext.training.preflight import check_before_launch

    recipe = load(RECIPE, written)
    assert check_before_launch(recipe, 2)[0].chunks == int(rows[0][2])


def test_auto_under_a_memory_limit_writes_its_limit(tmp_path, capsys):
    profile = heavy_head_profile(tmp_path / "profile.json")
    out = tmp_path / "best.txt"
    args = ["--profile", str(profile), "--out", str(out), "--top", "100"]

    def table() -> tuple[str, list[list[str]]]:
        text = capsys.readouterr().out
        return text.splitlines()[0], [
            line.split() for line in text.splitlines() if line[:1].isdigit()
        ]

    assert tune(tmp_path, *args, "train.micro_batch_size=4") == 0
    _, unlimited = table()
    # just above 1F1B's peak by parameters: auto, computed for the limit, beats it
    assert tune(tmp_path, *args, "--memory-limit", "0.0135", "train.micro_batch_size=4") == 0
    header, rows = table()
    kept, dropped = map(
        int,
        re.search(
            r"; (\d+) candidate\(s\) simulated on measured costs, (\d+) over 0.0135 GiB "
            r"dropped",
            header,
        ).groups(),
    )

    # each candidate is kept or dropped; a fixed schedule is kept exactly when its peak (as
    # without the limit) fits, while auto is computed again for the limit and always fits.
    # Peaks print in GiB to 3 decimals: at this limit, a row fits exactly when it prints <= 0.013
    def fixed(
        table: list[list[str]],
    ) -> list[list[str]]:  # schedule .. bubble of the fixed schedules' rows
        return sorted(row[1:9] for row in table if row[1] != "auto")

    fitting = fixed([row for row in unlimited if max(map(float, row[9:])) <= 0.013])
    assert (kept + dropped, kept) == (len(unlimited), len(rows)) and fitting
    assert fixed(rows) == fitting and all(max(map(float, row[9:])) <= 0.013 for row in rows)
    assert rows[0][1] == "auto" and all(float(rows[0][7]) < float(row[6]) for row in fitting)
    written = out.read_text().split()
    assert "parallel.schedule=auto" in written and f"parallel.profile={profile}" in written
    # the written limit is, per rank, the most micro-batches whose activations fit beside the
    # rank's fp32 weights, gradients and AdamW's two moments (16 bytes per parameter)
    from pp_ext.engine.module import layer_param_counts, partition
    from pp_ext.schedules import simulate
    from pp_ext.training.preflight import recipe_layer_specs, recipe_schedule

    recipe = load(RECIPE, written)
    assert (
        recipe.parallel.chunks == 1
        and recipe.train.optimizer == "adamw"
        and recipe.model.dtype == "float32"
    )
    specs = recipe_layer_specs(recipe)
    cut = partition(specs, 2, recipe.parallel.partition)
    counts = layer_param_counts(specs)
    static = [16 * sum(counts[cut[r] : cut[r + 1]]) for r in range(2)]
    activations = Profile.load(profile).activation_bytes(cut)
    limits = [min(4, int((0.0135 * 2**30 - s) // a)) for s, a in zip(static, activations)]
    assert f"parallel.memory_limit=[{limits[0]},{limits[1]}]" in written
    peaks = simulate(recipe_schedule(recipe, 2)).peak_activations_per_rank
    assert all(peak <= limit for peak, limit in zip(peaks, limits))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory-limit", "0.000001"], "no candidate fits --memory-limit 1e-06 GiB per rank"),
        (["--memory-limit", "-1"], "--memory-limit must be > 0 GiB per rank, got -1.0"),
        (
            ["data.seq_len=128"],
            "measured 64 tokens in float32, the recipe has data.seq_len=128 in float32",
        ),
        (
            ["train.micro_batch_size=3", "parallel.micro_batches=3"],
            "which do not divide the recipe's 9 samples per step",
        ),
        (
            ["parallel.schedul=auto"],
            "recipe key 'parallel.schedul' does not exist in section 'parallel'",
        ),
        (["--out", "no-such-folder/tune.txt"], "folder no-such-folder does not exist"),
    ],
)
def test_tune_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    profile = heavy_head_profile(tmp_path / "profile.json")
    out = tmp_path / "best.txt"
    assert tune(tmp_path, "--profile", str(profile), "--out", str(out), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pp-ext: error: ") and message in err[-1], err
    assert not out.exists() and not list(tmp_path.glob("best.txt*"))


def test_recipe_keys_for_auto_from_a_profile(tmp_path):
    from pp_ext.training.preflight import check_before_launch

    profile = heavy_head_profile(tmp_path / "profile.json")
    with pytest.raises(
        RecipeError, match="'parallel.memory_limit' is read by parallel.schedule=auto only"
    ):
        load(RECIPE, ["parallel.memory_limit=3"])
    with pytest.raises(RecipeError, match="must be a number >= 1"):
        load(RECIPE, ["parallel.schedule=auto", "parallel.memory_limit=0"])
    with pytest.raises(
        RecipeError, match="'parallel.profile' is .*none.json, which does not exist"
    ):
        load(RECIPE, [f"parallel.profile={tmp_path / 'none.json'}"])
    recipe = load(RECIPE, ["parallel.schedule=auto", f"parallel.profile={profile}"])
    with pytest.raises(
        RecipeError, match="micro-batches of 4 samples, the recipe has train.micro_batch_size=8"
    ):
        check_before_launch(recipe, 2)
    other = Profile(Profile.load(profile).layers[:5], 0.0, 8, 64).save(tmp_path / "short.json")
    with pytest.raises(RecipeError, match="measures 5 layers, the model has 7"):
        check_before_launch(
            load(RECIPE, ["parallel.schedule=auto", f"parallel.profile={other}"]), 2
        )


def test_auto_from_a_profile_differs_from_unit_costs(tmp_path):
    """The recipe's auto follows the measured costs (else the training test below proves little)."""
    from pp_ext.schedules import build
    from pp_ext.training.preflight import recipe_schedule

    profile = heavy_head_profile(tmp_path / "profile.json")
    recipe = load(
        RECIPE,
        [
            "parallel.schedule=auto",
            f"parallel.profile={profile}",
            "train.micro_batch_size=4",
            "parallel.memory_limit=[4,2]",
        ],
    )
    measured = recipe_schedule(recipe, 2)
    assert measured.programs != build("auto", 2, 4).programs
    assert measured.programs != build("1f1b", 2, 4).programs


@pytest.mark.slow
def test_tune_profiles_the_recipe_and_auto_trains_as_1f1b(tmp_path, capfd):
    from train_cases import TOLERANCE, train_cases

    from pp_ext.testing.spawn import spawn

    out = tmp_path / "tuned.txt"
    # 16 samples per step: splits 1x16 .. 16x1, each measured
    assert tune(tmp_path, "--out", str(out), "--repeats", "3", "train.micro_batch_size=4") == 0
    err = capfd.readouterr().err  # the ranks write to the file descriptor
    assert "measuring 7 layers at micro-batch size 16 x 64 tokens (1 of 5, cpu)" in err
    profiles = {b: Path(f"{out}.profile-b{b}.json") for b in (16, 8, 4, 2, 1)}
    assert all(path.is_file() for path in profiles.values())
    profile = Profile.load(profiles[4])
    assert [layer.name for layer in profile.layers] == NAMES and profile.comm > 0
    assert (profile.micro_batch_size, profile.seq, profile.dtype) == (4, 64, "float32")
    assert all(layer.forward > 0 and layer.backward > 0 for layer in profile.layers)
    assert all(layer.activation_bytes > 0 for layer in profile.layers)
    tuned = out.read_text().split()
    tuned_split = [
        w for w in tuned if w.startswith(("train.micro_batch_size=", "parallel.micro_batches="))
    ]
    # a micro-batch's loss is a mean over its labelled tokens: same split, same losses
    cases = [
        ("1f1b", []),
        (
            "auto",
            [
                "parallel.schedule=auto",
                f"parallel.profile={profiles[4]}",
                "parallel.memory_limit=[3,1]",
            ],
        ),
        ("1f1b-tuned-split", tuned_split),
        ("tuned", tuned),
    ]
    results = spawn(train_cases, 2, str(tmp_path), cases, timeout=900)[0]
    for name, reference in (("auto", "1f1b"), ("tuned", "1f1b-tuned-split")):
        expected = results[reference][1]
        code, losses = results[name]
        assert sorted(expected) == [1, 2, 3] and code == 0 and sorted(losses) == [1, 2, 3], (
            name,
            results,
        )
        assert max(abs(losses[s] - expected[s]) for s in expected) <= TOLERANCE, (
            name,
            losses,
            expected,
        )
