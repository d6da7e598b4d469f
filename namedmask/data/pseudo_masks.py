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

from namedmask import io
from namedmask.errors import BadInputError

SCHEMA_VERSION = 1


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


def mask_paths(folder: str | Path) -> dict:
    """{image path relative to the pool root: absolute mask path}."""
    folder = Path(folder)
    data = load_manifest(folder)
    base = folder if folder.is_dir() else folder.parent
    return {img: base / entry["mask"] for img, entry in data["masks"].items()}
