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
