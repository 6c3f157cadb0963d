"""Recipes: loading, overrides, one-line errors for bad input, DeepSpeed config
composition, and `pp-ext plan` on the shipped recipes (no process is launched)."""

from __future__ import annotations

import pytest
from recipe_cases import LLAMA_8B, QWEN_7B, ROOT, one_line_error

from pp_ext.cli import main as cli
from pp_ext.config.recipe import available, deepspeed_config, load, resolve_parallel


def test_defaults_and_overrides(recipe_file):
    recipe = load(
        recipe_file, ["train.lr=3e-4", "parallel.schedule=zbv", "parallel.partition=uniform"]
    )
    assert recipe.train.lr == 3e-4 and recipe.parallel.schedule == "zbv"
    assert recipe.parallel.pipeline == 2 and recipe.parallel.data == "auto"
    assert recipe.model.dtype == "float32" and recipe.data.seq_len == 512


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["model.pth=x"],
            "recipe key 'model.pth' does not exist in section 'model'; did you mean 'path'?",
        ),
        (
            ["trian.steps=3"],
            "recipe key 'trian' does not exist in the recipe's top level; did you mean 'train'?",
        ),
        (["train.steps=abc"], "recipe key 'train.steps' has the wrong type"),
        (["parallel.schedule=zb-h3"], "choose one of gpipe, 1f1b"),
        (["parallel.schedule=zbh1"], "did you mean 'zb-h1'?"),
        (["model.dtype=fp16"], "recipe key 'model.dtype' is 'fp16'"),
        (["parallel.micro_batches=0"], "recipe key 'parallel.micro_batches' must be >= 1, got 0"),
        (
            ["parallel.make_vocab_size_divisible_by=0"],
            "recipe key 'parallel.make_vocab_size_divisible_by' must be >= 1, got 0",
        ),
        (["train.epochs=2"], "set exactly one of recipe keys 'train.steps' and 'train.epochs'"),
        (["parallel.data=two"], "recipe key 'parallel.data' must be 'auto' or an integer >= 1"),
        (["steps"], "override 'steps' is not key=value"),
        (
            ["deepspeed.overrides.gradient_accumulation_steps=8"],
            "deepspeed.overrides.gradient_accumulation_steps is derived by pp-ext: set parallel.micro_batches instead",
        ),
        (["deepspeed.zero=1"], "recipe key 'deepspeed.zero' does not exist"),
    ],
)
def test_bad_recipes_name_the_key_and_the_fix(recipe_file, overrides, expected):
    assert expected in one_line_error(load, recipe_file, overrides)


def test_numbers_at_the_edges_of_their_ranges_load(recipe_file):
    """The range checks (the bad-input rows of tests/test_train.py) refuse only what
    torch, DeepSpeed and Python cannot take: the edges themselves load."""
    from pp_ext.config.recipe import MAX_TIMEOUT_S

    load(
        recipe_file,
        [
            "train.lr=0",
            "train.min_lr=0",
            "train.weight_decay=0",
            "train.grad_clip=0",
            "train.betas=[0,0.999999]",
            "train.eps=1e-30",
            "train.seed=0",
            f"parallel.comm_timeout_s={MAX_TIMEOUT_S}",
        ],
    )
    load(recipe_file, ["train.lr=1e-4", "train.min_lr=1e-4", f"train.seed={2**31 - 1}"])


def test_missing_required_key_and_file(tmp_path, recipe_file):
    (tmp_path / "no_model.yaml").write_text("output_dir: x\ndata:\n  path: d\ntrain:\n  steps: 1\n")
    assert "recipe key 'model.path' is required" in one_line_error(load, tmp_path / "no_model.yaml")
    message = one_line_error(load, tmp_path / "nothing.yaml")
    assert "does not exist" in message and "quickstart.yaml" in message
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert "not a valid YAML recipe" in one_line_error(load, tmp_path / "broken.yaml")


def test_data_is_required_unless_converting(recipe_file):
    assert "recipe key 'data.path' is required" in one_line_error(
        load, recipe_file, ["data.path=null"]
    )
    assert load(recipe_file, ["data.path=null", "train.steps=0"]).data.path is None


def test_world_size_must_match_pipe_tensor_data(recipe_file):
    assert resolve_parallel(load(recipe_file), 6) == (2, 1, 3)
    assert resolve_parallel(load(recipe_file, ["parallel.data=2"]), 4) == (2, 1, 2)
    assert "not a multiple of parallel.pipeline x parallel.tensor = 2 x 1" in one_line_error(
        resolve_parallel, load(recipe_file), 3
    )
    assert "world size 4 != parallel.pipeline x tensor x data = 2 x 1 x 3 = 6" in one_line_error(
        resolve_parallel, load(recipe_file, ["parallel.data=3"]), 4
    )


def test_deepspeed_config_composition(recipe_file):
    recipe = load(
        recipe_file,
        [
            "deepspeed.bases=[zero1-bf16]",
            "deepspeed.overrides.zero_optimization.stage=0",
            "train.micro_batch_size=2",
            "parallel.micro_batches=8",
            "train.warmup_steps=5",
            "train.min_lr=1e-5",
            "train.lr=1e-4",
            "train.grad_clip=0.5",
        ],
    )
    config = deepspeed_config(recipe, data_parallel=3, output_dir="/tmp/run")
    assert config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage"] == 0  # the override, deep-merged over the base
    assert config["zero_optimization"]["reduce_bucket_size"] == 50000000  # the base's, kept
    assert (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
        config["train_batch_size"],
        config["gradient_clipping"],
    ) == (2, 8, 48, 0.5)
    assert "scheduler" not in config and "optimizer" not in config  # objects, given to initialize
    assert config["csv_monitor"] == {
        "enabled": True,
        "output_path": "/tmp/run/monitor",
        "job_name": "train",
    }
    bad = load(recipe_file, ["deepspeed.bases=[zero9]"])
    assert "deepspeed base 'zero9' does not exist: choose from fp32-cpu" in one_line_error(
        deepspeed_config, bad, 1
    )


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[str]:
    lines = out.splitlines()
    return lines[
        lines.index(next(line for line in lines if line.startswith("pipeline rank"))) + 1 :
    ]


def test_plan_of_the_gpu_recipes(capsys):
    code, out, _ = run_cli(
        capsys,
        "plan",
        "--recipe",
        str(ROOT / "recipes/llama-8b-pipe4-data2.yaml"),
        "--world-size",
        "8",
        f"model.path={LLAMA_8B}",
    )
    assert code == 0, out
    assert "8 ranks = pipeline 4 x tensor 1 x data 2; schedule interleaved-1f1b (2 chunks" in out
    assert "35 pipeline layers (32 decoder blocks), 8030.3 M parameters" in out
    rows = [line.split() for line in table_rows(out)]
    assert [row[:2] for row in rows] == [["0", "0,1"], ["1", "2,3"], ["2", "4,5"], ["3", "6,7"]]
    assert "Embedding" in " ".join(rows[0]) and "LMHead" in " ".join(rows[3])
    code, out, _ = run_cli(
        capsys, "plan", "--recipe", str(ROOT / "recipes/qwen-7b-zbv.yaml"), f"model.path={QWEN_7B}"
    )
    assert code == 0 and "schedule zbv (2 chunks per rank, v placement)" in out
    rows = table_rows(out)
    assert (
        "Embedding" in rows[0] and "LMHead" in rows[0]
    )  # the V puts first and last stage on rank 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["parallel.schedule=dualpipev", "parallel.micro_batches=4"],
            "parallel.schedule=dualpipev with pipeline=4, micro_batches=4, chunks=2",
        ),
        (
            ["--world-size", "6"],
            "world size 6 is not a multiple of parallel.pipeline x parallel.tensor = 4 x 1",
        ),
        (["model.path=/nonexistent"], "model.path /nonexistent has no config.json"),
        (["--memory-limit", "nan"], "--memory-limit must be > 0 GiB per rank, got nan"),
        (
            ["parallel.tensor=3", "--world-size", "12"],
            "num_attention_heads=28, which does not divide by tensor=3",
        ),
    ],
)
def test_plan_errors_are_one_line(capsys, args, expected):
    overrides = [a for a in args if "=" in a] + (
        [] if any(a.startswith("model.path") for a in args) else [f"model.path={QWEN_7B}"]
    )
    options = [a for a in args if "=" not in a]
    code, out, err = run_cli(
        capsys, "plan", "--recipe", str(ROOT / "recipes/qwen-7b-zbv.yaml"), *options, *overrides
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pp-ext: error: ") and expected in err, err


def test_shipped_recipes_load():
    names = {p.name for p in available()}
    assert {"llama-8b-pipe4-data2.yaml", "qwen-7b-zbv.yaml"} <= names
    for path in available():
        load(path)


def test_attention_choices_are_the_adapters():
    from pp_ext.config.recipe import ATTN_IMPLEMENTATIONS
    from pp_ext.hf.common import ATTN_IMPLEMENTATIONS as ADAPTER

    assert set(ATTN_IMPLEMENTATIONS) == set(ADAPTER)


@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_schedule(recipe_file, warmup):
    import torch

    from pp_ext.training.optim import warmup_cosine

    recipe = load(recipe_file, ["train.lr=1.0", "train.min_lr=0.1", f"train.warmup_steps={warmup}"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.train.lr)
    scheduler = warmup_cosine(optimizer, recipe, steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup] == pytest.approx(1.0) and lrs[-1] == pytest.approx(
        0.1
    )  # peak after warm-up, min_lr last
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # then it only decays


def test_plan_states_each_ranks_weights_gradients_and_optimizer():
    """bf16 weights and gradients (2 + 2 bytes a parameter), the fp32 buffer DeepSpeed's
    BF16_Optimizer accumulates them in (data_types.grad_accum_dtype fp32: 4, whole on
    each data rank) and ZeRO-1's fp32 master and two AdamW moments (12 bytes) split
    over the 2 data ranks (Rajbhandari et al. 2020, Sec. 5.1): 8 + 6 bytes a parameter
    a rank holds. Unsharded moments would show 12, no accumulation buffer 4."""
    from pp_ext.commands.plan import plan_ranks
    from pp_ext.training.preflight import check_before_launch

    recipe = load(ROOT / "recipes/llama-8b-pipe4-data2.yaml", [f"model.path={LLAMA_8B}"])
    _, ranks = plan_ranks(recipe, check_before_launch(recipe, 8)[0])
    assert sum(rank.trainable for rank in ranks) == 8_030_261_248  # Llama 3.1 8B, untied
    for rank in ranks:
        state = rank.state
        assert rank.frozen == 0 and state.base == 0
        assert (state.trainable, state.gradients, state.optimizer) == (
            2 * rank.trainable,
            6 * rank.trainable,
            6 * rank.trainable,
        )
