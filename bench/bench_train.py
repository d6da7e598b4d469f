"""Training iterations/s on this machine (batch 2, crop 384, NamedMask's augmentations) for the
small (ResNet-18, OS 8) and the full (ResNet-50, OS 8) DeepLabv3+, and where the time goes:
data (decode + augment + collate), copy-paste, forward (+ loss), backward + optimizer step.
Images: the shared pool photos when present (real JPEG decode), else generated 500x375 ones."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import Row, print_table
from namedmask import ops
from namedmask.config import TrainConfig, load_config
from namedmask.models.deeplab import build_model
from namedmask.training import TrainSamples, apply_copy_paste, archive_items

POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pool"


def write_inputs(root: Path, count: int = 8) -> tuple[Path, Path]:
    """archive.json + pseudo-mask folder over `count` images (a centred ellipse as the mask)."""
    photos = sorted(POOL.glob("*.jpg"))[:count] if POOL.is_dir() else []
    rng = np.random.default_rng(0)
    entries, archive = {}, []
    (root / "pool").mkdir(parents=True)
    (root / "masks" / "masks").mkdir(parents=True)
    for i in range(count):
        name = f"{i:03d}.jpg"
        image = Image.open(photos[i]).convert("RGB") if i < len(photos) else \
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8))
        image.save(root / "pool" / name, quality=90)
        w, h = image.size
        yy, xx = np.mgrid[:h, :w]
        mask = (((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 <= 1).astype(np.uint8)
        Image.fromarray(mask).save(root / "masks" / "masks" / f"{i:03d}.png")
        entries[name] = {"mask": f"masks/{i:03d}.png", "fg_fraction": float(mask.mean()), "flag": None}
        archive.append({"path": name, "score": 0.3})
    (root / "archive.json").write_text(json.dumps({
        "schema_version": 1, "pool_root": "pool", "categories": {"thing": 1}, "archives": {"thing": archive},
        "best_category": {e["path"]: "thing" for e in archive}}))
    (root / "masks" / "manifest.json").write_text(json.dumps({"schema_version": 1, "masks": entries}))
    return root / "archive.json", root / "masks"


def time_iterations(cfg: TrainConfig, items, num_classes: int, iterations: int, warmup: int = 1) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    samples = TrainSamples(items, cfg)
    has_cp = hasattr(ops, "random_copy_paste")
    parts = {"data": [], "copy-paste": [], "forward": [], "backward+step": []}
    for it in range(warmup + iterations):
        t0 = time.perf_counter()
        batch = [samples[it * cfg.batch_size + j] for j in range(cfg.batch_size)]
        images, labels = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        t1 = time.perf_counter()
        if has_cp:
            images, labels = apply_copy_paste(images, labels, cfg.copy_paste, torch.Generator().manual_seed(it))
        t2 = time.perf_counter()
        loss = F.cross_entropy(model(images), labels.long(), ignore_index=255)
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t4 = time.perf_counter()
        if it >= warmup:
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[key].append(dt)
    out = {k: float(np.median(v)) for k, v in parts.items()}
    if not has_cp:
        out["copy-paste"] = None
    return out


def run(iterations: int = 2) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        archive, masks = write_inputs(Path(tmp))
        items, names = archive_items(archive, masks)
        for label, backbone in (("small (resnet18)", "resnet18"), ("full (resnet50)", "resnet50")):
            cfg = load_config(TrainConfig, overrides=[f"model.backbone={backbone}", "batch_size=2"])
            parts = time_iterations(cfg, items, len(names), iterations)
            total = sum(v for v in parts.values() if v is not None)
            extra = {"it/s": f"{1 / total:.3f}"}
            extra.update({k: ("n/a (op not on this branch)" if v is None else f"{v:.3f} s ({100 * v / total:.0f} %)")
                          for k, v in parts.items()})
            rows.append(Row("train iteration", label, "batch 2, crop 384, OS 8", total, None, None, extra))
    return rows


if __name__ == "__main__":
    print_table(run(), "training iteration (CPU)")
