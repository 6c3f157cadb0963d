"""Shared by the recipe tests: the shipped model configs, a minimal recipe (the
``recipe_file`` fixture in conftest.py writes it) and the one-line error check."""

from __future__ import annotations

from pathlib import Path

import pytest

from pp_ext.config.recipe import RecipeError

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = str(ROOT / "configs/models/llama-3.1-8b")
QWEN_7B = str(ROOT / "configs/models/qwen2.5-7b")

MINIMAL = f"""
output_dir: runs/test
model:
  path: {LLAMA_8B}
data:
  path: data.jsonl
parallel:
  pipeline: 2
train:
  steps: 10
"""


def one_line_error(fn, *args) -> str:
    with pytest.raises(RecipeError) as error:
        fn(*args)
    message = str(error.value)
    assert "\n" not in message
    return message
