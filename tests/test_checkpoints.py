"""Checkpoint bookkeeping: completeness markers, `latest`, integrity, pruning (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pp_ext.checkpoint import tags as checkpoints
from pp_ext.checkpoint.tags import CheckpointError


def save(save_dir: Path, step: int, complete: bool = True) -> str:
    """What DeepSpeed's save_checkpoint leaves behind, then pp-ext's marker."""
    tag = checkpoints.tag_name(step)
    (save_dir / tag / "hf_meta").mkdir(parents=True)
    (save_dir / tag / "layer_00-model_states.pt").write_bytes(b"x" * (100 + step))
    (save_dir / tag / "hf_meta/config.json").write_text("{}")
    if complete:
        checkpoints.mark_complete(save_dir, tag, {"step": step})
    return tag


def test_latest_and_complete_tags_ignore_interrupted_saves(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    save(tmp_path, 30, complete=False)  # a crash mid-save: no marker
    assert checkpoints.complete_tags(tmp_path) == [(10, "step-00000010"), (20, "step-00000020")]
    assert (tmp_path / "latest").read_text() == "step-00000020"
    assert checkpoints.info(tmp_path, "step-00000020")["files"] == {
        "hf_meta/config.json": 2,
        "layer_00-model_states.pt": 120,
    }


def test_verify_names_a_truncated_or_missing_file_and_the_fix(tmp_path):
    save(tmp_path, 10)
    tag = save(tmp_path, 20)
    checkpoints.verify(tmp_path, tag)
    layer = tmp_path / tag / "layer_00-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:50])
    with pytest.raises(CheckpointError) as error:
        checkpoints.verify(tmp_path, tag)
    message = str(error.value)
    assert "\n" not in message
    assert (
        "layer_00-model_states.pt has 50 bytes, 120 when saved (truncated or replaced)" in message
    )
    assert f"checkpoint.resume={tmp_path / 'step-00000010'}" in message
    layer.unlink()
    with pytest.raises(CheckpointError, match="layer_00-model_states.pt is missing"):
        checkpoints.verify(tmp_path, tag)
    with pytest.raises(CheckpointError, match="start afresh"):
        (tmp_path / "step-00000010" / "layer_00-model_states.pt").unlink()
        checkpoints.verify(tmp_path, "step-00000010")


def test_prune_keeps_the_newest_and_drops_older_interrupted_saves(tmp_path):
    for step in (10, 20):
        save(tmp_path, step)
    save(tmp_path, 15, complete=False)
    save(tmp_path, 30)
    removed = checkpoints.prune(tmp_path, keep=2)
    assert sorted(removed) == ["step-00000010", "step-00000015"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step-00000020",
        "step-00000030",
    ]
    assert checkpoints.prune(tmp_path, keep=0) == []
