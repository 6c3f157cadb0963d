"""GPU smoke suite (`bash tests/run.sh -m gpu`; .github/workflows/gpu-smoke.yml runs it
on a self-hosted multi-GPU runner): the smoke recipe (recipes/smoke-gpu.yaml: bf16,
ZeRO-1, NCCL) launched with `deepspeed --num_gpus N` for every layout that fits the
visible GPUs and a schedule of each family, each compared with the single-GPU run.

bf16 rounds differently when the work is split differently, so losses are compared
within bf16's resolution (BF16_TOLERANCE relative), not the fp32 1e-5 of the CPU
suite, which stays the exactness gate. Skipped with the reason where no GPU is visible.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/smoke-gpu.yaml"
BF16_TOLERANCE = 2e-2  # relative: a few bf16 ulps (2^-8) of the loss after 20 steps


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


GPUS = visible_gpus()
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(GPUS == 0, reason="the GPU smoke suite needs CUDA GPUs; none is visible here")]

# (name, GPUs needed, recipe overrides): a schedule of each family on the layouts that fit
CASES = [
    ("single-gpu", 1, []),
    ("single-gpu-interleaved", 1, ["parallel.schedule=interleaved-1f1b", "parallel.chunks=2"]),
    ("pipe2-1f1b", 2, ["parallel.pipeline=2"]),
    ("pipe2-interleaved", 2, ["parallel.pipeline=2", "parallel.schedule=interleaved-1f1b"]),
    ("pipe2-zb-h1", 2, ["parallel.pipeline=2", "parallel.schedule=zb-h1"]),
    ("pipe2-zbv", 2, ["parallel.pipeline=2", "parallel.schedule=zbv"]),
    ("pipe2-dualpipev", 2, ["parallel.pipeline=2", "parallel.schedule=dualpipev"]),
    ("pipe2-chimera", 2, ["parallel.pipeline=2", "parallel.schedule=chimera"]),
    ("data2", 2, ["parallel.micro_batches=4"]),
    ("tensor2", 2, ["parallel.tensor=2"]),
    ("pipe2-data2-zbv", 4, ["parallel.pipeline=2", "parallel.schedule=zbv", "parallel.micro_batches=4"]),
    ("pipe2-tensor2-zb-h1", 4, ["parallel.pipeline=2", "parallel.tensor=2", "parallel.schedule=zb-h1"]),
]


def train(out: Path, gpus: int, overrides: list[str]) -> dict[int, float]:
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(gpus), "launch/train.py",
               "--recipe", str(RECIPE), f"output_dir={out}", "checkpoint.resume=never", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "4"})
    assert result.returncode == 0, result.stderr[-4000:]
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    return train(tmp_path_factory.mktemp("reference"), 1, [])


@pytest.mark.parametrize("name, gpus, overrides", CASES, ids=[c[0] for c in CASES])
def test_layout_and_schedule_match_the_single_gpu_run(tmp_path, reference, name, gpus, overrides):
    if gpus > GPUS:
        pytest.skip(f"{name} needs {gpus} GPUs, {GPUS} visible")
    losses = train(tmp_path, gpus, overrides)
    assert sorted(losses) == sorted(reference)
    worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= BF16_TOLERANCE, f"{name}: losses differ from the single-GPU run by {worst:.2e} (relative)"
    assert losses[max(losses)] < losses[1], f"{name}: the loss did not fall"
    assert (tmp_path / "hf/config.json").is_file()
