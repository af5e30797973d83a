"""Process groups for tensor parallelism: the ranks' collectives (NCCL on CUDA, gloo on the CPU) and a gloo group on
which rank 0 sends each forward's inputs to the others."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from .sharding import Ranks

# A rank waits for the next step on the control group as long as the server is idle: that wait must not time out.
# The collectives inside a forward do (`timeout`): a rank that hangs then ends in an error, not a hang.
IDLE_TIMEOUT = datetime.timedelta(days=365)
DEFAULT_TIMEOUT = datetime.timedelta(seconds=120)


def multicast_off() -> None:
    """NVLink multicast stays off on our hosts (NCCL's NVLS and symmetric memory's multicast objects): defaults that
    a user's own setting overrides. Set before NCCL starts, in every rank (spawned workers inherit them)."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """This rank's device: its own GPU (cuda:local_rank) on CUDA, the CPU otherwise."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def init_groups(rank: int, size: int, device: torch.device, init_method: str | None = None,
                timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> tuple[Ranks, object]:
    """(Ranks over the default group, the control group). `init_method` None: torchrun's environment (env://)."""
    if device.type == "cuda":
        multicast_off()
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=size,
                            timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Ranks(rank, size, None), control


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
