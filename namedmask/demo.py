"""`python -m namedmask.demo`: a self-contained run on generated data that needs no
download. For now it exercises evaluation end to end (generated ground truth and a noisy
prediction -> `namedmask eval`); the full pipeline demo replaces it (`namedmask run`)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from namedmask import io
from namedmask.data.categories import VOC, voc_palette
from namedmask.stages.evaluate import evaluate_label_maps, write_report


def make_pairs(root: Path, count: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = rng.integers(200, 400, 2)
        gt = np.zeros((h, w), np.uint8)
        for _ in range(3):  # a few rectangles of random VOC classes
            c = rng.integers(1, 21)
            y, x = rng.integers(0, h - 50), rng.integers(0, w - 50)
            gt[y:y + rng.integers(30, h // 2), x:x + rng.integers(30, w // 2)] = c
        pred = np.where(rng.random((h, w)) < 0.9, gt, rng.integers(0, 21, (h, w))).astype(np.uint8)
        gt[:2] = 255  # void band, as in VOC
        io.save_png(root / "gt" / f"{i:04d}.png", gt, voc_palette())
        io.save_png(root / "pred" / f"{i:04d}.png", pred, voc_palette())


def main(out: str = "demo_run") -> None:
    root = Path(out)
    make_pairs(root)
    report = evaluate_label_maps(root / "pred", root / "gt", 21, class_names=list(VOC))
    print(report.table())
    write_report(report, root / "metrics.json")
    print(f"\nmetrics written to {root / 'metrics.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
