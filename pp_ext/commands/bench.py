"""``pp-ext bench``: every schedule's ``train_batch`` time next to DeepSpeed's own."""
from __future__ import annotations

import argparse
import json

from pp_ext.schedules import ScheduleError

from . import CommandError, non_negative_int, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time train_batch for each schedule next to DeepSpeed's TrainSchedule",
        description="Launch STAGES local ranks (one thread each on CPU), time train_batch for DeepSpeed's own "
                    "TrainSchedule and every schedule (auto: computed from the measured costs) that accepts the sizes on one small Llama-shaped model "
                    "(warm-up, repeats, median), measure per-stage F/I/W/B costs and the p2p latency, and print "
                    "measured against simulated step times. The asynchronous schedules (pipedream, pipedream-2bw, "
                    "pipemare) are timed per steady call: a train_batch once their pipeline is full (an untimed "
                    "fill before it, an untimed flush after it).")
    parser.add_argument("--stages", "-p", type=positive_int, default=2, metavar="P", help="pipeline ranks (default 2)")
    parser.add_argument("--micro-batches", "-m", type=positive_int, default=4, metavar="M",
                        help="micro-batches per step (default 4)")
    parser.add_argument("--schedules", metavar="A,B,...",
                        help="only these (comma-separated; 'deepspeed-1f1b' is always timed as the baseline)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed steps per schedule (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="model width (default 256)")
    parser.add_argument("--seq", type=positive_int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--micro-batch-size", type=positive_int, default=4, help="samples per micro-batch (default 4)")
    parser.add_argument("--blocks-per-rank", type=positive_int, default=2, help="decoder blocks per rank (default 2)")
    parser.add_argument("--vocab", type=positive_int, default=512,
                        help="vocabulary (default 512; large makes the head heavy)")
    parser.add_argument("--partitions", metavar="A,B,...", default="type:Block",
                        help="cuts of the model to time each schedule on: partition methods (parameters, uniform, "
                             "type:REGEX) or balanced (from a profile measured first); default type:Block")
    parser.add_argument("--auto-candidates", type=positive_int, default=3, metavar="K",
                        help="auto: time its K best simulated programs against each other and keep the fastest "
                             "(default 3)")
    parser.add_argument("--auto-trials", type=non_negative_int, default=5, metavar="N",
                        help="rounds of auto's trials, after the warm-up and before the timed rounds (default 5; "
                             "0: the simulated best)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    # torch, deepspeed: only when this command runs (pp_ext.commands)
    from pp_ext.engine.spawn import select_accelerator

    select_accelerator()  # before deepspeed is first imported (its auto-detection warns on stdout)
    from pp_ext.bench import BenchOptions, run

    names = tuple(n.strip() for n in args.schedules.split(",") if n.strip()) if args.schedules else ()
    options = BenchOptions(stages=args.stages, micro_batches=args.micro_batches, schedules=names,
                           repeats=args.repeats, warmup=args.warmup, hidden=args.hidden, seq=args.seq,
                           micro_batch_size=args.micro_batch_size, blocks_per_rank=args.blocks_per_rank,
                           intermediate=args.hidden * 11 // 4, heads=max(1, args.hidden // 64), vocab=args.vocab,
                           partitions=tuple(p.strip() for p in args.partitions.split(",") if p.strip()),
                           auto_candidates=args.auto_candidates, auto_trials=args.auto_trials)
    try:
        rows = run(options)
    except (ScheduleError, ValueError) as err:  # a refused size; a partition method that does not exist
        raise CommandError(str(err)) from None
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"p={args.stages} m={args.micro_batches}, hidden {args.hidden}, {args.blocks_per_rank} blocks per rank, "
          f"{args.micro_batch_size} x {args.seq} tokens per micro-batch; median of {args.repeats} steps")
    print("ratio: step time / DeepSpeed TrainSchedule's, measured in this run; simulated: the same from the "
          "measured per-stage costs")
    if any(row["asynchronous"] for row in rows):
        print("timed 'steady call': an asynchronous schedule's train_batch once its pipeline is full (the fill "
              "and drain amortised away; its weights change inside the call); simulated: the stream's time per call, "
              "each backward recomputing its forward as that engine does")
    header = f"{'schedule':<16} {'partition':<10} {'v':>2} {'placement':<13} {'step s':>8} {'ratio':>7} {'simulated':>9} {'sim ratio':>9} {'speed-up share':>14} timed"
    print(header)
    for row in rows:
        print(f"{row['schedule']:<16} {row['partition']:<10} {row['chunks']:>2} {row['placement']:<13} {row['step_time_s']:>8.3f} {row['ratio_vs_deepspeed']:>7.3f} "
              f"{row['predicted_step_s']:>9.3f} {row['predicted_ratio']:>9.3f} {row['efficiency']:>14.2f} "
              f"{'steady call' if row['asynchronous'] else 'step'}")
    for row in rows:
        if "auto_trials" in row:
            paired = row["vs_fastest_fixed"]
            print(f"auto ({row['partition']}): trial medians " + ", ".join(
                f"{'*' if trial['chosen'] else ''}{trial['origin']} {trial['trial_s']:.3f}" for trial in row["auto_trials"])
                + f" (* kept); against {paired['schedule']} ({paired['partition']}), the fastest fixed row, round by "
                  f"round: median ratio {paired['median_ratio']:.3f}, faster in {paired['faster_rounds']} of "
                  f"{paired['rounds']} rounds")
    return 0
