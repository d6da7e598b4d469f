"""Where code runs: device choice and torch.distributed setup (torchrun's environment), shared
by every stage, so each stage states only what it does on its rank."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from namedmask.errors import NamedMaskError


class DeviceError(NamedMaskError, RuntimeError):
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


def format_duration(seconds: float) -> str:
    """3725 -> '1 h 02 min', 95 -> '1 min 35 s', 7.2 -> '7.2 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Eta:
    """Logs, once, how long the rest of a long loop will take, measured over its first steps
    (after a warm-up step, which pays for lazy initialisation): `step(done)` after each one."""

    def __init__(self, log, what: str, total: int, start: int = 0, warmup: int = 1, measure: int = 5,
                 unit: str = "iterations"):
        import time

        self.log, self.what, self.total, self.unit = log, what, total, unit
        self.first, self.last = start + warmup, start + warmup + measure
        self.clock, self.t0 = time.perf_counter, None
        self.done = self.total - start <= warmup + measure  # too short to be worth a line

    def step(self, done: int) -> None:
        if self.done:
            return
        if done == self.first:
            self.t0 = self.clock()
        elif done == self.last and self.t0 is not None:
            per = (self.clock() - self.t0) / (self.last - self.first)
            left = self.total - done
            self.log.info("%s: %.2f s per step over steps %d-%d -> about %s for the remaining %d %s", self.what, per,
                          self.first + 1, self.last, format_duration(per * left), left, self.unit)
            self.done = True
