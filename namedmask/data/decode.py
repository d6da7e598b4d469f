"""Image decoding used by every stage. (Minimal PIL path; the DALI GPU / DALI-CPU backends,
batched pool iteration and the odd-file corpus are the data issue's work.)

Contract every backend keeps: RGB uint8 [H, W, 3] tensors, EXIF orientation applied,
grayscale/CMYK/RGBA/palette/16-bit inputs converted to 8-bit RGB; a file that cannot be
decoded raises ImageDecodeError naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageDecodeError(ValueError):
    """A file that is not a decodable image; the message names it."""


def load_image(path: str | Path) -> torch.Tensor:
    """uint8 RGB tensor [H, W, 3]."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
                arr = np.asarray(img, dtype=np.uint32) >> 8
                img = Image.fromarray(arr.astype(np.uint8), "L")
            img = img.convert("RGB")
            return torch.from_numpy(np.array(img))
    except FileNotFoundError:
        raise
    except Exception as exc:  # PIL raises many types for bad files
        raise ImageDecodeError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


from dataclasses import dataclass, field  # noqa: E402
from typing import Iterator, Sequence  # noqa: E402


@dataclass(frozen=True)
class Resize:
    """Resize the short side to `short_side` (aspect kept), then centre-crop `crop`×`crop`
    (None = no crop; a batch then needs equal sizes)."""
    short_side: int
    crop: int | None = None
    interpolation: str = "bicubic"  # or "bilinear"


@dataclass
class ImageBatch:
    indices: list                   # positions in the input path list of the decoded images
    paths: list                     # their paths
    images: object                  # uint8 [B, 3, H, W] tensor with a Resize, else a list of [H, W, 3]
    failed: list = field(default_factory=list)  # (path, reason) of files that could not be decoded


def _resize_crop(img: torch.Tensor, resize: Resize) -> torch.Tensor:
    pil = Image.fromarray(img.numpy())
    w, h = pil.size
    scale = resize.short_side / min(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    method = Image.BICUBIC if resize.interpolation == "bicubic" else Image.BILINEAR
    pil = pil.resize((nw, nh), method)
    if resize.crop:
        c = resize.crop
        left, top = int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))
        pil = pil.crop((left, top, left + c, top + c))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


def iter_image_batches(paths: Sequence, batch_size: int, *, resize: Resize | None = None, backend: str = "auto",
                       on_error: str = "raise") -> Iterator[ImageBatch]:
    """Decodes `paths` in order, `batch_size` at a time. on_error="skip" lists undecodable
    files in ImageBatch.failed instead of raising (callers must report them)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for start in range(0, len(paths), batch_size):
        batch = ImageBatch([], [], [], [])
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                img = load_image(paths[i])
            except (ImageDecodeError, FileNotFoundError) as exc:
                if on_error == "raise":
                    raise
                batch.failed.append((paths[i], str(exc)))
                continue
            batch.indices.append(i)
            batch.paths.append(paths[i])
            batch.images.append(_resize_crop(img, resize) if resize else img)
        if resize is not None:
            batch.images = (torch.stack(batch.images) if batch.images
                            else torch.zeros(0, 3, resize.crop or 0, resize.crop or 0, dtype=torch.uint8))
        yield batch
