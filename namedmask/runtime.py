"""Where code runs: device choice and torch.distributed setup (torchrun's environment), shared
by every stage, so each stage states only what it does on its rank."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from namedmask.errors import BadInputError, UnavailableError


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


# ---------------------------------------------------------------------------------------------
# Threads: how many a stage uses, decided once at its start (configure_threads).
#
# Two kinds of decisions, kept apart on purpose:
# - torch's intra-op thread count changes float results (a convolution's reduction order), so it
#   is a *setting*: an explicit number (--threads N, NAMEDMASK_THREADS, a config's `threads`,
#   OMP_NUM_THREADS) or, for `auto`, the cores this process may use (affinity, cgroup quota).
#   Both are properties of the configuration and the machine, never of the momentary load, so
#   the same config on the same machine gives the same bits however busy it is.
# - what does not change results may follow the load: the CPU kernels pick their helpers per call
#   from the cores idle right now (csrc/cpu/share_tasks.h, idle_helpers_for); idle_cores() below
#   is the same reading, only recorded in the run's JSON.
# A busy machine is then handled by the OpenMP runtime's wait policy (PASSIVE, set at import in
# namedmask/__init__.py): torch's threads sleep at a barrier instead of spinning, so they do not
# take the cores from the threads (ours or other processes') they wait for.

THREADS_ENV = "NAMEDMASK_THREADS"
_SOURCE: str | None = None   # where the current thread count came from (configure_threads / set_threads)


class ThreadsError(BadInputError):
    """A thread setting that is neither `auto` nor a positive integer."""


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 cpu.max, v1 cfs_quota_us / cfs_period_us) of this
    process and its ancestors; None when unlimited or unreadable."""
    from pathlib import Path

    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":      # cgroup v2
            roots = [Path("/sys/fs/cgroup")]
        elif "cpu" in controllers.split(","):           # cgroup v1
            roots = [Path("/sys/fs/cgroup") / name for name in (controllers, "cpu", "cpu,cpuacct")]
        else:
            continue
        rel = Path(path.lstrip("/"))
        for root in dict.fromkeys(roots):
            for folder in [root / rel, *[root / p for p in rel.parents]]:
                try:
                    if (folder / "cpu.max").is_file():
                        quota, period = (folder / "cpu.max").read_text().split()[:2]
                        if quota != "max":
                            limits.append(int(quota) / int(period))
                    elif (folder / "cpu.cfs_quota_us").is_file():
                        quota = int((folder / "cpu.cfs_quota_us").read_text())
                        if quota > 0:
                            limits.append(quota / int((folder / "cpu.cfs_period_us").read_text()))
                except (OSError, ValueError, ZeroDivisionError):
                    continue
    return min(limits) if limits else None


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup CPU quota (rounded
    up: a quota of 1.5 CPUs lets two threads make progress)."""
    import math

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def idle_cores() -> int | None:
    """The cores idle at this instant, the CPU kernels' reading (csrc/cpu/share_tasks.h,
    idle_helpers_for): online CPUs minus the runnable threads in /proc/loadavg (this one
    included), plus this thread's own; None where /proc/loadavg cannot be read. Recorded in the
    run's JSON (what the machine looked like); no thread count is chosen from it."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    online = os.sysconf("SC_NPROCESSORS_ONLN") if hasattr(os, "sysconf") else (os.cpu_count() or 1)
    return max(1, min(available_cores(), online - running + 1))


def parse_threads(value) -> int | None:
    """`auto` (or None/empty) -> None; a positive integer (or its string) -> that number."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        n = int(value)
        if n >= 1 and not isinstance(value, bool) and str(value).strip() == str(n):
            return n
    except (TypeError, ValueError):
        pass
    raise ThreadsError(f"threads must be auto or a positive integer, got {value!r} "
                       f"(--threads, ${THREADS_ENV} or the config's 'threads' key)")


def resolve_threads(setting="auto") -> tuple:
    """(intra-op threads, where that came from). Explicit beats automatic: --threads /
    $NAMEDMASK_THREADS, then the config's `threads`, then $OMP_NUM_THREADS, then the cores this
    process may use. Never the load."""
    env = os.environ.get(THREADS_ENV)
    if parse_threads(env) is not None:
        return parse_threads(env), f"--threads/${THREADS_ENV}"
    if parse_threads(setting) is not None:
        return parse_threads(setting), "config"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), "$OMP_NUM_THREADS"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: the ranks on this machine share its cores
    if local > 1:
        return max(1, available_cores() // local), f"auto (cores available / {local} local ranks)"
    return available_cores(), "auto (cores available: affinity and cgroup quota)"


def configure_threads(setting="auto") -> dict:
    """Sets torch's intra-op threads (resolve_threads); returns what was decided, for the run's
    JSON. Called at the start of every command (cli.py), of `namedmask run` (pipeline.py, the
    config's `threads` key) and of toy-world. torch's inter-op pool is left as torch sizes it: the
    CPU kernels take their helpers from it but never more than the intra-op count minus one
    (csrc/cpu/share_tasks.h, helpers_for), so --threads 1 means one thread there too."""
    intra, source = resolve_threads(setting)
    return set_threads(intra, source)


def set_threads(n: int, source: str) -> dict:
    """torch's intra-op threads set to `n`, remembered with where that came from (the runs'
    JSON records both); returns thread_record()."""
    global _SOURCE
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _SOURCE = source
    return thread_record(source)


def threads_source() -> str | None:
    """Where the current thread count came from (None before configure_threads/set_threads)."""
    return _SOURCE


def threads_are_automatic() -> bool:
    """Whether this process's thread count is namedmask's own choice (`auto`), not a number the
    user gave (--threads, $NAMEDMASK_THREADS, the config's `threads`, $OMP_NUM_THREADS). Only
    then may a stage spend the cores in another way (experts: one process per expert)."""
    return _SOURCE is not None and _SOURCE.startswith("auto") and torch.get_num_threads() == available_cores()


def thread_record(source: str | None = None) -> dict:
    """The threads this process runs with now, where they came from, and the machine they were
    fitted to, for a run's JSON."""
    record = {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
              "source": source or _SOURCE or "torch's current setting", "cores_available": available_cores(),
              "cores_idle_at_start": idle_cores(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "omp_wait_policy_set_by": ("namedmask" if os.environ.get("NAMEDMASK_SET_OMP_WAIT_POLICY") else
                                         "the environment" if os.environ.get("OMP_WAIT_POLICY") else None),
              "dataloader_workers_max": dataloader_workers(None)}
    return record


def dataloader_workers(requested: int | None) -> int:
    """DataLoader worker processes for a request (None: as many as fit): at most the cores this
    process may use minus the one the training loop runs on (0 on one core, where a worker only
    adds a copy of the process). Samples are a pure function of (seed, sample number) and a
    worker runs with one torch thread, so this number never changes what is trained."""
    fit = max(0, available_cores() - 1)
    return fit if requested is None else min(int(requested), fit)


def rng_snapshot(generator: torch.Generator | None = None) -> dict:
    """The random state a resumed training needs to continue exactly where it stopped: `generator`'s
    (the loop's own data generator), torch's global CPU generator (dropout and the like), NumPy's
    and Python's, as tensors (loadable with torch.load(weights_only=True))."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    snap = {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss": py_gauss}}
    if generator is not None:
        snap["generator"] = generator.get_state()
    return snap


def restore_rng(snap: dict, generator: torch.Generator | None = None) -> None:
    """Puts back what rng_snapshot saved."""
    import random

    import numpy as np

    torch.set_rng_state(snap["torch"])
    n = snap["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["gauss"])))
    p = snap["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if generator is not None:
        generator.set_state(snap["generator"])


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread for the block. A training sample's augmentation runs here, so
    it gives the same bits in the main process (num_workers 0, where torch has N threads) as in a
    DataLoader worker (always one thread): measured, 2 threads change a few of its pixels."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
