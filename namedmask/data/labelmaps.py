"""Label-map files: index PNGs (palette 'P' or grayscale 'L'/'I;16'), one class id per pixel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from namedmask.errors import SkippableItemError

LABEL_SUFFIXES = (".png",)


class LabelMapError(SkippableItemError):
    """A label map file that cannot be used; the message names the file."""


def read_label_map(path: str | Path) -> np.ndarray:
    """H×W integer array of class ids (uint8 when the file is 8-bit)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise LabelMapError(f"{path}: cannot read label map ({exc})") from exc
    if mode in ("P", "L"):
        return arr.astype(np.uint8, copy=False)
    if mode in ("I;16", "I;16B", "I"):
        return arr.astype(np.int64)
    if mode == "1":
        return arr.astype(np.uint8)
    raise LabelMapError(f"{path}: mode {mode!r} is not a label map; expected an index PNG (palette or "
                        f"grayscale) holding one class id per pixel, not a colour rendering")


def index_label_maps(folder: str | Path) -> dict:
    """{file stem: path} of the label maps in `folder` (recursively; stems relative to it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    out = {}
    for p in sorted(folder.rglob("*")):
        # A dangling symlink is listed too: reading it fails and names it, instead of the
        # mask vanishing from the run unnoticed.
        if p.suffix.lower() in LABEL_SUFFIXES and (p.is_file() or p.is_symlink()) and not p.name.startswith("."):
            out[p.relative_to(folder).with_suffix("").as_posix()] = p
    return out
