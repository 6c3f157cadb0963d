"""The process group of a rank: the accelerator chosen before DeepSpeed is imported,
then DeepSpeed's distributed init (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import datetime
import os

import torch


def select_accelerator() -> None:
    """Without a GPU, DeepSpeed's CPU accelerator, chosen before deepspeed is imported
    (its auto-detection says the same with a warning on stdout)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(local_rank: int, timeout_s: float | None = None) -> None:
    """DeepSpeed's process group from the environment (RANK, WORLD_SIZE, MASTER_*):
    NCCL on GPUs (this rank's device), gloo on CPU. ``timeout_s`` bounds every wait
    for a peer (gloo raises, NCCL's watchdog aborts); None keeps torch's default."""
    select_accelerator()
    import deepspeed  # here, not at the top: the accelerator is chosen first

    # the shm comm op is JIT-built (~80 s) on first init and never used by training
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False, **timeout
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def shut_down() -> None:
    """Destroy the process group once every rank is done with it (PyTorch's "Shutdown":
    ``destroy_process_group`` near the end of main). Left to the interpreter's exit,
    gloo's worker threads can outlive it: a rank then dies with "terminate called
    without an active exception" (SIGABRT, seen once in a finished quickstart), and
    NCCL warns that the group was not destroyed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where this rank's collectives put their tensors: NCCL (``init_distributed``'s
    backend on GPUs) reduces no CPU tensor ("No backend type associated with device type
    cpu"), so figures summed over ranks ride on the rank's GPU; gloo's CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
