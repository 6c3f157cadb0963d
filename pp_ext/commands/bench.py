"""``pp-ext bench``: every schedule's ``train_batch`` time next to DeepSpeed's own; with
``--model``, one device: an HF model's decoder layer and train step next to
transformers' own under DeepSpeed's engine (:mod:`pp_ext.bench.model`); with ``--lora
RECIPE``, the recipe's LoRA run at pipeline 2 next to DeepSpeed ZeRO-3 + PEFT over 2 data
ranks (:mod:`pp_ext.bench.lora`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pp_ext.schedules import ScheduleError
from pp_ext.tools.files import write_atomic

from . import CommandError, non_negative_int, positive_int

# (option, default without --model, default with --model): what both benches read
SHARED = (
    ("micro_batches", 4, 4),
    ("micro_batch_size", 4, 4),
    ("seq", 128, 2048),
    ("warmup", 2, 3),
    ("repeats", 5, 20),
)
# what only the schedule bench (several ranks, the tiny model) reads
SCHEDULE_BENCH_ONLY = (
    "stages",
    "hidden",
    "blocks_per_rank",
    "vocab",
    "partitions",
    "auto_candidates",
    "auto_trials",
)
MODEL_BENCH_ONLY = ("device", "layers", "steps", "dtype", "expert", "save")
# what the LoRA bench reads besides --schedules and --json; its sizes are the recipe's
LORA_BENCH_READS = ("warmup", "repeats", "save")
RECIPE_KEYS = {
    "micro_batches": "parallel.micro_batches",
    "micro_batch_size": "train.micro_batch_size",
    "seq": "data.seq_len",
    "dtype": "model.dtype",
}
LORA_SCHEDULES = ("1f1b", "zb-h1", "zbv")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time train_batch for each schedule next to DeepSpeed's TrainSchedule",
        description="Launch STAGES local ranks (one thread each on CPU), time train_batch for DeepSpeed's own "
        "TrainSchedule and every schedule (auto: computed from the measured costs) that accepts the sizes on one small Llama-shaped model "
        "(warm-up, repeats, median), measure per-stage F/I/W/B costs and the p2p latency, and print "
        "measured against simulated step times. The asynchronous schedules (pipedream, pipedream-2bw, "
        "pipemare) are timed per steady call: a train_batch once their pipeline is full (an untimed "
        "fill before it, an untimed flush after it).",
    )
    parser.add_argument(
        "--stages",
        "-p",
        type=positive_int,
        default=None,
        metavar="P",
        help="pipeline ranks (default 2)",
    )
    parser.add_argument(
        "--micro-batches",
        "-m",
        type=positive_int,
        default=None,
        metavar="M",
        help="micro-batches per step (default 4)",
    )
    parser.add_argument(
        "--schedules",
        metavar="A,B,...",
        help="only these (comma-separated; 'deepspeed-1f1b' is always timed as the baseline; with "
        "--model: pp-ext's schedules at pipeline 1, default 1f1b,zb-h1)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed steps per schedule (default 5); with --model: timed calls per layer pass "
        "(default 20)",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=None,
        help="untimed steps first (default 2; with --model: rounds left out of the medians, "
        "default 3)",
    )
    parser.add_argument(
        "--hidden", type=positive_int, default=None, help="model width (default 256)"
    )
    parser.add_argument(
        "--seq",
        type=positive_int,
        default=None,
        help="tokens per sample (default 128; with --model 2048)",
    )
    parser.add_argument(
        "--micro-batch-size",
        type=positive_int,
        default=None,
        help="samples per micro-batch (default 4)",
    )
    parser.add_argument(
        "--blocks-per-rank",
        type=positive_int,
        default=None,
        help="decoder blocks per rank (default 2)",
    )
    parser.add_argument(
        "--vocab",
        type=positive_int,
        default=None,
        help="vocabulary (default 512; large makes the head heavy)",
    )
    parser.add_argument(
        "--partitions",
        metavar="A,B,...",
        default=None,
        help="cuts of the model to time each schedule on: partition methods (parameters, uniform, "
        "type:REGEX) or balanced (from a profile measured first); default type:Block",
    )
    parser.add_argument(
        "--auto-candidates",
        type=positive_int,
        default=None,
        metavar="K",
        help="auto: time its K best simulated programs against each other and keep the fastest "
        "(default 3)",
    )
    parser.add_argument(
        "--auto-trials",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="rounds of auto's trials, after the warm-up and before the timed rounds (default 5; "
        "0: the simulated best)",
    )
    model = parser.add_argument_group(
        "one device (--model)",
        "time an HF model's decoder layer (F, I, W, B) next to transformers' own and its "
        "train step at pipeline 1 (pp-ext's schedules) next to DeepSpeed's ordinary engine on transformers' model, "
        "same weights, data, bf16 + ZeRO-1 config and torch AdamW; tokens/s medians, ratios side by side",
    )
    model.add_argument(
        "--model", metavar="DIR", help="an HF model folder (its config.json; weights are not read)"
    )
    model.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda where there is one")
    model.add_argument("--layers", type=positive_int, help="decoder layers (default: the config's)")
    model.add_argument(
        "--steps",
        type=non_negative_int,
        help="rounds of train steps, every engine once a round (default 12; 0: the layer only)",
    )
    model.add_argument("--dtype", choices=("bfloat16", "float32"), help="default bfloat16")
    model.add_argument(
        "--expert",
        type=positive_int,
        metavar="E",
        help="an MoE model: also a row of pp-ext at pipeline 2 x data E x expert E (2 E local "
        "ranks, one GPU each or CPU threads; the first schedule), the same tokens per step, its "
        "losses next to pipeline 1's",
    )
    model.add_argument("--save", metavar="FILE", help="also write the report as JSON to FILE")
    lora = parser.add_argument_group(
        "LoRA against ZeRO-3 (--lora)",
        "the recipe's model and peft section (PEFT's LoraConfig names) trained on 2 local ranks "
        "(one GPU each, or CPU threads): pp-ext at pipeline 2 with each schedule (default "
        f"{','.join(LORA_SCHEDULES)}) next to DeepSpeed ZeRO-3 + PEFT's get_peft_model on "
        "transformers' model over 2 data ranks, same weights, adapters, global batch "
        "(parallel.micro_batches x train.micro_batch_size x data.seq_len; ZeRO-3 runs half the "
        "micro-batches on each rank) and optimizer; tokens/s (median of --repeats steps after "
        "--warmup rounds), losses, tokens per step, and memory per rank",
    )
    lora.add_argument("--lora", metavar="RECIPE", help="a recipe with peft.type lora")
    lora.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides (with --lora)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run_bench)


def _resolve(args: argparse.Namespace) -> None:
    """Fill the options not given with the defaults of the bench ``--model`` or
    ``--lora`` chooses; refuse what another bench alone reads."""
    if args.lora is not None:
        _resolve_lora(args)
        return
    if args.overrides:
        raise CommandError(
            f"{args.overrides[0]}: recipe overrides are read by the LoRA bench: add --lora RECIPE, "
            f"or drop them"
        )
    model = args.model is not None
    given = [
        name
        for name in (SCHEDULE_BENCH_ONLY if model else MODEL_BENCH_ONLY)
        if getattr(args, name) is not None
    ]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise CommandError(
            f"{option} is read by the schedule bench (without --model): drop it, or drop --model"
            if model
            else f"{option} is read by the one-device bench: add --model DIR, or drop it"
        )
    for name, default, with_model in SHARED:
        if getattr(args, name) is None:
            setattr(args, name, with_model if model else default)
    if not model:
        for name, value in (
            ("stages", 2),
            ("hidden", 256),
            ("blocks_per_rank", 2),
            ("vocab", 512),
            ("partitions", "type:Block"),
            ("auto_candidates", 3),
            ("auto_trials", 5),
        ):
            if getattr(args, name) is None:
                setattr(args, name, value)


def _resolve_lora(args: argparse.Namespace) -> None:
    """The LoRA bench reads its sizes from the recipe: an option for them names the key."""
    if args.model is not None:
        raise CommandError(
            "--model and --lora are two benches: the LoRA bench reads the model from the "
            "recipe (model.path=DIR as an override); drop one"
        )
    for name in (*SCHEDULE_BENCH_ONLY, *MODEL_BENCH_ONLY, *RECIPE_KEYS):
        if name not in LORA_BENCH_READS and getattr(args, name) is not None:
            option = "--" + name.replace("_", "-")
            raise CommandError(
                f"{option} is not read by the LoRA bench: set {RECIPE_KEYS[name]}=VALUE after "
                f"the recipe"
                if name in RECIPE_KEYS
                else f"{option} is not read by the LoRA bench (--lora): drop it"
            )
    args.warmup = 2 if args.warmup is None else args.warmup
    args.repeats = 5 if args.repeats is None else args.repeats


def run_bench(args: argparse.Namespace) -> int:
    _resolve(args)
    if args.lora is not None:
        return run_lora_bench(args)
    if args.model is not None:
        return run_model_bench(args)
    # torch, deepspeed: only when this command runs (pp_ext.commands)
    from pp_ext.engine.distributed import select_accelerator

    select_accelerator()  # before deepspeed is first imported (its auto-detection warns on stdout)
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < args.stages:
        raise CommandError(
            f"--stages {args.stages} starts {args.stages} local ranks, one GPU each (NCCL takes no two "
            f"ranks on one device), and {torch.cuda.device_count()} is visible: bench one GPU with "
            f"--model DIR, or run the ranks on the CPU with CUDA_VISIBLE_DEVICES="
        )
    from pp_ext.bench.pipeline import BenchOptions, run

    names = (
        tuple(n.strip() for n in args.schedules.split(",") if n.strip()) if args.schedules else ()
    )
    options = BenchOptions(
        stages=args.stages,
        micro_batches=args.micro_batches,
        schedules=names,
        repeats=args.repeats,
        warmup=args.warmup,
        hidden=args.hidden,
        seq=args.seq,
        micro_batch_size=args.micro_batch_size,
        blocks_per_rank=args.blocks_per_rank,
        intermediate=args.hidden * 11 // 4,
        heads=max(1, args.hidden // 64),
        vocab=args.vocab,
        partitions=tuple(p.strip() for p in args.partitions.split(",") if p.strip()),
        auto_candidates=args.auto_candidates,
        auto_trials=args.auto_trials,
    )
    try:
        rows = run(options)
    except (
        ScheduleError,
        ValueError,
    ) as err:  # a refused size; a partition method that does not exist
        raise CommandError(str(err)) from None
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"p={args.stages} m={args.micro_batches}, hidden {args.hidden}, {args.blocks_per_rank} blocks per rank, "
        f"{args.micro_batch_size} x {args.seq} tokens per micro-batch; median of {args.repeats} steps"
    )
    print(
        "ratio: step time / DeepSpeed TrainSchedule's, measured in this run; simulated: the same from the "
        "measured per-stage costs"
    )
    if any(row["asynchronous"] for row in rows):
        print(
            "timed 'steady call': an asynchronous schedule's train_batch once its pipeline is full (the fill "
            "and drain amortised away; its weights change inside the call); simulated: the stream's time per call, "
            "each backward recomputing its forward as that engine does"
        )
    header = f"{'schedule':<16} {'partition':<10} {'v':>2} {'placement':<13} {'step s':>8} {'ratio':>7} {'simulated':>9} {'sim ratio':>9} {'speed-up share':>14} timed"
    print(header)
    for row in rows:
        print(
            f"{row['schedule']:<16} {row['partition']:<10} {row['chunks']:>2} {row['placement']:<13} {row['step_time_s']:>8.3f} {row['ratio_vs_deepspeed']:>7.3f} "
            f"{row['predicted_step_s']:>9.3f} {row['predicted_ratio']:>9.3f} {row['efficiency']:>14.2f} "
            f"{'steady call' if row['asynchronous'] else 'step'}"
        )
    for row in rows:
        if "auto_trials" in row:
            paired = row["vs_fastest_fixed"]
            print(
                f"auto ({row['partition']}): trial medians "
                + ", ".join(
                    f"{'*' if trial['chosen'] else ''}{trial['origin']} {trial['trial_s']:.3f}"
                    for trial in row["auto_trials"]
                )
                + f" (* kept); against {paired['schedule']} ({paired['partition']}), the fastest fixed row, round by "
                f"round: median ratio {paired['median_ratio']:.3f}, faster in {paired['faster_rounds']} of "
                f"{paired['rounds']} rounds"
            )
    return 0


def run_model_bench(args: argparse.Namespace) -> int:
    # torch, deepspeed: only when this command runs (pp_ext.commands)
    from pp_ext.engine.distributed import select_accelerator

    select_accelerator()  # before deepspeed is first imported (its auto-detection warns on stdout)
    import torch

    from pp_ext.bench.model import ModelBenchOptions, format_report, run

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(
                "--device cuda: no CUDA device is visible here; use --device cpu (small sizes)"
            )
    expert = args.expert or 1
    if expert > 1 and 0 < torch.cuda.device_count() < 2 * expert:
        raise CommandError(
            f"--expert {expert} starts {2 * expert} local ranks, one GPU each, and "
            f"{torch.cuda.device_count()} is visible: drop --expert, run on a machine with "
            f"{2 * expert} GPUs, or on the CPU with CUDA_VISIBLE_DEVICES="
        )
    names = (
        tuple(n.strip() for n in args.schedules.split(",") if n.strip()) if args.schedules else None
    )
    extra: dict[str, Any] = {"schedules": names} if names else {}
    options = ModelBenchOptions(
        model=args.model,
        device=args.device or "",
        layers=args.layers or 0,
        micro_batch_size=args.micro_batch_size,
        seq=args.seq,
        micro_batches=args.micro_batches,
        steps=12 if args.steps is None else args.steps,
        warmup=args.warmup,
        layer_repeats=args.repeats,
        dtype=args.dtype or "bfloat16",
        expert=expert,
        **extra,
    )
    return _report(args, run, options, format_report)


def _report(args: argparse.Namespace, run, options, format_report) -> int:
    """``run(options)``'s report printed (a table, or --json) and written to --save;
    what it refuses (an unknown schedule, a missing model folder, a bad recipe or
    override, targets that match nothing) in one line."""
    if args.save and Path(args.save).is_dir():
        raise CommandError(
            f"--save {args.save} is a folder: give a file name, e.g. {Path(args.save) / 'bench.json'}"
        )
    try:
        report = run(options)
    except (ScheduleError, ValueError, FileNotFoundError) as err:
        raise CommandError(" ".join(str(err).split())) from None
    text = json.dumps(report, indent=1)
    if args.save:
        write_atomic(args.save, (text + "\n").encode())
    print(text if args.json else format_report(report))
    return 0


def run_lora_bench(args: argparse.Namespace) -> int:
    # torch, deepspeed: only when this command runs (pp_ext.commands)
    from pp_ext.engine.distributed import select_accelerator

    select_accelerator()  # before deepspeed is first imported (its auto-detection warns on stdout)
    import torch

    from pp_ext.bench.lora import RANKS, LoraBenchOptions, format_report, run

    if torch.cuda.is_available() and torch.cuda.device_count() < RANKS:
        raise CommandError(
            f"--lora starts {RANKS} local ranks, one GPU each, and {torch.cuda.device_count()} is "
            f"visible: run it on a machine with {RANKS} GPUs, or on the CPU with CUDA_VISIBLE_DEVICES="
        )
    names = (
        tuple(n.strip() for n in args.schedules.split(",") if n.strip())
        if args.schedules
        else LORA_SCHEDULES
    )
    options = LoraBenchOptions(
        recipe=args.lora,
        overrides=tuple(args.overrides),
        schedules=names,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    return _report(args, run, options, format_report)
