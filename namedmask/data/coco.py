"""COCO-Object ground truth: 81-id semantic PNGs (0 background, 1..80 the COCO things in
category order, 255 ignore) built once from `annotations/instances_<split>2017.json`.

The official NamedMask code evaluated on such masks but never shipped the converter. Rule
used here, per image:
  1. every pixel starts as background (0);
  2. crowd annotations (iscrowd=1) are painted 255 (ignored: their extent is vague);
  3. non-crowd instances are painted with their class id from the largest to the smallest
     area (ties: lower annotation id first), so where instances overlap the SMALLER one wins
     (a cup in front of a person stays a cup) and an instance inside a crowd region is kept.
Images with no annotation get an all-background mask (every image of the split is scored)."""
from __future__ import annotations

import contextlib
import logging
from io import StringIO
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from namedmask import io
from namedmask.data.categories import COCO_ID_TO_CONTIGUOUS
from namedmask.errors import InputError

log = logging.getLogger(__name__)
IGNORE = 255


def coco_paths(root: str | Path, split: str = "val") -> dict:
    """Where the COCO-Object files of `split` live under a COCO root."""
    root = Path(root)
    return {"images": root / f"{split}2017",
            "instances": root / "annotations" / f"instances_{split}2017.json",
            "masks": root / "annotations" / f"coco_object_{split}2017"}


def semantic_mask(coco, image_id: int) -> np.ndarray:
    """H×W uint8 COCO-Object label map of one image (rule in the module docstring)."""
    info = coco.imgs[image_id]
    label = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    anns = coco.imgToAnns.get(image_id, [])
    for ann in anns:
        if ann.get("iscrowd", 0):
            label[coco.annToMask(ann) > 0] = IGNORE
    things = [a for a in anns if not a.get("iscrowd", 0)]
    for ann in sorted(things, key=lambda a: (-float(a.get("area", 0.0)), a["id"])):
        cat = ann["category_id"]
        if cat not in COCO_ID_TO_CONTIGUOUS:
            raise InputError(f"annotation {ann['id']} of image {image_id}: category id {cat} is not one of the "
                             f"80 COCO thing classes")
        label[coco.annToMask(ann) > 0] = COCO_ID_TO_CONTIGUOUS[cat]
    return label


def prepare_coco_object(root: str | Path, split: str = "val", out_dir: str | Path | None = None,
                        overwrite: bool = False, progress: bool = True) -> dict:
    """Writes one label PNG per image of instances_<split>2017.json into out_dir (default
    <root>/annotations/coco_object_<split>2017/<file stem>.png). Resumable: existing PNGs are
    kept unless overwrite; each PNG is written atomically. Returns counts."""
    from pycocotools.coco import COCO

    paths = coco_paths(root, split)
    if not paths["instances"].is_file():
        raise FileNotFoundError(f"{paths['instances']}: COCO instances annotations not found "
                                f"(expected <root>/annotations/instances_{split}2017.json)")
    out_dir = Path(out_dir) if out_dir else paths["masks"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(StringIO()):  # pycocotools prints its progress
        coco = COCO(str(paths["instances"]))
    written = kept = 0
    for image_id in tqdm(sorted(coco.imgs), desc=f"coco-object {split}", unit="img", disable=not progress):
        target = out_dir / (Path(coco.imgs[image_id]["file_name"]).stem + ".png")
        if target.exists() and not overwrite:
            kept += 1
            continue
        io.save_png(target, semantic_mask(coco, image_id))
        written += 1
    log.info("coco-object %s: %d masks written, %d already there, in %s", split, written, kept, out_dir)
    return {"images": len(coco.imgs), "written": written, "kept": kept, "out_dir": str(out_dir)}
