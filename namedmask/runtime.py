"""Where code runs: device choice and torch.distributed setup (torchrun's environment), shared
by every stage, so each stage states only what it does on its rank."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from namedmask.errors import UnavailableError


class DeviceError(UnavailableError):
    """A device that is asked for but not present."""


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this process group was created by setup_distributed (and is destroyed by train)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if not isinstance(pref, str) or not (pref in ("auto", "cpu", "cuda", "mps") or (
            pref.startswith("cuda:") and pref[5:].isdigit())):
        raise DeviceError(f"unknown device {pref!r}; use auto, cpu, cuda or cuda:N")
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("device cuda requested but no CUDA device is available; use device=cpu")
        device = torch.device("cuda", local_rank) if pref == "cuda" else torch.device(pref)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    return torch.device(pref)


def check_backend(op: str, backend: str, device: str | torch.device = "cpu") -> None:
    """A kernel backend asked for (--backend) proven usable once, before the work: an unknown
    or unavailable one is one error, not a failure blamed on every input file."""
    from namedmask.ops.registry import BackendUnavailable, select

    try:
        select(op, backend, torch.device(device))
    except (BackendUnavailable, ValueError) as exc:
        raise DeviceError(f"--backend {backend}: {exc}") from None


def setup_distributed(device_pref: str) -> DistContext:
    """torchrun's environment -> process group (nccl on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank, world, device, owns)


def sync_buffers(ctx: DistContext, model) -> None:
    """BN running statistics from rank 0 to all ranks. DDP broadcasts them before every
    forward, so this changes nothing in training, but after the last step each rank holds
    its own statistics; synced, every rank ends with rank 0's (saved) model."""
    if ctx.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group). Under torchrun (WORLD_SIZE>1)
    a gloo group is used for the barrier only, on CPU and GPU machines alike."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    # Ranks wait at the barrier until the slowest finishes embedding: allow a long time.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size(), True
