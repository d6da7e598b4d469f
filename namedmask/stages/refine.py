"""Stage (B) refinement: refine a folder of (image, mask) pairs, e.g. saliency masks.

`refine_folder(images, masks, out)` pairs files by their path relative to each folder minus
the suffix, refines each mask and writes `out/<same relative path>.png`: uint8, 0 = background,
1 = foreground (the pseudo-mask contract, namedmask/data/pseudo_masks.py). A mask pixel is
foreground when it is non-zero (0/1, 0/255 and palette masks all work). Resumable: finished
outputs are skipped, every write is atomic, and `out/refine.json` records the settings so a
resumed run cannot mix two settings in one folder; `out/sources/<path>.json` records the sha256
of each output's image and mask (namedmask.data.image_outputs), so a pair of the same name from
other folders (or an edited mask) is refined again, never "already done".

When the masks come from a pseudo-mask folder (`namedmask saliency --refine none`: --masks is
that folder or its masks/ subfolder), `out` becomes a pseudo-mask folder of the same schema
(out/manifest.json, same archive), so `namedmask train --masks out` takes it as it is.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from namedmask import io
from namedmask.data.decode import IMAGE_SUFFIXES, ImageDecodeError, load_image
from namedmask.data.image_outputs import file_digest, is_recorded, write_record
from namedmask.data.labelmaps import LabelMapError, index_label_maps, read_label_map
from namedmask.data.pseudo_masks import SCHEMA_VERSION, load_manifest
from namedmask.errors import BadInputError, InputError
from namedmask.ops.bilateral import GridTooLargeError, KeyRangeError, bilateral_solve_batch, resolve_params
from namedmask.runtime import check_backend, resolve_device

log = logging.getLogger(__name__)

METHODS = ("bilateral-solver",)
CONFIG_NAME = "refine.json"


class RefineError(BadInputError, RuntimeError):
    """Bad or missing inputs, or an output folder made with other settings; the message names them."""


@dataclass
class RefineReport:
    refined: int = 0
    skipped_done: int = 0           # outputs already present (resumed run)
    failed: list = field(default_factory=list)  # (name, reason)
    config: dict = field(default_factory=dict)


def index_images(folder: str | Path) -> dict:
    """{relative path without suffix: image path} of the images under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")}


def _check_config(out_dir: Path, config: dict, overwrite: bool) -> None:
    path = out_dir / CONFIG_NAME
    if path.exists() and not overwrite:
        previous = json.loads(path.read_text())
        if previous != config:
            raise RefineError(f"{out_dir} holds masks refined with other settings ({path}: {previous}); "
                              f"use a new --out folder, or --overwrite to redo every mask with {config}")
    io.write_json(path, config)


def _load_pair(image_path: Path, mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    image = load_image(image_path)
    mask = read_label_map(mask_path)
    if mask.shape != tuple(image.shape[:2]):
        raise LabelMapError(f"{mask_path}: size {mask.shape[1]}x{mask.shape[0]} differs from image {image_path} "
                            f"{image.shape[1]}x{image.shape[0]} (width x height); resize the mask (nearest) to the image")
    return image, torch.from_numpy(mask != 0).float()


def refine_folder(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path, *,
                  method: str = "bilateral-solver", preset: str = "namedmask", sigma_spatial: float | None = None,
                  sigma_luma: float | None = None, sigma_chroma: float | None = None, lam: float | None = None,
                  threshold: float = 0.5, backend: str = "auto", device: str = "cpu", batch_size: int = 8,
                  overwrite: bool = False, skip_bad: bool = False, progress: bool = True) -> RefineReport:
    """Refines every mask in `masks_dir` along the edges of its image in `images_dir`.

    Pairs that cannot be used (no image, undecodable image, unreadable mask, size mismatch) do
    not stop the others; at the end they raise RefineError listing each one, unless skip_bad,
    which logs them and returns them in the report."""
    if method not in METHODS:
        raise InputError(f"unknown refinement method {method!r}; expected one of {METHODS}")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}")
    params = resolve_params(preset, sigma_spatial, sigma_luma, sigma_chroma, lam)
    device = str(resolve_device(device))  # an absent GPU: one line before any work, not a driver traceback
    check_backend("bilateral_solve", backend, device)
    config = {"method": method, "preset": preset, **asdict(params), "threshold": threshold}
    source = pseudo_mask_source(masks_dir)
    if source is not None and Path(masks_dir).resolve() == source[0].resolve():
        masks_dir = Path(masks_dir) / "masks"  # the folder itself was given: its masks are in masks/
    images, masks = index_images(images_dir), index_label_maps(masks_dir)
    if not masks:
        raise RefineError(f"{masks_dir}: no PNG masks found")
    out_dir = Path(out_dir)
    with io.output_folder(out_dir, "refine", legacy=(CONFIG_NAME,)):
        return _refine(images, masks, masks_dir, images_dir, out_dir, source, config, params, preset, threshold,
                       backend, device, batch_size, overwrite, skip_bad, progress, method)


def _refine(images, masks, masks_dir, images_dir, out_dir: Path, source, config, params, preset, threshold, backend,
            device, batch_size, overwrite, skip_bad, progress, method) -> RefineReport:
    """The body of refine_folder, inside its locked output folder."""
    _check_config(out_dir, config, overwrite)
    report = RefineReport(config=config)
    report.failed = [(stem, f"no image {Path(images_dir) / stem}.* for mask {masks[stem]}")
                     for stem in masks if stem not in images]
    todo, sources = [], {}
    for stem in masks:
        if stem not in images:
            continue
        sources[stem] = {"image": (images[stem], file_digest(images[stem])), "mask": (masks[stem], file_digest(masks[stem]))}
        # done: the output exists and was refined from these very bytes (not another pair of that name)
        if io.inside(out_dir, f"{stem}.png").exists() and not overwrite and is_recorded(out_dir, stem, sources[stem]):
            report.skipped_done += 1
        else:
            todo.append(stem)
    if report.skipped_done:
        log.info("resuming: %d of %d masks already refined in %s", report.skipped_done, len(masks), out_dir)
    bar = tqdm(total=len(todo), desc=f"refine ({method})", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        batch = []
        for stem in todo[start:start + batch_size]:
            try:
                image, target = _load_pair(images[stem], masks[stem])
                batch.append((stem, image.to(device), target.to(device)))
            except (ImageDecodeError, LabelMapError, FileNotFoundError) as exc:
                report.failed.append((stem, str(exc)))
                bar.update(1)
        if not batch:
            continue
        def solve(batch):  # -> (batch solved, outputs)
            while batch:  # an image over the solver's memory bound is listed, the rest of its batch solved
                try:
                    return batch, bilateral_solve_batch(
                        [b[1] for b in batch], [b[2] for b in batch], preset=preset, sigma_spatial=params.sigma_spatial,
                        sigma_luma=params.sigma_luma, sigma_chroma=params.sigma_chroma, lam=params.lam,
                        backend=backend)
                except GridTooLargeError as exc:
                    stem = batch.pop(exc.index)[0]
                    report.failed.append((stem, f"{images[stem]}: {exc}"))
                    bar.update(1)
                except KeyRangeError:  # the keys of one image fit where a batch's do not: halve it
                    if len(batch) == 1:
                        raise  # the sigmas themselves: one error line, nothing of this batch written
                    half = len(batch) // 2
                    (a, out_a), (b, out_b) = solve(batch[:half]), solve(batch[half:])
                    return a + b, out_a + out_b
            return [], []

        batch, outputs = solve(batch)
        for (stem, _, _), soft in zip(batch, outputs):
            io.save_png(io.inside(out_dir, f"{stem}.png"), (soft > threshold).to(torch.uint8).cpu().numpy().astype(np.uint8))
            write_record(out_dir, stem, sources[stem])
            report.refined += 1
            bar.update(1)
    bar.close()
    if report.failed and not skip_bad:
        listing = "\n  ".join(reason for _, reason in report.failed[:20])
        more = f"\n  ... and {len(report.failed) - 20} more" if len(report.failed) > 20 else ""
        raise RefineError(f"{len(report.failed)} bad or missing pair(s) (the other {report.refined} were refined):"
                          f"\n  {listing}{more}\nFix them and rerun (finished masks are skipped), or pass --skip-bad.")
    for stem, reason in report.failed:
        log.warning("skipped %s: %s", stem, reason)
    if source is not None:
        write_manifest(out_dir, masks_dir, *source, config)
    extra = [s for s in images if s not in masks]
    if extra:
        log.info("%d image(s) have no mask and were not refined (first: %s)", len(extra), images[extra[0]])
    return report


def pseudo_mask_source(masks_dir: str | Path) -> tuple[Path, dict] | None:
    """(folder, manifest) when `masks_dir` is a pseudo-mask folder or its masks/ subfolder."""
    for folder in (Path(masks_dir), Path(masks_dir).parent):
        if (folder / "manifest.json").is_file():
            return folder, load_manifest(folder)
    return None


def write_manifest(out_dir: Path, masks_dir: Path, source_dir: Path, source: dict, config: dict) -> Path:
    """out/manifest.json in the pseudo-mask schema: the source's archive and images, each
    pointing at its refined mask (images whose mask is not refined are left out)."""
    masks_dir, out_dir = Path(masks_dir).resolve(), Path(out_dir).resolve()
    entries = {}
    for image, entry in source["masks"].items():
        path = (source_dir / entry["mask"]).resolve()
        if not path.is_relative_to(masks_dir):
            continue
        rel = path.relative_to(masks_dir).with_suffix(".png").as_posix()
        if (out_dir / rel).is_file():
            mask = read_label_map(out_dir / rel)
            fg = float(mask.mean()) if mask.size else 0.0
            entries[image] = {"mask": rel, "fg_fraction": round(fg, 6),
                              "flag": "empty" if not mask.any() else ("full" if mask.all() else None)}
    archive = (Path(source_dir) / source["archive"]).resolve()
    manifest = {"schema_version": SCHEMA_VERSION, "archive": os.path.relpath(archive, out_dir),
                "method": source.get("method"), "refine": config["method"],
                "source_masks": os.path.relpath(source_dir.resolve(), out_dir), "config": config,
                "masks": entries, "failed": source.get("failed", [])}
    io.write_json(out_dir / "manifest.json", manifest)
    log.info("pseudo-mask manifest of %d refined masks: %s", len(entries), out_dir / "manifest.json")
    return out_dir / "manifest.json"

