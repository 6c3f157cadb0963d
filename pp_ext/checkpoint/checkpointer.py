"""A run's checkpoints (as torchtitan's ``components/checkpointer``): resume at the
start, save at intervals and at the end, each tag marked complete only once every
rank's files are on disk (:mod:`.tags`), a resume under another layout re-cut
(:mod:`.reshape`), an expert-parallel run's experts saved by global index (:mod:`.experts`)."""

from __future__ import annotations

import torch.distributed as dist

from pp_ext.checkpoint import experts, reshape, tags
from pp_ext.checkpoint.export import save_hf_metadata
from pp_ext.config.layout import Layout
from pp_ext.config.schema import Recipe
from pp_ext.hf.loading import has_weights, load_config
from pp_ext.peft import Targets, lora_config
from pp_ext.tools.logging import get_logger, rank

log = get_logger()


class Checkpointer:
    def __init__(self, engine, recipe: Recipe, layout: Layout) -> None:
        self.engine, self.recipe, self.layout = engine, recipe, layout
        self.save_dir = tags.save_dir(recipe)
        # LoRA: the base weights are the model folder's, unchanged; a checkpoint holds the
        # trained tensors (adapters, modules_to_save) and their optimizer state only
        self.frozen_base = recipe.peft.type != "none"

    def resume(self) -> int | None:
        """Load the checkpoint ``checkpoint.resume`` names, if any; its step (None: a
        fresh run). A checkpoint this run cannot load is a CheckpointError, one line."""
        resume_from = tags.resume_point(self.recipe.checkpoint.resume, self.save_dir)
        if resume_from is None:
            return None
        load_dir, tag = resume_from
        tags.verify(load_dir, tag)
        saved = tags.info(load_dir, tag)
        reshaped = self.layout.changes(saved)
        try:
            # DeepSpeed's loader knows no expert files (pp_ext.checkpoint.experts): read by name
            if reshaped or max(saved.get("expert", 1), self.layout.expert) > 1:
                reshape.load(self.engine, load_dir / tag, reshaped, self.adapters())
            else:
                self.engine.load_checkpoint(
                    str(load_dir), tag=tag, load_module_strict=not self.frozen_base
                )
        except tags.CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever DeepSpeed says, the fix is the user's
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise tags.CheckpointError(
                f"checkpoint {load_dir / tag} cannot be loaded into this run "
                f"({first}): resume from another one or set "
                f"checkpoint.resume=never"
            ) from exc
        log.info(
            f"resumed from {load_dir / tag} at step {saved['step']}"
            + (f", reshaped ({', '.join(reshaped)})" if reshaped else "")
        )
        return saved["step"]

    def adapters(self) -> Targets | None:
        """What the LoRA run trains (None: full fine-tuning)."""
        if not self.frozen_base:
            return None
        config = load_config(self.recipe.model.path)
        return Targets.of(lora_config(self.recipe.peft, config), config)

    def due(self, step: int, steps: int) -> bool:
        interval = self.recipe.checkpoint.interval
        return bool(interval) and step % interval == 0 and step != steps

    def saved(self, step: int) -> bool:
        return (self.save_dir / tags.tag_name(step) / tags.MARKER).exists()

    def save(self, step: int) -> None:
        tag = tags.tag_name(step)
        with experts.layer_files_without_experts(self.engine):
            self.engine.save_checkpoint(
                str(self.save_dir),
                tag=tag,
                save_latest=False,
                exclude_frozen_parameters=self.frozen_base,
                client_state={"step": step, **reshape.client_state(self.engine)},
            )
        experts.save(self.engine, self.save_dir / tag, reshape.held_layers(self.engine.module))
        if rank() == 0:
            model = self.recipe.model
            save_hf_metadata(
                self.save_dir / tag,
                model.path,
                model.tokenizer,
                adapter=lora_config(self.recipe.peft, load_config(model.path))
                if self.frozen_base
                else None,
                # a seeded base (no weights) is rebuilt at export: the adapter needs it
                base_init=(
                    {"seed": self.recipe.train.seed, "dtype": model.dtype}
                    if self.frozen_base and not has_weights(model.path)
                    else None
                ),
            )
        dist.barrier()  # every rank's files are on disk before the marker says so
        if rank() == 0:
            tags.mark_complete(
                self.save_dir,
                tag,
                {
                    "step": step,
                    "schedule": self.recipe.parallel.schedule,
                    "peft": self.recipe.peft.type,
                    **self.layout.saved(),
                },
            )
            size = sum(tags.info(self.save_dir, tag)["files"].values())
            what = (
                ": adapters and their optimizer state, no base weights" if self.frozen_base else ""
            )
            log.info(f"saved checkpoint {self.save_dir / tag} ({size / 2**20:.2f} MiB{what})")
            tags.prune(self.save_dir, self.recipe.checkpoint.keep)
        dist.barrier()
