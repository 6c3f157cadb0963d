"""``metrics.jsonl``: what a training run logs, one JSON object per line, and what
``pp-ext report`` reads. A train step's line has ``step``, ``loss``, ``lr``,
``tokens_per_s``, ``step_time_s`` (and ``skipped`` when its gradients were not
finite; an MoE model trained with its router loss: ``lm_loss`` and ``aux_loss`` apart,
``loss`` being ``lm_loss + router_aux_loss_coef * aux_loss``); an evaluation's has ``step``, ``eval_loss`` and, for answers,
``eval_accuracy``."""

from __future__ import annotations

import json
from pathlib import Path

from pp_ext.tools.files import write_atomic
from pp_ext.tools.logging import rank

FILE = "metrics.jsonl"


class MetricsLog:
    """``run_dir/metrics.jsonl`` (rank 0 writes).

    On resume the lines past the checkpoint's step are dropped (they are recomputed),
    so the file always reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / FILE
        if rank() != 0:
            return
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
        write_atomic(self.path, "".join(line + "\n" for line in kept).encode())

    def write(self, entry: dict) -> None:
        if rank() == 0:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(train entries, eval entries)`` of ``run_dir/metrics.jsonl``; FileNotFoundError
    naming the fix where there is none."""
    path = run_dir / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the output_dir of a training run")
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if "loss" in e], [e for e in entries if "eval_loss" in e]
