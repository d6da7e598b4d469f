"""Pseudo-mask folders written by `namedmask saliency` (and by `namedmask experts` and
`namedmask refine` of such a folder), read by training. This module is the schema.

<dir>/manifest.json:
{
  "schema_version": 1,
  "archive": "../archive/archive.json",      # the archive the masks belong to
  "method": "tokencut", "refine": "bilateral-solver", "config": {...},
  "masks": {"<image path relative to pool_root>":
              {"mask": "masks/<same relative path>.png", "fg_fraction": 0.23, "flag": null}},
                                             # flag: null | "empty" | "full" (reported, never dropped)
  "failed": [{"path": "...", "reason": "..."}]
}
<dir>/masks/**.png: uint8 single-channel PNG at the image's native resolution,
0 = background, 1 = foreground (255 = ignore, allowed but unused by saliency).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from namedmask import io
from namedmask.errors import BadInputError

SCHEMA_VERSION = 1
MASK_VALUES = (0, 1, 255)   # background, foreground, ignore


class PseudoMaskError(BadInputError):
    """A pseudo-mask folder that is missing or malformed."""


def mask_relpath(image_relpath: str) -> str:
    return str(Path("masks") / Path(image_relpath).with_suffix(".png"))


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json" if folder.is_dir() else folder
    data = io.read_json(path, PseudoMaskError, "run `namedmask saliency` first")
    if data.get("schema_version") != SCHEMA_VERSION or "masks" not in data:
        raise PseudoMaskError(f"{path}: not a pseudo-mask manifest of schema {SCHEMA_VERSION}")
    return data


def read_pseudo_mask(path: str | Path, error: type = PseudoMaskError, check_values: bool = True) -> np.ndarray:
    """A pseudo-mask as an H×W uint8 array, checked against the schema: one channel, values 0, 1
    and 255 only. Every command that reads pseudo-masks (train, experts, adapt-clip) reads them
    here, so a 0/255 or 0/7 mask is named the same way everywhere (`error` names the file).
    check_values=False skips the value check (masks checked once already, read again per sample)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
            mask = np.array(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise error(f"{path}: cannot read pseudo-mask ({exc})") from exc
    if mask.ndim != 2:
        raise error(f"{path}: pseudo-mask is {mode} ({mask.shape[-1]} channels); it must be a single-channel "
                    f"PNG of values 0/1 (255 = ignore)")
    if not check_values:
        return mask
    values = np.unique(mask)
    bad = [int(v) for v in values if int(v) not in MASK_VALUES]
    if bad:
        raise error(f"{path}: pseudo-mask value {bad[0]} (values {[int(v) for v in values][:6]}); "
                    f"allowed are 0 = background, 1 = foreground, 255 = ignore")
    return mask


def no_foreground_message(folder, count: int) -> str:
    """The error when none of `count` pseudo-masks of `folder` has a foreground pixel."""
    return (f"{folder}: none of the {count} pseudo-masks has a foreground pixel (value 1); "
            f"masks saved as 0/255 mark every object 'ignore' — write 0/1")


def mask_paths(folder: str | Path) -> dict:
    """{image path relative to the pool root: absolute mask path}."""
    folder = Path(folder)
    data = load_manifest(folder)
    base = folder if folder.is_dir() else folder.parent
    return {img: base / entry["mask"] for img, entry in data["masks"].items()}
