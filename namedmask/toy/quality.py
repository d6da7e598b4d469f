"""Quality measures on the toy world, from the pipeline's own outputs (archive.json, pseudo-mask
folders, trained checkpoints) against the world's ground truth. Used by `python -m bench
quality` and the toy-world tests. Retrieval and saliency are scored on the pool (its masks are
never used for training); segmentation on the held-out eval sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from namedmask.toy.world import CATEGORIES, NAMED
from namedmask.errors import InputError


def _pool_label(world: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(world / "pool_labels" / Path(rel).with_suffix(".png")))


def archive_precision(archive_json: str | Path, world: str | Path) -> dict:
    """{category: fraction of its archive images that contain that category} (pool masks)."""
    from namedmask.data.archive import load_archive

    world = Path(world)
    archive = load_archive(archive_json)
    all_ids = {c.name: i + 1 for i, c in enumerate(CATEGORIES)}
    out = {}
    for name, entries in archive.archives.items():
        hits = [all_ids[name] in np.unique(_pool_label(world, e["path"])) for e in entries]
        out[name] = float(np.mean(hits)) if hits else float("nan")
    return out


def chance_precision(world: str | Path) -> float:
    """Expected precision@K of a random archive: mean fraction of pool images holding a category."""
    world = Path(world)
    labels = [np.unique(np.asarray(Image.open(p))) for p in sorted((world / "pool_labels").glob("*.png"))]
    return float(np.mean([np.mean([i + 1 in u for u in labels]) for i, c in enumerate(CATEGORIES)
                          if c in NAMED]))


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def centred_box(shape: tuple, side: float = 0.6) -> np.ndarray:
    """The trivial saliency baseline: a centred box covering `side` of each image side."""
    h, w = shape
    m = np.zeros(shape, bool)
    dh, dw = int(round(h * (1 - side) / 2)), int(round(w * (1 - side) / 2))
    m[dh:h - dh, dw:w - dw] = True
    return m


def mask_iou(mask_folder: str | Path, world: str | Path, transform=None) -> float:
    """Mean per-image foreground IoU of a pseudo-mask folder against the pool masks (all
    objects are foreground). transform(image_path, mask) may re-refine a mask first."""
    from namedmask.data.pseudo_masks import mask_paths

    world = Path(world)
    paths = mask_paths(mask_folder)
    ious = []
    for rel, mpath in sorted(paths.items()):
        mask = np.asarray(Image.open(mpath)) == 1
        if transform is not None:
            mask = transform(world / "pool" / rel, mask)
        ious.append(_iou(mask, _pool_label(world, rel) > 0))
    return float(np.mean(ious))


def box_iou(mask_folder: str | Path, world: str | Path, side: float = 0.6) -> float:
    """The centred-box baseline on the same images as a pseudo-mask folder."""
    from namedmask.data.pseudo_masks import mask_paths

    world = Path(world)
    ious = []
    for rel in sorted(mask_paths(mask_folder)):
        gt = _pool_label(world, rel) > 0
        ious.append(_iou(centred_box(gt.shape, side), gt))
    return float(np.mean(ious))


def bilateral(preset: str):
    """transform for mask_iou: the bilateral solver with a preset, thresholded at 0.5."""
    from namedmask import ops

    def refine(image_path: Path, mask: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB")).copy())
        soft = ops.bilateral_solve(image, torch.from_numpy(mask).float(), preset=preset)
        return np.asarray(torch.as_tensor(soft) > 0.5)

    return refine


@torch.no_grad()
def zero_shot_accuracy(model: str, pretrained: str, eval_folder: str | Path, templates: str = "namedmask") -> float:
    """Top-1 accuracy of CLIP (loaded by namedmask.models.clip, as build-archive does) naming
    the single object of each image among the NamedMask categories (prompt ensemble)."""
    from namedmask.models.clip import load_clip
    from namedmask.models.prompts import get_templates

    clip = load_clip(model, pretrained)
    temps = get_templates(templates)
    text = torch.stack([torch.nn.functional.normalize(clip.encode_texts([t.format(c.name) for t in temps]).mean(0),
                                                      dim=0) for c in NAMED])
    eval_folder = Path(eval_folder)
    correct = total = 0
    for img_path in sorted((eval_folder / "images").glob("*.jpg")):
        lab = np.asarray(Image.open(eval_folder / "labels" / img_path.with_suffix(".png").name))
        ids = [i for i in np.unique(lab) if i]
        if len(ids) != 1:
            continue
        img = Image.open(img_path).convert("RGB").resize((clip.image_size, clip.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
        pred = int((clip.encode_images(x) @ text.T).argmax()) + 1
        correct += pred == ids[0]
        total += 1
    if not total:
        raise InputError(f"{eval_folder}: no single-object images to score")
    return correct / total


def all_background_miou(eval_folder: str | Path) -> float:
    """mIoU of predicting background everywhere (classes present in gt or prediction)."""
    eval_folder = Path(eval_folder)
    bg_inter = bg_union = 0
    classes = set()
    for p in sorted((eval_folder / "labels").glob("*.png")):
        lab = np.asarray(Image.open(p))
        classes |= set(np.unique(lab).tolist())
        bg_inter += int((lab == 0).sum())
        bg_union += lab.size
    return (bg_inter / bg_union) / len(classes | {0})
