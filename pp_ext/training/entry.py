"""The training job: recipe -> pipeline (x data) ranks -> fine-tuned HF model.

Run by the ``deepspeed`` launcher, one process per rank::

    deepspeed --num_gpus 2 launch/train.py --recipe recipes/quickstart.yaml train.steps=100

(``launch/train.py`` chooses DeepSpeed's accelerator before this module imports deepspeed.)

Every user error (recipe, world size, schedule constraints, missing files, model
against tokenizer and data: :mod:`pp_ext.training.preflight`) is found before the process
group starts where it can be, and is one line on stderr from rank 0 with exit code 2
on every rank; one found later by some ranks stops every rank the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer

from pp_ext.checkpoint import reshape
from pp_ext.checkpoint import tags as checkpoints
from pp_ext.checkpoint.export import ExportError, export_checkpoint, save_hf_metadata
from pp_ext.config.recipe import RecipeError, deepspeed_config, load
from pp_ext.data import batches as data
from pp_ext.engine.distributed import init_distributed
from pp_ext.engine.engine import PipelineError
from pp_ext.engine.initialize import initialize
from pp_ext.hf import build_pipeline_module
from pp_ext.schedules import Kind, get
from pp_ext.schedules.render import write_atomic
from pp_ext.training.loss import LanguageModelLoss
from pp_ext.training.preflight import check_before_launch, check_data

USAGE_ERROR = 2


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(message: str) -> None:
    """Progress and results, from rank 0 only."""
    if _rank() == 0:
        print(f"pp-ext: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipes/NAME.yaml")
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by `deepspeed`
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    return parser.parse_args(argv)


# what the user fixes (one line, exit code 2), as opposed to a bug (a traceback)
USER_ERRORS = (RecipeError, FileNotFoundError, ExportError)


def _threads() -> None:
    if not torch.cuda.is_available():  # ranks on one CPU machine share its cores
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def make_optimizer(recipe, module):
    """AdamW (or SGD) as torch's own: DeepSpeed's "optimizer" config on CPU would
    JIT-build FusedAdam for minutes (FACTS). No weight decay on biases and norms."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": recipe.train.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    if recipe.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.train.lr)
    return torch.optim.AdamW(
        groups, lr=recipe.train.lr, betas=tuple(recipe.train.betas), eps=recipe.train.eps
    )


def warmup_cosine(optimizer, recipe, steps: int, updates_per_step: int = 1):
    """Linear warm-up over ``train.warmup_steps`` steps, then cosine decay from
    ``train.lr`` to ``train.min_lr`` at the last step (Loshchilov & Hutter 2017, SGDR,
    without restarts): step ``s`` (1-based) trains with ``lr * s / warmup`` while
    ``s <= warmup``, then ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t`` the
    fraction of the decay done.

    torch's LambdaLR, which DeepSpeed steps after every optimizer step and keeps in
    its checkpoints. Not DeepSpeed's WarmupCosineLR: its ratio is 0 at iterations -1
    and 0, so the first two steps train with learning rate 0 (seen in metrics.jsonl).
    An asynchronous schedule may update ``updates_per_step`` times per step (PipeDream
    after every micro-batch): the schedule is counted in updates, so it spans the run."""
    floor = recipe.train.min_lr / recipe.train.lr if recipe.train.lr else 0.0
    warmup, steps = recipe.train.warmup_steps * updates_per_step, steps * updates_per_step

    def factor(done: int) -> float:  # ``done`` steps finished: the factor of step done + 1
        if done < warmup:
            return (done + 1) / warmup
        t = min(1.0, (done - warmup) / max(1, steps - warmup - 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def updates_per_step(spec, pipe: int, recipe, chunks: int) -> int:
    """Optimizer updates in one ``train_batch``: 1, or the weight updates (U actions)
    an asynchronous program makes per call (its stream shows several calls)."""
    if spec is None:
        return 1
    schedule = spec.build(pipe, recipe.parallel.micro_batches, chunks)
    updates = sum(a.kind is Kind.U for a in schedule.programs[0])
    return max(1, updates * recipe.parallel.micro_batches // schedule.micro_batches)


class MetricsLog:
    """``metrics.jsonl`` in the run directory, one object per line (rank 0 writes).

    On resume the lines past the checkpoint's step are dropped (they are recomputed),
    so the file always reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if _rank() != 0:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
        write_atomic(path, "".join(line + "\n" for line in kept).encode())

    def write(self, entry: dict) -> None:
        if _rank() == 0:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")


def _all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def evaluate(engine, loss: LanguageModelLoss, batches_fn, eval_batches: int) -> dict:
    """Mean eval loss over ``eval_batches`` steps' worth of micro-batches, averaged
    over data-parallel replicas, and answer accuracy summed over all of them."""
    loss.collect, loss.counts = True, [0.0, 0.0]
    eval_data = batches_fn()
    try:
        losses = [float(engine.eval_batch(eval_data)) for _ in range(eval_batches)]
    finally:
        loss.collect = False
    last = engine.is_last_stage()
    # every rank contributes: loss-stage ranks their figures, the others zeros
    total_loss, replicas, right, answers = _all_sum(
        [
            sum(losses) / len(losses) if last else 0.0,
            1.0 if last else 0.0,
            *(loss.counts if last else (0, 0)),
        ]
    )
    result = {"eval_loss": total_loss / replicas}
    if answers:
        result["eval_accuracy"] = right / answers
    return result


def run(
    recipe, world_size: int, pipe: int, tensor: int, data_parallel: int, chunks: int, prebuilt=None
) -> int:
    """Train ``recipe`` on the layout :func:`~pp_ext.training.preflight.check_before_launch` returned for it
    (``prebuilt``: its ``auto`` schedule from the profile, the same on every rank)."""
    output_dir, save_dir = Path(recipe.output_dir), checkpoints.save_dir(recipe)
    _threads()
    init_distributed(int(os.environ.get("LOCAL_RANK", "0")), recipe.parallel.comm_timeout_s)
    torch.manual_seed(recipe.train.seed)

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer or recipe.model.path)
    global_batch = recipe.train.micro_batch_size * recipe.parallel.micro_batches * data_parallel
    train_set = eval_set = None
    if recipe.train.steps != 0:  # a conversion (steps 0) reads no data
        # rank 0 tokenizes first and fills datasets' cache; the others then read it
        for first in (True, False):
            with _together():
                if (_rank() == 0) == first:
                    train_set = data.load(recipe.data, tokenizer, "train", seed=recipe.train.seed)
                    eval_set = data.load(recipe.data, tokenizer, "eval", seed=recipe.train.seed)
        per_epoch = data.steps_per_epoch(len(train_set), global_batch)
    steps = (
        recipe.train.steps
        if recipe.train.steps is not None
        else math.ceil(recipe.train.epochs * per_epoch)
    )
    if _rank() == 0:  # nothing is written before the data is known to be good
        save_dir.mkdir(parents=True, exist_ok=True)
        # the resolved recipe beside the results: what ran, and what `pp-ext report` reads
        write_atomic(output_dir / "recipe.yaml", OmegaConf.to_yaml(recipe, resolve=True).encode())

    schedule = recipe.parallel.schedule
    spec = None if schedule == "deepspeed-1f1b" else get(schedule)
    placement = (
        prebuilt.placement.name if prebuilt else spec.placement_for(chunks) if spec else "loop"
    )
    loss = LanguageModelLoss()
    module = build_pipeline_module(
        recipe.model.path,
        topology=PipeModelDataParallelTopology(num_pp=pipe, num_mp=tensor, num_dp=data_parallel),
        chunks=chunks,
        placement=placement,
        partition_method=recipe.parallel.partition,
        loss_fn=loss,
        dtype=recipe.model.dtype,
        attn_implementation=recipe.model.attn_implementation,
        activation_checkpoint_interval=recipe.model.activation_checkpoint_interval,
        seed=recipe.train.seed,
    )
    loss.tensor_axis = module.tensor_axis
    optimizer = make_optimizer(recipe, module)
    engine, *_ = initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=warmup_cosine(
            optimizer, recipe, steps, updates_per_step(spec, pipe, recipe, chunks)
        ),
        config=deepspeed_config(recipe, data_parallel, str(output_dir)),
        schedule=prebuilt or schedule,
    )

    # what a checkpoint's layout is compared on (pp_ext.checkpoint.reshape.LAYOUT_KEYS)
    layout = {
        "pipeline": pipe,
        "tensor": tensor,
        "data": data_parallel,
        "chunks": chunks,
        "placement": placement,
        "partition": OmegaConf.to_container(recipe.parallel.partition)
        if OmegaConf.is_config(recipe.parallel.partition)
        else recipe.parallel.partition,
    }
    start = 0
    resume_from = checkpoints.resume_point(recipe.checkpoint.resume, save_dir)
    if resume_from is not None:
        load_dir, tag = resume_from
        checkpoints.verify(load_dir, tag)
        saved = checkpoints.info(load_dir, tag)
        reshaped = reshape.changes(saved, layout)
        try:
            if reshaped:
                reshape.load(engine, load_dir / tag, reshaped)
            else:
                engine.load_checkpoint(str(load_dir), tag=tag)
        except checkpoints.CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever DeepSpeed says, the fix is the user's
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise checkpoints.CheckpointError(
                f"checkpoint {load_dir / tag} cannot be loaded into this run "
                f"({first}): resume from another one or set "
                f"checkpoint.resume=never"
            ) from exc
        start = saved["step"]
        say(
            f"resumed from {load_dir / tag} at step {start}"
            + (f", reshaped ({', '.join(reshaped)})" if reshaped else "")
        )
    log = MetricsLog(output_dir / "metrics.jsonl", start if resume_from else None)

    dp_rank = engine.grid.get_data_parallel_rank()

    def batches(dataset, start_step: int = 0):
        return data.micro_batches(
            dataset,
            micro_batch_size=recipe.train.micro_batch_size,
            micro_batches=recipe.parallel.micro_batches,
            dp_rank=dp_rank,
            dp_size=data_parallel,
            seed=recipe.train.seed,
            start_step=start_step,
        )

    def settle() -> None:
        # an asynchronous schedule keeps micro-batches in flight from one step to the
        # next: drained (its weight versions collapsed) before eval, checkpoints, the end
        if hasattr(engine, "flush"):
            engine.flush()

    def save(step: int) -> None:
        settle()
        tag = checkpoints.tag_name(step)
        engine.save_checkpoint(
            str(save_dir),
            tag=tag,
            save_latest=False,
            client_state={"step": step, **reshape.client_state(engine)},
        )
        if _rank() == 0:
            save_hf_metadata(save_dir / tag, recipe.model.path, recipe.model.tokenizer)
        dist.barrier()  # every rank's files are on disk before the marker says so
        if _rank() == 0:
            checkpoints.mark_complete(save_dir, tag, {"step": step, "schedule": schedule, **layout})
            checkpoints.prune(save_dir, recipe.checkpoint.keep)
        dist.barrier()

    def run_eval(step: int) -> None:
        if eval_set is None:
            return
        settle()
        result = evaluate(engine, loss, lambda: batches(eval_set), recipe.train.eval_batches)
        log.write({"step": step, **result})
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))

    say(
        f"{world_size} ranks = pipeline {pipe} x tensor {tensor} x data {data_parallel}; schedule {schedule}, "
        f"{recipe.parallel.micro_batches} micro-batches x {recipe.train.micro_batch_size} x "
        f"{recipe.data.seq_len} tokens; "
        + (
            f"{steps} steps ({len(train_set)} training samples)"
            if steps
            else "0 steps: load and export"
        )
    )
    if start == 0 and steps > 0:
        run_eval(0)
    train_batches = batches(train_set, start)
    tokens = global_batch * recipe.data.seq_len
    progress = _progress(steps, start, recipe.logging.progress)
    for step in range(start + 1, steps + 1):
        lr = engine.get_lr()[0]  # this step's (the scheduler moves on after it)
        skipped = engine.skipped_steps
        began = time.perf_counter()
        value = float(engine.train_batch(train_batches))
        elapsed = time.perf_counter() - began
        entry = {
            "step": step,
            "loss": value,
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
        }
        if engine.skipped_steps > skipped or not math.isfinite(value):
            if (
                engine.skipped_steps == skipped
            ):  # an optimizer that did not skip: the weights took the step
                log.write(entry)
                say(
                    f"error: step {step}: loss {value} and the optimizer updated the weights anyway: stopping; "
                    f"resume from the last checkpoint in {save_dir}"
                )
                return 1
            entry["skipped"] = True
            log.write(entry)
            if recipe.train.nonfinite == "stop":
                say(
                    f"error: step {step}: loss {value}, gradients not finite: stopped before the weights changed "
                    f"(lower train.lr or check the data; train.nonfinite=skip skips such steps)"
                )
                return 1
            say(f"step {step}: loss {value}, gradients not finite: step skipped, weights unchanged")
        else:
            log.write(entry)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}"
            )
        elif recipe.logging.progress and step % recipe.train.log_interval == 0:
            say(
                f"step {step}/{steps}: loss {value:.4f}, lr {lr:.2e}, {tokens / elapsed:.0f} tokens/s"
            )
        if recipe.train.eval_interval and step % recipe.train.eval_interval == 0 and step != steps:
            run_eval(step)
        if recipe.checkpoint.interval and step % recipe.checkpoint.interval == 0 and step != steps:
            save(step)
    if progress is not None:
        progress.close()
    if steps > 0 and start < steps:
        run_eval(steps)
    final = checkpoints.tag_name(steps)
    if not (save_dir / final / checkpoints.MARKER).exists():
        save(steps)
    with _together():
        if _rank() == 0:
            export_checkpoint(save_dir, output_dir / "hf", tag=final, overwrite=True)
            say(f"exported the model to {output_dir / 'hf'} (from_pretrained loads it)")
    return 0


@contextmanager
def _together():
    """The block on this rank, then a meeting of every rank (a barrier): if the block
    raised a user error on any rank, every rank raises the first one (rank 0 says it),
    rather than one rank stopping while the others wait for it in a collective until
    it is gone ("Connection closed by peer")."""
    error = None
    try:
        yield
    except USER_ERRORS as exc:
        error = " ".join(str(exc).split())
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if first := next((e for e in errors if e is not None), None):
        raise RecipeError(first)


def _progress(steps: int, start: int, enabled: bool):
    """A live bar on rank 0 when stderr is a terminal; logs get plain lines instead."""
    if not enabled or _rank() != 0 or steps == 0 or not sys.stderr.isatty():
        return None
    return tqdm(
        total=steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        recipe = load(args.recipe, args.overrides)
        layout = check_before_launch(recipe, world_size)
        if recipe.data.path is not None:
            check_data(recipe)  # bad data fails here, not on one rank later
        return run(recipe, world_size, *layout)
    except USER_ERRORS as exc:  # the user's to fix: one line
        say(f"error: {' '.join(str(exc).split())}")
        return USAGE_ERROR
    except PipelineError as exc:  # every rank says where it was: rank 0 may be the one that died
        print(f"pp-ext: error: {exc}", file=sys.stderr, flush=True)
        return 1
