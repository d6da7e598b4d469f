"""`namedmask predict --checkpoint RUN IMAGES... --out DIR`: label PNGs (palette, one class id
per pixel, at native resolution) and colour overlays with a legend of the class names."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from namedmask import io
from namedmask.data.categories import get_category_set, voc_palette
from namedmask.data.classmap import ClassMap
from namedmask.data.decode import IMAGE_SUFFIXES, ImageDecodeError, load_image
from namedmask.errors import NamedMaskError
from namedmask.models.deeplab import load_segmenter
from namedmask.models.inference import predict_label, resolve_run_dir
from namedmask.report import save_overlay
from namedmask.runtime import resolve_device
from namedmask.stages.openvocab import open_segmenter, text_classes

log = logging.getLogger(__name__)


class PredictError(NamedMaskError, ValueError):
    """No images to predict, or an input that cannot be read; the message names it."""


def collect_images(inputs) -> list:
    """Image files given directly or found (recursively) in the given folders, in order."""
    paths = []
    for p in map(Path, inputs):
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise PredictError(f"{p}: no such file or folder")
    if not paths:
        raise PredictError(f"no images found in {[str(p) for p in inputs]}")
    return paths


def predict(run_dir, inputs, out_dir, *, device: str = "auto", overlays: bool = True,
            progress: bool = True, classes: str | None = None, ignore_unmapped: bool = False,
            skip_bad: bool = False, text: str | None = None, zero_shot: dict | None = None) -> list:
    """Writes <out>/labels/<name>.png and <out>/overlays/<name>.png; returns the label paths.
    Names are the input stems; a stem seen twice gets the parent folder prefixed. Label ids
    are the model's, or with `classes` (a category set or names file) that set's ids, the
    model's classes paired with them by name (namedmask.data.classmap). With `text` ("dog,
    cat|kitten": ids 1.. in that order) a text-head run, or dense CLIP (`zero_shot`: keyword
    arguments of stages.openvocab.zero_shot_segmenter), labels those names."""
    out_dir = Path(out_dir)
    # taken (refused, locked) before the model loads, held for the whole run
    with io.output_folder(out_dir, "predict"):
        dev = resolve_device(device)
        if text or zero_shot is not None:
            model, names = open_segmenter(run_dir=None if zero_shot is not None else resolve_run_dir(run_dir),
                                          zero_shot=zero_shot, classes=text_classes(text) if text else None,
                                          device=dev)
        else:
            model, meta = load_segmenter(resolve_run_dir(run_dir), dev)
            names = meta["class_names"]
        cmap = None
        if classes:
            target_set = get_category_set(classes)
            cmap = ClassMap(names, target_set.names, ignore_unmapped=ignore_unmapped,
                            dataset_words={n: target_set.prompt_words(n) for n in target_set.names})
            names = list(target_set.names)
            log.info("label ids of %s: %s", classes, cmap.describe()["model_to_dataset"])
        return _predict(model, dev, names, cmap, inputs, out_dir, overlays, progress, skip_bad)


def _predict(model, dev, names, cmap, inputs, out_dir: Path, overlays: bool, progress: bool, skip_bad: bool) -> list:
    """The body of predict, inside its locked output folder."""
    written, seen, bad = [], set(), []
    for path in tqdm(collect_images(inputs), desc="predict", unit="img", disable=not progress):
        stem = path.stem if path.stem not in seen else f"{path.parent.name}_{path.stem}"
        seen.add(stem)
        try:
            image = load_image(path)
        except ImageDecodeError as exc:
            if not skip_bad:
                raise PredictError(f"{exc} (pass --skip-bad to skip unreadable images)") from exc
            log.warning("skipped %s: %s", path, exc)
            bad.append(path)
            continue
        label = predict_label(model, image, dev, amp=dev.type == "cuda")
        if cmap is not None:
            label = cmap.map_prediction(label)
        target = io.inside(out_dir, f"labels/{stem}.png")
        if len(names) <= 256:
            io.save_png(target, label.to(torch.uint8).numpy(), palette=voc_palette())
        else:  # more classes than a palette holds (ImageNet-S 919): 16-bit grayscale
            io.save_png(target, label.numpy().astype(np.uint16))
        if overlays:
            save_overlay(io.inside(out_dir, f"overlays/{stem}.png"), image, label, names)
        written.append(target)
    log.info("wrote %d label maps to %s", len(written), out_dir / "labels")
    if bad:
        log.warning("%d unreadable image(s) skipped: %s", len(bad), ", ".join(map(str, bad)))
    return written
