"""Timing and reporting shared by the benchmarks (medians of repeated runs, ratios to the
torch reference measured in the same run, memory bandwidth of this machine)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# The real photos (../shared/data beside the checkout, or $NAMEDMASK_SHARED_DATA).
SHARED_DATA = Path(os.environ.get("NAMEDMASK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def timeit(fn, repeat: int = 5, warmup: int = 1, sync_cuda: bool = False) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_BANDWIDTH = None


def settle(timeout: float = 1.0) -> None:
    """Waits until no other thread of this process is runnable. Call it after a reference that
    uses NumPy/scipy: their OpenBLAS threads spin for ~0.1 s after it returns (measured 91-127 ms
    after the scipy bilateral solver), and the CPU kernels share work only with cores idle at the
    time of the call, so the calls right after it saw a busy core and ran on one thread."""
    if not os.path.isdir("/proc/self/task"):  # not Linux: give spinning threads time to sleep
        time.sleep(0.2)
        return
    me = str(threading.get_native_id())
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        states = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    states.append(task != me and f.read().rsplit(")", 1)[1].split()[0] == "R")
            except OSError:  # the thread ended
                pass
        if not any(states):
            return
        time.sleep(0.005)


def memory_bandwidth() -> float:
    """Measured read bandwidth of this machine in bytes/s (sum over a 1 GiB buffer,
    all torch threads)."""
    global _BANDWIDTH
    if _BANDWIDTH is None:
        buf = torch.ones(1 << 27, dtype=torch.int64)  # 1 GiB
        t = timeit(lambda: buf.sum(), repeat=5)
        _BANDWIDTH = buf.numel() * 8 / t
        del buf
    return _BANDWIDTH


@dataclass
class Row:
    op: str
    backend: str
    shape: str
    seconds: float
    ratio_vs_torch: float | None = None       # torch time / this time (>1 = faster)
    bandwidth_pct: float | None = None         # bytes moved / time / machine bandwidth
    extra: dict = field(default_factory=dict)


def gpu_rows(op: str, shape: str, call, repeat: int = 5) -> list:
    """On a GPU machine, one row per live CUDA-device backend of `op` (call(backend) runs it
    on GPU tensors), with its ratio to the torch reference on the same GPU; else none."""
    if not torch.cuda.is_available():
        return []
    from namedmask import ops

    t_ref = timeit(lambda: call("torch"), repeat=repeat, sync_cuda=True)
    rows = []
    for backend in ops.available_backends(op, "cuda"):
        t = timeit(lambda: call(backend), repeat=repeat, sync_cuda=True)
        rows.append(Row(op, f"{backend} (gpu)", shape, t, t_ref / t))
    return rows


def memory_floor_row(nbytes: int, verb: str = "read") -> Row:
    """The time to move `nbytes` once at this machine's measured bandwidth."""
    return Row("memory floor", "-", f"{nbytes / 1e6:.0f} MB {verb}", nbytes / memory_bandwidth(), None, 100.0,
               {"bandwidth": f"{memory_bandwidth() / 1e9:.1f} GB/s"})


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n== {title}")
    print(f"{'op':<22}{'backend':<16}{'shape':<30}{'time':>12}{'vs torch':>10}{'% mem bw':>10}")
    for r in rows:
        t = f"{r.seconds * 1e3:9.2f} ms" if r.seconds < 10 else f"{r.seconds:9.2f} s "
        ratio = f"{r.ratio_vs_torch:9.1f}x" if r.ratio_vs_torch else f"{'-':>10}"
        bw = f"{r.bandwidth_pct:9.1f}%" if r.bandwidth_pct is not None else f"{'-':>10}"
        print(f"{r.op:<22}{r.backend:<16}{r.shape:<30}{t:>12}{ratio}{bw}")
        for k, v in r.extra.items():
            print(f"{'':<38}{k}: {v}")


def environment() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "memory_bandwidth_GBps": memory_bandwidth() / 1e9}


def save_json(rows: list[Row], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), "results": [asdict(r) for r in rows]}, indent=2))
