"""launch/gpu_check.sh, the one-GPU check, run end to end on the CPU at toy sizes
(PP_EXT_GPU_CHECK_TINY=1): every stage runs, the files come back, the summary reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_at_toy_sizes(tmp_path):
    env = {
        **os.environ,
        "PP_EXT_GPU_CHECK_TINY": "1",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "launch/gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == [
        "bench-308m.json",
        "bench-308m.txt",
        "bench.log",
        "layer-8b.json",
        "layer-8b.txt",
        "lora.json",
        "lora.txt",
        "moe.json",
        "moe.txt",
        "smoke.log",
        "summary.txt",
    ]
    summary = (tmp_path / "summary.txt").read_text()
    assert summary == result.stdout
    for line in (
        "deepspeed (HF model)",
        "pp-ext 1f1b",
        "pp-ext zb-h1 / 1f1b",
        "layer 308M",
        "layer 8B shape",
        "zero-3 + peft",
        "MoE train step, qwen3_moe 2 layer(s), cpu",
        "pp-ext 1f1b p2 e2",
        "MoE pipe 2 x data 2 x expert 2: losses within",
        "LoRA: same tokens, batch and trainable parameters on every row ok",
        "smoke (single GPU): 2 skipped",
    ):
        assert line in summary, summary
    assert "no report" not in summary and all(
        "exit 0 after" in line
        for line in (tmp_path / "bench.log").read_text().splitlines()
        if line.startswith("gpu_check:")
    )
