"""A procedural segmentation world for training tests: textured shapes of a few classes on
textured backgrounds, written as a category archive + pseudo-mask folder (the contracts of
namedmask.data.archive / pseudo_masks) and as a held-out images/ + labels/ folder set."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = {"disc": 1, "square": 2, "triangle": 3}
TINTS = {1: (200, 60, 50), 2: (60, 180, 70), 3: (60, 80, 210)}


def shape_mask(class_id: int, size: int, rng) -> np.ndarray:
    r = rng.uniform(0.18, 0.3) * size
    cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    yy, xx = np.mgrid[:size, :size] + 0.5
    if class_id == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if class_id == 2:
        return (abs(yy - cy) <= r * 0.85) & (abs(xx - cx) <= r * 0.85)
    return (yy - cy >= -r) & (yy - cy <= r) & (abs(xx - cx) <= (yy - cy + r) / 2)  # triangle, apex up


def make_scene(class_id: int, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB image [size, size, 3] and its 0/1 object mask."""
    yy, xx = np.mgrid[:size, :size]
    background = rng.uniform(70, 170, 3) + 25 * np.sin(xx[..., None] / rng.uniform(2, 6) + rng.uniform(0, 6))
    background += rng.normal(0, 12, (size, size, 3))
    obj = np.array(TINTS[class_id], float) + 30 * np.sign(np.sin((xx + yy)[..., None] / 2.0)) + rng.normal(0, 10, (size, size, 3))
    mask = shape_mask(class_id, size, rng)
    image = np.where(mask[..., None], obj, background)
    return image.clip(0, 255).astype(np.uint8), mask.astype(np.uint8)


def write_archive(root: Path, per_class: int = 12, size: int = 64, seed: int = 0, corrupt=None):
    """root/pool/<class>/<i>.png, root/archive/archive.json, root/masks/ (manifest + PNGs).
    `corrupt(mask, rng) -> mask` degrades the pseudo-masks; true masks are returned."""
    rng = np.random.default_rng(seed)
    archives, best, entries, truth = {}, {}, {}, {}
    for name, cid in CLASSES.items():
        archives[name] = []
        for i in range(per_class):
            rel = f"{name}/{i:03d}.png"
            image, mask = make_scene(cid, size, rng)
            (root / "pool" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "pool" / rel)
            truth[rel] = mask
            pseudo = corrupt(mask, rng) if corrupt else mask
            mask_rel = f"masks/{name}/{i:03d}.png"
            (root / "masks" / "masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pseudo.astype(np.uint8)).save(root / "masks" / mask_rel)
            entries[rel] = {"mask": mask_rel, "fg_fraction": float(pseudo.mean()), "flag": None}
            archives[name].append({"path": rel, "score": 0.3 - 0.001 * i})
            best[rel] = name
    (root / "archive").mkdir(parents=True, exist_ok=True)
    (root / "archive" / "archive.json").write_text(json.dumps({
        "schema_version": 1, "pool_root": "../pool", "categories": CLASSES, "archives": archives,
        "duplicate_policy": "keep-all", "best_category": best}))
    (root / "masks" / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "archive": "../archive/archive.json", "method": "synthetic", "masks": entries,
        "failed": []}))
    return root / "archive" / "archive.json", root / "masks", truth


def write_labeled_folder(root: Path, count: int = 12, size: int = 64, seed: int = 100) -> Path:
    """root/images/*.png + root/labels/*.png with class ids (0 = background)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cid = 1 + i % len(CLASSES)
        image, mask = make_scene(cid, size, rng)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray((mask * cid).astype(np.uint8)).save(root / "labels" / f"{i:03d}.png")
    return root


def tiny_model_overrides() -> list:
    """A DeepLabv3+ small enough to train a few hundred iterations on a busy CPU."""
    return ["model.backbone=resnet10t", "model.backbone_args={channels: [8, 16, 32, 64], stem_width: 8}",
            "model.aspp_channels=24", "model.low_level_channels=16", "model.aspp_rates=[1, 2, 3]"]


def tiny_train_overrides(iterations: int, batch: int = 8, crop: int = 40) -> list:
    """Tiny model, mild augmentation (colour jitter would make colour-coded classes ambiguous),
    a learning rate fit for an unpretrained backbone, no workers, log every iteration."""
    return tiny_model_overrides() + [
        f"iterations={iterations}", f"batch_size={batch}", "num_workers=0", "log_every=1", "device=cpu",
        f"augment.crop_size={crop}", "augment.scale=[0.6, 1.0]", "augment.jitter_p=0", "augment.grayscale_p=0",
        "augment.blur_p=0.2", "copy_paste.p=0", "optim.lr_head=1e-2", "optim.lr_backbone=1e-2"]


@contextlib.contextmanager
def one_thread():
    """Tiny models on a shared, busy machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
