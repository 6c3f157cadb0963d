"""Shared by the training-job tests: several recipes trained inside one launch of ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

TOLERANCE = 1e-5


def train_cases(rank: int, world: int, root: str, cases: list[tuple[str, list[str]]]) -> dict:
    """Each case is one training run of the quickstart recipe inside this process group."""
    os.chdir(ROOT)  # the recipe's paths are relative to the repository
    from pp_ext.training.entry import main

    results = {}
    for name, overrides in cases:
        out = Path(root) / name.split(":")[0]  # "dir:label" runs again in dir
        code = main(["--recipe", str(RECIPE), *QUICK, *overrides, f"output_dir={out}"])
        results[name] = (
            code,
            losses(out) if rank == 0 and (out / "metrics.jsonl").exists() else None,
        )
    return results


ROOT = Path(__file__).resolve().parent.parent


RECIPE = ROOT / "recipes/quickstart.yaml"


# small and quick: 3 steps, no evaluation, data as the quickstart's; a 2-step warm-up, as
# the recipe's 40 would keep these steps' updates (lr 5e-5) below half a bf16 ulp of the
# weights, which bf16 runs then round away (0.03 off fp32 at step 2, measured)
QUICK = [
    "train.steps=3",
    "train.warmup_steps=2",
    "data.eval_split=null",
    "logging.progress=false",
    "train.micro_batch_size=4",
]


def losses(run_dir: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}
