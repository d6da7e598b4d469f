"""confusion_matrix on a VOC-val-sized workload: 1449 pairs of 500x375 uint8 maps, 21 classes,
one call for the whole split. Backends vs the torch reference, a NumPy np.bincount
formulation, and this machine's memory floor (both label maps read once)."""
from __future__ import annotations

import numpy as np
import torch

from bench.common import Row, memory_bandwidth, print_table, timeit
from namedmask import ops


def numpy_bincount(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    t = target.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    k = t < n
    return np.bincount(t[k] * n + p[k], minlength=n * n).reshape(n, n)


def run(images: int = 1449, height: int = 375, width: int = 500, n: int = 21, repeat: int = 5) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, n, (images, height, width), generator=g, dtype=torch.uint8)
    target[:, :4] = 255  # VOC-like void band
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target % n, torch.randint(0, n, target.shape, generator=g, dtype=torch.uint8))
    shape = f"{images}x{height}x{width} u8, C={n}"
    bytes_read = pred.numel() * 2
    floor = bytes_read / memory_bandwidth()
    rows = []
    t_torch = timeit(lambda: ops.confusion_matrix(pred, target, n, backend="torch"), repeat=max(1, repeat // 2))
    t_numpy = timeit(lambda: numpy_bincount(pred.numpy(), target.numpy(), n), repeat=max(1, repeat // 2))
    want = ops.confusion_matrix(pred, target, n, backend="torch")
    for backend in ops.available_backends("confusion_matrix", "cpu"):
        if backend == "triton":
            continue  # TRITON_INTERPRET on CPU proves logic, not speed
        got = ops.confusion_matrix(pred, target, n, backend=backend)
        assert torch.equal(got, want), f"{backend} disagrees with the reference"
        t = t_torch if backend == "torch" else timeit(lambda: ops.confusion_matrix(pred, target, n, backend=backend), repeat=repeat)
        rows.append(Row("confusion_matrix", backend, shape, t, t_torch / t, 100 * floor / t,
                        {"vs numpy bincount": f"{t_numpy / t:.1f}x", "x memory floor": f"{t / floor:.2f}",
                         "achieved": f"{bytes_read / t / 1e9:.1f} GB/s"}))
    rows.append(Row("confusion_matrix", "numpy bincount", shape, t_numpy, t_torch / t_numpy, 100 * floor / t_numpy))
    if torch.cuda.is_available():
        pc, tc = pred.cuda(), target.cuda()
        t_ref = timeit(lambda: ops.confusion_matrix(pc, tc, n, backend="torch"), repeat=repeat, sync_cuda=True)
        for backend in ops.available_backends("confusion_matrix", "cuda"):
            t = timeit(lambda: ops.confusion_matrix(pc, tc, n, backend=backend), repeat=repeat, sync_cuda=True)
            rows.append(Row("confusion_matrix", f"{backend} (gpu)", shape, t, t_ref / t))
    rows.append(Row("memory floor", "-", f"{bytes_read / 1e6:.0f} MB read", floor, None, 100.0,
                    {"bandwidth": f"{memory_bandwidth() / 1e9:.1f} GB/s"}))
    return rows


if __name__ == "__main__":
    print_table(run(), "confusion_matrix (VOC val size)")
