"""PipeDream-2BW's one-update delay without a pipeline: the recipe's model trained in
one process by :class:`pp_ext.testing.async_reference.AsyncReference` (the whole model as its one
stage, so every update is W(t+1) = W(t) - lr * grad f(W(t-1)), Narayanan et al. 2021,
Sec. 3.1), next to ordinary training (gradient accumulation over the same
micro-batches), both with the training job's optimizer and learning-rate schedule.
What the README's asynchronous section reports; shows that 2BW's gap to the
synchronous schedules under AdamW comes from its rule, not from the pipeline::

    python launch/delay_study.py --recipe recipes/quickstart.yaml \\
        model.path=configs/models/quickstart-untied model.tokenizer=configs/models/quickstart \\
        train.steps=400 train.lr=1e-3

prints both losses every steps/20 steps and the mean of the last 10.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoTokenizer

from pp_ext.config.recipe import RecipeError, load
from pp_ext.data import batches as data
from pp_ext.hf import layer_specs
from pp_ext.hf.loading import has_weights, hf_initializer, layout_free_specs, load_config
from pp_ext.testing.async_reference import AsyncReference
from pp_ext.testing.reference import SequentialReference
from pp_ext.training.loss import LanguageModelLoss
from pp_ext.training.optim import make_optimizer, warmup_cosine


def train(recipe, dataset, delayed: bool) -> list[float]:
    """Per-step mean micro-batch loss of ``train.steps`` steps on ``dataset`` (the
    recipe's tokenized training split), the rule's or ordinary."""
    config = load_config(recipe.model.path)
    # the training job's initial weights (a config-only model folder: HF's initialisation
    # under per-layer seeds, pp_ext.hf.loading.build_pipeline_module)
    specs = layout_free_specs(
        layer_specs(config, recipe.model.attn_implementation),
        dtype=torch.float32,
        seed=recipe.train.seed,
        initialize=hf_initializer(config),
    )
    model = SequentialReference(specs, LanguageModelLoss(), base_seed=recipe.train.seed)
    optimizer = make_optimizer(recipe, model)
    scheduler = warmup_cosine(optimizer, recipe, recipe.train.steps)
    m = recipe.parallel.micro_batches
    batches = data.micro_batches(
        dataset,
        micro_batch_size=recipe.train.micro_batch_size,
        micro_batches=m,
        dp_rank=0,
        dp_size=1,
        seed=recipe.train.seed,
    )
    rule = (
        AsyncReference("pipedream-2bw", [model], model.loss_fn, [optimizer], m) if delayed else None
    )
    losses = []
    for step in range(recipe.train.steps):
        total = 0.0
        for _ in range(m):
            inputs, labels = next(batches)
            if rule is not None:  # updates after its m-th micro-batch
                total += rule.micro_batch(inputs, labels)
            else:
                loss = model.loss(inputs, labels)
                (loss / m).backward()
                total += loss.item()
        if rule is None:
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
        losses.append(total / m)
        if step % max(1, recipe.train.steps // 20) == 0:
            print(
                f"{'2bw rule' if delayed else 'ordinary'} step {step + 1}: loss {losses[-1]:.4f}",
                flush=True,
            )
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args(argv)
    try:
        recipe = load(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"delay_study: error: {err}", file=sys.stderr)
        return 2
    if has_weights(recipe.model.path) or recipe.model.dtype != "float32":
        print(
            "delay_study: error: the study trains a config-only model folder in float32 (fresh weights, as "
            "the training job initialises them): give model.path a folder with config.json only and "
            "model.dtype=float32",
            file=sys.stderr,
        )
        return 2
    if recipe.train.grad_clip:
        print(
            f"delay_study: error: train.grad_clip={recipe.train.grad_clip}: neither run clips (the asynchronous "
            f"engines refuse clipping): set train.grad_clip=0",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer or recipe.model.path)
    dataset = data.load(recipe.data, tokenizer, "train")
    results = {
        name: train(recipe, dataset, delayed)
        for name, delayed in (("ordinary", False), ("2bw rule", True))
    }
    for name, losses in results.items():
        print(f"{name}: last-10 loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
