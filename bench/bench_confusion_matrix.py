"""confusion_matrix on a VOC-val-sized workload: 1449 pairs of 500x375 uint8 maps, 21 classes,
one call for the whole split. Backends vs the torch reference, a NumPy np.bincount
formulation, and this machine's memory floor (both label maps read once)."""
from __future__ import annotations

import numpy as np
import torch

from bench.common import Row, gpu_rows, memory_bandwidth, memory_floor_row, print_table, timeit
from namedmask import ops


def numpy_bincount(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    t = target.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    k = t < n
    return np.bincount(t[k] * n + p[k], minlength=n * n).reshape(n, n)


def noise_workload(images, height, width, n, g):
    """Worst case: i.i.d. random labels (no runs), 70 % of predictions correct."""
    target = torch.randint(0, n, (images, height, width), generator=g, dtype=torch.uint8)
    target[:, :4] = 255  # void band
    noise = torch.randint(0, n, target.shape, generator=g, dtype=torch.uint8)
    return torch.where(torch.rand(target.shape, generator=g) < 0.7, target % n, noise), target


def piecewise_workload(images, height, width, n, g, distinct: int = 64):
    """Realistic: label maps are piecewise constant. Ground truth = a few objects of random
    classes with a 5-pixel void (255) outline as in VOC; prediction = the objects shifted by a
    few pixels plus one wrong-class blob. `distinct` maps, repeated to `images`."""
    gts, preds = [], []
    for _ in range(distinct):
        gt = torch.zeros(height, width, dtype=torch.uint8)
        pred = torch.zeros(height, width, dtype=torch.uint8)
        for _ in range(4):
            c = int(torch.randint(1, n, (1,), generator=g))
            y0, x0 = int(torch.randint(0, height - 60, (1,), generator=g)), int(torch.randint(0, width - 60, (1,), generator=g))
            y1, x1 = y0 + int(torch.randint(40, height // 2, (1,), generator=g)), x0 + int(torch.randint(40, width // 2, (1,), generator=g))
            gt[max(0, y0 - 5):y1 + 5, max(0, x0 - 5):x1 + 5] = 255
            gt[y0:y1, x0:x1] = c
            dy, dx = (int(v) for v in torch.randint(-6, 7, (2,), generator=g))
            pred[max(0, y0 + dy):max(0, y1 + dy), max(0, x0 + dx):max(0, x1 + dx)] = c
        y0, x0 = int(torch.randint(0, height - 40, (1,), generator=g)), int(torch.randint(0, width - 40, (1,), generator=g))
        pred[y0:y0 + 40, x0:x0 + 40] = int(torch.randint(1, n, (1,), generator=g))
        gts.append(gt), preds.append(pred)
    index = torch.arange(images) % distinct
    return torch.stack(preds)[index], torch.stack(gts)[index]


def run(images: int = 1449, height: int = 375, width: int = 500, n: int = 21, repeat: int = 5) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, make in (("noise", noise_workload), ("piecewise", piecewise_workload)):
        pred, target = make(images, height, width, n, g)
        rows += _measure(pred, target, n, f"{images}x{height}x{width} u8 {name}, C={n}", repeat)
    return rows


def _measure(pred, target, n, shape, repeat) -> list[Row]:
    bytes_read = pred.numel() * 2
    floor = bytes_read / memory_bandwidth()
    rows = []
    t_torch = timeit(lambda: ops.confusion_matrix(pred, target, n, backend="torch"), repeat=2, warmup=0)
    t_numpy = timeit(lambda: numpy_bincount(pred.numpy(), target.numpy(), n), repeat=2, warmup=0)
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
        rows += gpu_rows("confusion_matrix", shape, lambda backend: ops.confusion_matrix(pc, tc, n, backend=backend),
                         repeat)
    rows.append(memory_floor_row(bytes_read))
    return rows


if __name__ == "__main__":
    print_table(run(), "confusion_matrix (VOC val size)")
