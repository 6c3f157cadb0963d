"""The training loop (as torchtitan's ``Trainer``): :meth:`Trainer.train` only loops and
hands each step to :meth:`Trainer.train_step`, evaluations to :meth:`Trainer.evaluate`
and checkpoints to the :class:`~pp_ext.checkpoint.checkpointer.Checkpointer`; the set-up
(process group, data, the ranks' layers, the engine) is :meth:`Trainer.__init__`'s.

A step whose gradients are not finite never touches the weights: the bf16 and ZeRO
optimizers skip it (``engine.skipped_steps``), and ``train.nonfinite`` says whether
the run then stops (``stop``, the default) or goes on (``skip``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import datasets
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer

from pp_ext.checkpoint import tags
from pp_ext.checkpoint.checkpointer import Checkpointer
from pp_ext.checkpoint.export import export_checkpoint
from pp_ext.config.layout import Layout
from pp_ext.config.recipe import deepspeed_config
from pp_ext.config.schema import Recipe
from pp_ext.data import batches as data
from pp_ext.engine.distributed import comm_device, init_distributed
from pp_ext.engine.initialize import initialize
from pp_ext.hf import build_pipeline_module, router_loss_coef
from pp_ext.hf.loading import load_config
from pp_ext.moe.bias_update import BiasUpdate, max_imbalance
from pp_ext.peft import apply_lora
from pp_ext.peft.config import ADAPTER_CONFIG
from pp_ext.schedules import Schedule, get
from pp_ext.schedules.registry import BASELINE
from pp_ext.tools.files import write_atomic
from pp_ext.tools.logging import get_logger, rank
from pp_ext.training.errors import together
from pp_ext.training.loss import LanguageModelLoss
from pp_ext.training.metrics_log import MetricsLog
from pp_ext.training.optim import make_optimizer, updates_per_step, warmup_cosine

log = get_logger()


class StopTraining(Exception):
    """A step the run cannot go on from (its message says why and what to do)."""


@dataclass
class StepResult:
    loss: float
    lr: float
    seconds: float


def _threads() -> None:
    if not torch.cuda.is_available():  # ranks on one CPU machine share its cores
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def _all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


class Trainer:
    """Train ``recipe`` on the ``layout`` :func:`~pp_ext.training.preflight.check_before_launch`
    returned for it (``prebuilt``: its ``auto`` schedule from the profile, the same on
    every rank)."""

    def __init__(self, recipe: Recipe, layout: Layout, prebuilt: Schedule | None = None) -> None:
        self.recipe, self.layout = recipe, layout
        self.output_dir = Path(recipe.output_dir)
        _threads()
        init_distributed(int(os.environ.get("LOCAL_RANK", "0")), recipe.parallel.comm_timeout_s)
        torch.manual_seed(recipe.train.seed)
        self._load_data()
        if rank() == 0:  # nothing is written before the data is known to be good
            tags.save_dir(recipe).mkdir(parents=True, exist_ok=True)
            # the resolved recipe beside the results: what ran, and what `pp-ext report` reads
            write_atomic(
                self.output_dir / "recipe.yaml", OmegaConf.to_yaml(recipe, resolve=True).encode()
            )
        name = recipe.parallel.schedule
        spec = None if name == BASELINE else get(name)
        self.loss = LanguageModelLoss(router_loss_coef(load_config(recipe.model.path)))
        module = build_pipeline_module(
            recipe.model.path,
            topology=PipeModelDataParallelTopology(
                num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data
            ),
            chunks=layout.chunks,
            placement=layout.placement,
            partition_method=recipe.parallel.partition,
            loss_fn=self.loss,
            dtype=recipe.model.dtype,
            attn_implementation=recipe.model.attn_implementation,
            activation_checkpoint_interval=recipe.model.activation_checkpoint_interval,
            seed=recipe.train.seed,
            make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by,
            expert=layout.expert,
        )
        self.loss.tensor_axis = module.tensor_axis
        if recipe.peft.type == "lora":
            with together():  # a rank with nothing to train, or an adapter missing a key
                trainable = apply_lora(module, recipe.peft, recipe.model.path, recipe.train.seed)
            module.parameters_changed()
            total = sum(p.numel() for p in module.parameters())
            log.info(
                f"LoRA r={recipe.peft.r}: rank 0 trains {trainable:,} of its {total:,} parameters "
                f"({100 * trainable / total:.2f} %); the rest frozen in {recipe.model.dtype}"
            )
        optimizer = make_optimizer(recipe, module)
        updates = updates_per_step(spec, layout.pipeline, recipe, layout.chunks)
        self.engine, *_ = initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=warmup_cosine(optimizer, recipe, self.steps, updates),
            config=deepspeed_config(recipe, layout.data, str(self.output_dir)),
            schedule=prebuilt or name,
        )
        self.bias_update = (
            BiasUpdate(
                self.engine.module,
                recipe.moe.bias_update_speed,
                self.engine.grid.get_data_parallel_group(),
            )
            if recipe.moe.bias_update_speed
            else None
        )
        self.checkpointer = Checkpointer(self.engine, recipe, layout)
        resumed = self.checkpointer.resume()
        self.start = resumed or 0
        self.metrics = MetricsLog(self.output_dir, resumed)

    def _load_data(self) -> None:
        recipe, layout = self.recipe, self.layout
        self.global_batch = (
            recipe.train.micro_batch_size * recipe.parallel.micro_batches * layout.data
        )
        self.tokens_per_step = self.global_batch * recipe.data.seq_len
        self.train_set = self.eval_set = None
        if recipe.train.steps == 0:  # a conversion reads no data
            self.steps = 0
            return
        tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer or recipe.model.path)
        if not _live(recipe.logging.progress):  # datasets' tokenizing bars, as the train bar
            datasets.disable_progress_bars()
        # rank 0 tokenizes first and fills datasets' cache; the others then read it
        for first in (True, False):
            with together():
                if (rank() == 0) == first:
                    self.train_set = data.load(
                        recipe.data, tokenizer, "train", seed=recipe.train.seed
                    )
                    self.eval_set = data.load(
                        recipe.data, tokenizer, "eval", seed=recipe.train.seed
                    )
        assert self.train_set is not None  # every rank loaded it, in one turn or the other
        per_epoch = data.steps_per_epoch(len(self.train_set), self.global_batch)
        if recipe.train.steps is not None:
            self.steps = recipe.train.steps
        else:  # the recipe's check: steps or epochs
            self.steps = math.ceil(cast(float, recipe.train.epochs) * per_epoch)

    def batches(self, dataset, start_step: int = 0):
        return data.micro_batches(
            dataset,
            micro_batch_size=self.recipe.train.micro_batch_size,
            micro_batches=self.recipe.parallel.micro_batches,
            dp_rank=self.engine.grid.get_data_parallel_rank(),
            dp_size=self.layout.data,
            seed=self.recipe.train.seed,
            start_step=start_step,
        )

    def settle(self) -> None:
        """An asynchronous schedule keeps micro-batches in flight from one step to the
        next: drained (its weight versions collapsed) before eval, checkpoints, the end."""
        if hasattr(self.engine, "flush"):
            self.engine.flush()

    def save(self, step: int) -> None:
        self.settle()
        self.checkpointer.save(step)

    def evaluate(self, step: int) -> None:
        """Mean eval loss over ``train.eval_batches`` steps' worth of micro-batches,
        averaged over data-parallel replicas, and answer accuracy summed over all of
        them: logged and said."""
        if self.eval_set is None:
            return
        self.settle()
        self.loss.collect, self.loss.counts = True, [0.0, 0.0]
        eval_data = self.batches(self.eval_set)
        try:
            losses = [
                float(self.engine.eval_batch(eval_data))
                for _ in range(self.recipe.train.eval_batches)
            ]
        finally:
            self.loss.collect = False
        last = self.engine.is_last_stage()
        # every rank contributes: loss-stage ranks their figures, the others zeros
        total_loss, replicas, right, answers = _all_sum(
            [
                sum(losses) / len(losses) if last else 0.0,
                1.0 if last else 0.0,
                *(self.loss.counts if last else (0, 0)),
            ]
        )
        result = {"eval_loss": total_loss / replicas}
        if answers:
            result["eval_accuracy"] = right / answers
        self.metrics.write({"step": step, **result})
        log.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))

    def router_loss_parts(self) -> dict[str, float]:
        """An MoE model trained with its router loss: the step's mean LM loss and mean
        load-balancing loss apart (``loss`` is ``lm_loss + router_aux_loss_coef *
        aux_loss``), over the micro-batches of every loss rank; empty otherwise. Every rank
        joins the sum, loss ranks with their figures, the others with zeros."""
        if self.loss.aux_coef is None:
            return {}
        parts, self.loss.parts = self.loss.parts, []
        lm, aux = torch.stack(parts).sum(0).tolist() if parts else (0.0, 0.0)
        lm, aux, count = _all_sum([lm, aux, float(len(parts))])
        return {"lm_loss": lm / count, "aux_loss": aux / count}

    def balance_experts(self, skipped: bool) -> dict[str, float]:
        """With ``moe.bias_update_speed``: the step's bias update (none where the optimizer
        skipped the step) and the step's largest ``max_load / mean_load`` over every MoE
        layer of every stage (each rank joins the maximum); empty otherwise."""
        if self.bias_update is None:
            return {}
        loads = self.bias_update.step(apply=not skipped)
        worst = torch.tensor([max_imbalance(loads)], device=comm_device())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return {"moe_max_imbalance": float(worst)}

    def train_step(self, step: int, train_batches) -> StepResult:
        """One ``train_batch`` (every micro-batch of the step on every rank), logged;
        :class:`StopTraining` where ``train.nonfinite`` says the run cannot go on."""
        lr = self.engine.get_lr()[0]  # this step's (the scheduler moves on after it)
        skipped = self.engine.skipped_steps
        began = time.perf_counter()
        value = float(self.engine.train_batch(train_batches))
        elapsed = time.perf_counter() - began
        entry = {
            "step": step,
            "loss": value,
            **self.router_loss_parts(),
            **self.balance_experts(self.engine.skipped_steps > skipped),
            "lr": lr,
            "tokens_per_s": self.tokens_per_step / elapsed,
            "step_time_s": elapsed,
        }
        if self.engine.skipped_steps > skipped or not math.isfinite(value):
            if self.engine.skipped_steps == skipped:  # the optimizer did not skip: it took the step
                self.metrics.write(entry)
                raise StopTraining(
                    f"error: step {step}: loss {value} and the optimizer updated the weights anyway: "
                    f"stopping; resume from the last checkpoint in {self.checkpointer.save_dir}"
                )
            entry["skipped"] = True
            self.metrics.write(entry)
            if self.recipe.train.nonfinite == "stop":
                raise StopTraining(
                    f"error: step {step}: loss {value}, gradients not finite: stopped before the "
                    f"weights changed (lower train.lr or check the data; train.nonfinite=skip skips "
                    f"such steps)"
                )
            log.info(
                f"step {step}: loss {value}, gradients not finite: step skipped, weights unchanged"
            )
        else:
            self.metrics.write(entry)
        return StepResult(value, lr, elapsed)

    def train(self) -> int:
        """The loop: 0 when the run ends exported, 1 when a step stopped it."""
        recipe, layout, steps = self.recipe, self.layout, self.steps
        log.info(
            f"{layout.world_size} ranks = pipeline {layout.pipeline} x tensor {layout.tensor} x data "
            f"{layout.data}; schedule {recipe.parallel.schedule}, {recipe.parallel.micro_batches} "
            f"micro-batches x {recipe.train.micro_batch_size} x {recipe.data.seq_len} tokens; "
            + (
                f"{steps} steps ({len(self.train_set)} training samples)"
                if steps and self.train_set is not None
                else "0 steps: load and export"
            )
        )
        if self.start == 0 and steps > 0:
            self.evaluate(0)
        train_batches = self.batches(self.train_set, self.start)
        progress = _progress(steps, self.start, recipe.logging.progress)
        for step in range(self.start + 1, steps + 1):
            try:
                result = self.train_step(step, train_batches)
            except StopTraining as stop:
                log.info(str(stop))
                return 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{result.loss:.4f}",
                    lr=f"{result.lr:.2e}",
                    tok_s=f"{self.tokens_per_step / result.seconds:.0f}",
                )
            elif recipe.logging.progress and step % recipe.train.log_interval == 0:
                log.info(
                    f"step {step}/{steps}: loss {result.loss:.4f}, lr {result.lr:.2e}, "
                    f"{self.tokens_per_step / result.seconds:.0f} tokens/s"
                )
            if (
                recipe.train.eval_interval
                and step % recipe.train.eval_interval == 0
                and step != steps
            ):
                self.evaluate(step)
            if self.checkpointer.due(step, steps):
                self.save(step)
        if progress is not None:
            progress.close()
        if steps > 0 and self.start < steps:
            self.evaluate(steps)
        if not self.checkpointer.saved(steps):
            self.save(steps)
        self.export(steps)
        return 0

    def export(self, step: int) -> None:
        with together():
            if rank() == 0:
                peft = self.recipe.peft
                out = export_checkpoint(
                    self.checkpointer.save_dir,
                    self.output_dir / "hf",
                    tag=tags.tag_name(step),
                    overwrite=True,
                    merge=peft.type == "lora" and peft.merge,
                )
                if peft.type == "lora" and not peft.merge:
                    base = json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
                    log.info(
                        f"exported the LoRA adapter to {out} (PeftModel.from_pretrained loads it "
                        f"on its base {base})"
                    )
                else:
                    log.info(f"exported the model to {out} (from_pretrained loads it)")


def _live(enabled: bool) -> bool:
    """Live bars are rank 0's, on a terminal; a log file gets plain lines instead."""
    return enabled and rank() == 0 and sys.stderr.isatty()


def _progress(steps: int, start: int, enabled: bool):
    """The train bar (:func:`_live`)."""
    if not _live(enabled) or steps == 0:
        return None
    return tqdm(
        total=steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
    )
