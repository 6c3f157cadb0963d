"""``pp-ext report RUN_DIR [RUN_DIR ...]``: what training runs learned.

Reads a run's ``metrics.jsonl`` (written by the training job) and prints the loss
and evaluation figures at the start and the end, draws the curves into
``RUN_DIR/curves.png`` (matplotlib, the ``plot`` extra), and, for prompt/completion
data, lets the exported model (``RUN_DIR/hf``) answer a few held-out prompts with
greedy decoding, next to the expected answers. Several runs (e.g. one recipe under
different schedules) are compared: one row each, and their loss curves in one picture.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from pp_ext.schedules.render import require_matplotlib
from pp_ext.tools.files import write_atomic
from pp_ext.training import metrics_log

from . import CommandError, format_table


def add_parser(subparsers) -> None:
    report = subparsers.add_parser(
        "report",
        help="what a training run learned: metrics, curves, samples",
        description="Summarise a training run's metrics.jsonl, draw its curves and "
        "let its exported model answer held-out prompts.",
    )
    report.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a recipe's output_dir; several: compare them",
    )
    report.add_argument(
        "--samples",
        type=int,
        default=5,
        metavar="N",
        help="held-out prompts the exported model answers (prompt/completion data; default 5)",
    )
    report.add_argument(
        "--png",
        metavar="FILE",
        help="where to draw the curves (default RUN_DIR/curves.png; "
        "several runs: compare.png beside the first)",
    )
    report.set_defaults(handler=run_report)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(train entries, eval entries)`` of the run's metrics (:mod:`pp_ext.training.metrics_log`)."""
    try:
        return metrics_log.read_metrics(run_dir)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None


def summary(train: list[dict], evals: list[dict]) -> list[str]:
    rows = [["", "start", "end"]]
    if train:
        rows.append(
            [
                "train loss",
                f"{train[0]['loss']:.4f} (step {train[0]['step']})",
                f"{train[-1]['loss']:.4f} (step {train[-1]['step']})",
            ]
        )
    for key, label in (("eval_loss", "eval loss"), ("eval_accuracy", "answer accuracy")):
        points = [e for e in evals if key in e]
        if points:
            rows.append(
                [
                    label,
                    f"{points[0][key]:.4f} (step {points[0]['step']})",
                    f"{points[-1][key]:.4f} (step {points[-1]['step']})",
                ]
            )
    if train:
        speed = sorted(e["tokens_per_s"] for e in train)[len(train) // 2]
        rows.append(["tokens/s (median)", "", f"{speed:.0f}"])
    return format_table(rows)


def save_figure(path: Path, paint) -> Path | None:
    """``paint(plt)`` returns a figure, written to ``path`` as PNG, atomically; None
    without matplotlib (pictures are optional: the tables are the report)."""
    try:
        require_matplotlib()
    except ImportError:
        return None
    import matplotlib.pyplot as plt  # the optional plot extra, checked just above

    fig = paint(plt)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def draw(train: list[dict], evals: list[dict], path: Path) -> Path | None:
    return save_figure(path, lambda plt: _paint_run(plt, train, evals))


def _paint_run(plt, train: list[dict], evals: list[dict]):
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(
        [e["step"] for e in train], [e["loss"] for e in train], label="train loss", color="#4477aa"
    )
    if evals:
        loss_axis.plot(
            [e["step"] for e in evals],
            [e["eval_loss"] for e in evals],
            "o-",
            label="eval loss",
            color="#ee6677",
        )
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    handles, labels = loss_axis.get_legend_handles_labels()
    accuracy = [e for e in evals if "eval_accuracy" in e]
    if accuracy:
        acc_axis = loss_axis.twinx()
        acc_axis.plot(
            [e["step"] for e in accuracy],
            [e["eval_accuracy"] for e in accuracy],
            "s--",
            color="#228833",
            label="answer accuracy",
        )
        acc_axis.set_ylabel("answer accuracy")
        acc_axis.set_ylim(0, 1)
        more = acc_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(
        handles, labels, loc="lower center", ncol=len(labels), frameon=False
    )  # below, hiding no point
    return fig


def samples(run_dir: Path, count: int) -> list[str]:
    """The exported model's greedy answers to ``count`` held-out prompts."""
    from omegaconf import (
        OmegaConf,
    )  # omegaconf, torch, transformers: only when this command runs (pp_ext.commands)

    recipe_path, model_dir = run_dir / "recipe.yaml", run_dir / "hf"
    adapter = (model_dir / "adapter_config.json").is_file()  # a LoRA run's PEFT folder
    if count <= 0 or not recipe_path.is_file():
        return []
    if not adapter and not (model_dir / "config.json").is_file():
        return []
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pp_ext.data.records import load_records

    recipe = OmegaConf.load(recipe_path)
    records = load_records(recipe.data, "eval", seed=recipe.train.seed)
    fields = (recipe.data.prompt_field, recipe.data.completion_field)
    if records is None or not set(fields) <= set(records.column_names):
        return []
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # transformers' "Loading weights" bar would land in the middle of the report's table
    hf_logging.disable_progress_bar()
    if adapter:  # its base (named in adapter_config.json) with the adapter on it
        from peft import AutoPeftModelForCausalLM

        from pp_ext.peft.config import peft_model_warnings

        with peft_model_warnings():
            model = AutoPeftModelForCausalLM.from_pretrained(model_dir).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [["prompt", "expected", "model", "right"]]
    right = 0
    for record in records.select(range(min(count, len(records)))):
        prompt, expected = record[fields[0]], record[fields[1]]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=len(tokenizer(expected).input_ids) + 1, do_sample=False
            )
        answer = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        correct = answer.strip() == expected.strip()
        right += correct
        rows.append([repr(prompt), repr(expected), repr(answer), "yes" if correct else "no"])
    return format_table(rows) + [
        f"{right} of {len(rows) - 1} held-out prompts answered exactly "
        f"(greedy decoding of the exported model {model_dir})"
    ]


TAIL = 10  # a run's final training loss: the mean of its last TAIL steps (one step is noisy)


def compare(run_dirs: list[Path], png: Path) -> int:
    runs = {str(d): read_metrics(d) for d in run_dirs}
    rows = [
        [
            "run",
            "steps",
            f"train loss (last {TAIL})",
            "eval loss",
            "answer accuracy",
            "tokens/s (median)",
        ]
    ]
    for name, (train, evals) in runs.items():
        last = [e["loss"] for e in train[-TAIL:]]
        final = evals[-1] if evals else {}
        speed = sorted(e["tokens_per_s"] for e in train)[len(train) // 2] if train else float("nan")
        rows.append(
            [
                name,
                str(len(train)),
                f"{sum(last) / max(1, len(last)):.4f}",
                f"{final.get('eval_loss', float('nan')):.4f}",
                f"{final.get('eval_accuracy', float('nan')):.4f}",
                f"{speed:.0f}",
            ]
        )
    print("\n".join(format_table(rows)))
    picture = draw_runs(runs, png)
    if picture:
        print(f"curves: {picture}")
    return 0


def draw_runs(runs: dict[str, tuple[list[dict], list[dict]]], path: Path) -> Path | None:
    """Every run's training loss (and eval loss points) in one picture."""
    return save_figure(path, lambda plt: _paint_runs(plt, runs))


def _paint_runs(plt, runs: dict[str, tuple[list[dict], list[dict]]]):
    fig, axis = plt.subplots(figsize=(7, 4))
    for index, (name, (train, evals)) in enumerate(runs.items()):
        color = plt.get_cmap("tab10")(index)
        axis.plot(
            [e["step"] for e in train],
            [e["loss"] for e in train],
            color=color,
            linewidth=1,
            label=Path(name).name,
        )
        axis.plot(
            [e["step"] for e in evals],
            [e["eval_loss"] for e in evals],
            "o",
            color=color,
            markersize=4,
        )
    axis.set_xlabel("step")
    axis.set_ylabel("loss (lines: train, dots: eval)")
    axis.set_yscale("log")
    axis.legend()
    fig.tight_layout()
    return fig


def run_report(args: argparse.Namespace) -> int:
    run_dirs = [Path(d) for d in args.run_dirs]
    if len(run_dirs) > 1:
        return compare(run_dirs, Path(args.png) if args.png else run_dirs[0].parent / "compare.png")
    run_dir = run_dirs[0]
    train, evals = read_metrics(run_dir)
    print(f"run {run_dir}: {len(train)} steps")
    print("\n".join(summary(train, evals)))
    picture = draw(train, evals, Path(args.png) if args.png else run_dir / "curves.png")
    if picture:
        print(f"curves: {picture}")
    lines = samples(run_dir, args.samples)
    if lines:
        print()
        print("\n".join(lines))
    return 0
