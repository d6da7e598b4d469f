"""A small generated dataset that needs no download and that we can redistribute: textured
shapes of a few classes on textured backgrounds. Used by the no-argument demo and the
end-to-end tests. Each class has its own shape AND texture, so a segmenter can learn it.

Pool images hold one object each (like the single-object images CLIP retrieves); evaluation
images hold one to three objects of different classes, with ground-truth index PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from namedmask import io
from namedmask.data.categories import voc_palette

CLASSES = ("disc", "square", "triangle")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random colour field plus fine noise."""
    coarse = rng.uniform(40, 200, (4, 4, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    img += rng.normal(0, 8, (h, w, 3))
    return img


def _texture(cls: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array([(220, 60, 50), (50, 90, 220), (240, 210, 40)][cls], np.float32)
    period = rng.uniform(6, 10)
    if cls == 0:      # stripes
        pattern = (np.sin(xx * 2 * np.pi / period) > 0).astype(np.float32)
    elif cls == 1:    # checker
        pattern = ((xx // period + yy // period) % 2).astype(np.float32)
    else:             # dots
        pattern = ((np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period)) > 0.3).astype(np.float32)
    return base[None, None] * (0.6 + 0.4 * pattern[..., None])


def _shape_mask(cls: int, h: int, w: int, box: tuple) -> np.ndarray:
    y0, x0, y1, x1 = box
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if cls == 0:
        draw.ellipse((x0, y0, x1, y1), fill=1)
    elif cls == 1:
        draw.rectangle((x0, y0, x1, y1), fill=1)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=1)
    return np.asarray(img, bool)


def render(rng: np.random.Generator, classes: list, h: int = 160, w: int = 224) -> tuple:
    """(uint8 RGB image, uint8 label map with ids 1..len(CLASSES), 0 = background)."""
    img = _background(rng, h, w)
    label = np.zeros((h, w), np.uint8)
    for cls in classes:
        size = int(rng.uniform(0.35, 0.7) * min(h, w))
        y0, x0 = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        mask = _shape_mask(cls, h, w, (y0, x0, y0 + size, x0 + size))
        img[mask] = _texture(cls, rng, h, w)[mask] + rng.normal(0, 6, (int(mask.sum()), 3))
        label[mask] = cls + 1
    return np.clip(img, 0, 255).astype(np.uint8), label


def write_dataset(root: str | Path, pool_per_class: int = 12, eval_images: int = 9, seed: int = 0) -> Path:
    """Writes <root>/pool/*.jpg, <root>/eval/{images,labels}/*, <root>/categories.txt.
    Idempotent: an existing complete dataset is left as it is."""
    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(pool_per_class * len(CLASSES)):
        img, _ = render(rng, [i % len(CLASSES)])
        with io.atomic_path(root / "pool" / f"{i:04d}.jpg") as tmp:
            Image.fromarray(img).save(tmp, format="JPEG", quality=92)
    for i in range(eval_images):
        k = 1 + i % 3
        img, label = render(rng, list(rng.permutation(len(CLASSES))[:k]))
        with io.atomic_path(root / "eval" / "images" / f"{i:04d}.jpg") as tmp:
            Image.fromarray(img).save(tmp, format="JPEG", quality=92)
        io.save_png(root / "eval" / "labels" / f"{i:04d}.png", label, voc_palette())
    io.write_text(root / "categories.txt", "\n".join(CLASSES) + "\n")
    io.write_text(done, "")
    return root
