"""Checkpoint bookkeeping of the training job: tags, completeness, integrity, ``latest``, pruning.

DeepSpeed writes the tensors (``engine.save_checkpoint(dir, tag)``); what it does not
promise is that a crash mid-save leaves ``latest`` on a loadable checkpoint, since its
``latest`` is written by one rank while others may still be writing. So pp-ext saves
with ``save_latest=False``, and only after every rank has finished (a barrier) does
rank 0 write ``<tag>/pp_ext.json`` (the completeness marker, written atomically) and
then point ``latest`` at the tag (atomically, by rename). Resuming takes the newest tag
that has the marker; a tag without it is an interrupted save and is ignored.

The marker also lists every file of the tag with its size (the save dir must be a
filesystem rank 0 sees whole, as multi-node training needs anyway), so a file
truncated or replaced later is found before DeepSpeed reads it (:func:`verify`).
Sizes, not hashes: hashing a large model's optimizer state at every save would cost
minutes, while truncation, the usual damage, always changes the size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pp_ext.config.recipe import RecipeError
from pp_ext.config.schema import Recipe
from pp_ext.tools.files import write_atomic

MARKER = "pp_ext.json"
LATEST = "latest"  # the pointer file of a save dir (DeepSpeed's name): the newest complete tag


def tag_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointError(RecipeError):
    """A checkpoint that cannot be resumed from, said in one line with what to do."""


def _files(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def mark_complete(save_dir: Path, tag: str, info: dict) -> None:
    """Rank 0, after every rank saved ``tag``: the marker (with the file sizes), then ``latest``."""
    info = {**info, "files": _files(Path(save_dir) / tag)}
    write_atomic(save_dir / tag / MARKER, json.dumps(info, indent=1, sort_keys=True).encode())
    write_atomic(save_dir / LATEST, tag.encode())


def verify(save_dir: Path, tag: str) -> None:
    """Raise :class:`CheckpointError` if a file the marker lists is missing or has
    another size than when it was saved."""
    tag_dir = Path(save_dir) / tag
    for name, size in info(save_dir, tag).get("files", {}).items():
        path = tag_dir / name
        problem = (
            "is missing"
            if not path.is_file()
            else f"has {path.stat().st_size} bytes, {size} when saved (truncated or replaced)"
            if path.stat().st_size != size
            else None
        )
        if problem:
            older = [t for _, t in complete_tags(save_dir) if t < tag]
            fix = (
                f"resume from an older one (checkpoint.resume={tag_dir.parent / older[-1]})"
                if older
                else "start afresh (checkpoint.resume=never)"
            )
            raise CheckpointError(
                f"checkpoint {tag_dir} is damaged: {name} {problem}: delete {tag_dir} or {fix}"
            )


def complete_tags(save_dir: Path) -> list[tuple[int, str]]:
    """``(step, tag)`` of every complete checkpoint in ``save_dir``, oldest first."""
    found = []
    for marker in Path(save_dir).glob(f"*/{MARKER}"):
        try:
            step = int(json.loads(marker.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable marker is no marker
        found.append((step, marker.parent.name))
    return sorted(found)


def info(save_dir: Path, tag: str) -> dict:
    return json.loads((Path(save_dir) / tag / MARKER).read_text())


def prune(save_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (0 keeps all), and
    interrupted saves older than the newest complete one. Rank 0 only."""
    tags = complete_tags(save_dir)
    if not tags:
        return []
    doomed = [tag for _, tag in tags[:-keep]] if keep else []
    newest = (Path(save_dir) / tags[-1][1]).stat().st_mtime
    complete = {tag for _, tag in tags}
    doomed += [
        p.name
        for p in Path(save_dir).iterdir()
        if p.is_dir()
        and p.name not in complete
        and p.name.startswith("step-")
        and p.stat().st_mtime < newest
    ]
    for tag in doomed:
        shutil.rmtree(Path(save_dir) / tag, ignore_errors=True)
    return doomed


def save_dir(recipe: Recipe) -> Path:
    """Where the run saves its checkpoints: ``checkpoint.dir``, by default ``output_dir/checkpoints``."""
    return Path(recipe.checkpoint.dir or Path(recipe.output_dir) / "checkpoints")


def resume_point(resume: str, save_dir: Path) -> tuple[Path, str] | None:
    """``(dir, tag)`` to resume from for ``checkpoint.resume``: ``auto`` takes the newest
    complete checkpoint of ``save_dir``, ``never`` none, anything else is a checkpoint
    folder (a tag folder or a save dir with complete checkpoints)."""
    if resume == "never":
        return None
    if resume == "auto":
        tags = complete_tags(save_dir)
        return (save_dir, tags[-1][1]) if tags else None
    path = Path(resume)
    if (path / MARKER).is_file():
        return path.parent, path.name
    if tags := complete_tags(path):
        return path, tags[-1][1]
    raise RecipeError(
        f"checkpoint.resume={resume}: no complete pp-ext checkpoint there "
        f"(use auto, never, or a folder holding {MARKER})"
    )
