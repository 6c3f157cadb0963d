"""Two rules for every test.

Every test runs pp-ext's point-to-point under NCCL's rules, emulated on gloo
(pp_ext.engine.nccl_emulation): a send completes only once its receiver has taken it,
and a rank's ops complete in posting order. Gloo alone buffers sends and would pass
programs that hang on GPUs. Spawned ranks and launched jobs inherit it;
``PP_EXT_P2P= bash tests/run.sh`` runs plain gloo instead.

The quick subset's contract (setup.cfg): a test not marked ``slow`` starts no process.
Every such test runs with process creation watched (``subprocess``, ``multiprocessing``
and so ``torch.multiprocessing``, ``os.fork``/``os.posix_spawn``); one that starts a
process fails at teardown naming what it started, so a process launch cannot slip
into ``pytest -m "not slow"`` unmarked.
"""

from __future__ import annotations

import gc
import multiprocessing.process
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_cases import MINIMAL

os.environ.setdefault("PP_EXT_P2P", "emulate-nccl")


@pytest.fixture(autouse=True)
def starts_no_process_unless_slow(request, monkeypatch):
    if request.node.get_closest_marker("slow"):
        yield
        return
    started: list[str] = []

    def watch(owner, name: str, what) -> None:
        original = getattr(owner, name)

        def watched(*args, **kwargs):
            started.append(what(*args))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    watch(subprocess.Popen, "_execute_child", lambda popen, args, *_: f"subprocess {args!r:.120}")
    watch(
        multiprocessing.process.BaseProcess, "start", lambda process: f"multiprocessing {process!r}"
    )
    watch(os, "fork", lambda: "os.fork()")
    watch(os, "posix_spawn", lambda path, *_: f"os.posix_spawn({path!r})")
    yield
    if started:
        pytest.fail(f"starts a process but is not marked slow: {'; '.join(started)}", pytrace=False)


@pytest.fixture(autouse=True)
def destroys_its_process_groups(monkeypatch):
    """Each process group a test makes in this process is destroyed after it. Every DeepSpeed
    grid makes its topology's groups, and gloo gives each a thread polling its sockets every
    10 ms: the thousand groups the suite's engines made, left alive, kept a core busy for the
    rest of the run (half the machine the spawned ranks after them had). DeepSpeed's cached
    groups go with them (``deepspeed.utils.groups`` keeps its first world group)."""
    import torch.distributed as dist

    made: list = []
    new_group = dist.new_group

    def made_group(*args, **kwargs):
        made.append(group := new_group(*args, **kwargs))
        return group

    monkeypatch.setattr(dist, "new_group", made_group)
    yield
    if not made:
        return
    from deepspeed.utils import groups

    for group in made:
        if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
    if any(groups._WORLD_GROUP is group for group in made):
        groups._WORLD_GROUP = None


def pytest_collection_finish(session):
    """Freeze what collection imported (torch, deepspeed, transformers), so that a full
    collection scans only what the tests made. And DeepSpeed's BF16_Optimizer prints a
    memory report at its start (``see_memory_usage(..., force=True)``, 4 per engine),
    each after a full ``gc.collect()``: 0.15 s apiece at the quick subset's heap, 10 s in
    all, for lines no test reads; in this process it reports nothing (spawned ranks,
    fresh interpreters, keep DeepSpeed's own). And matplotlib's font cache is built."""
    # matplotlib's first use on a machine builds its font cache by running fc-list: done here,
    # before any test's process guard, so the first test that draws is not blamed for it
    import matplotlib.font_manager  # noqa: F401

    if "deepspeed" in sys.modules:
        from deepspeed.runtime import bf16_optimizer

        bf16_optimizer.see_memory_usage = lambda message, force=False: None
    gc.freeze()


@pytest.fixture(scope="module")
def world():
    """A process group of one rank (gloo), for what builds a DeepSpeed module in the test process."""
    from deepspeed import comm as dist

    from pp_ext.testing.spawn import free_port, init_rank

    if not dist.is_initialized():
        init_rank(0, 1, free_port())


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    """A minimal recipe (:data:`recipe_cases.MINIMAL`) in the test's folder."""
    path = tmp_path / "recipe.yaml"
    path.write_text(MINIMAL)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """A folder holding the config of a tiny untied Llama (4 layers, no weights), for the benches."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tiny")
    LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ).save_pretrained(folder)
    return str(folder)
