"""Stage (E), `namedmask eval`: mIoU of prediction files, of a trained run, or of an
open-vocabulary segmenter (zero-shot dense CLIP or a text-head run with new names) on a dataset.
The scoring itself (one dataset-level confusion matrix) is namedmask/evaluation.py."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from namedmask import ops
from namedmask.data.classmap import ClassMap
from namedmask.data.labelmaps import LabelMapError, index_label_maps, read_label_map
from namedmask.errors import InputError
from namedmask.evaluation import EvalReport, EvaluationError, evaluate_model, open_eval_set
from namedmask.models.deeplab import load_segmenter
from namedmask.models.inference import resolve_run_dir
from namedmask.models.openvocab import dataset_classes, open_segmenter, text_classes
from namedmask.models.provenance import WorldCheck
from namedmask.runtime import check_backend, resolve_device

log = logging.getLogger(__name__)


def evaluate_label_maps(pred_dir: str | Path, gt_dir: str | Path, num_classes: int, ignore_index: int = 255,
                        skip_bad: bool = False, class_names: list | None = None, backend: str = "auto",
                        progress: bool = True, gt_class_names: list | None = None, gt_words: dict | None = None,
                        ignore_unmapped: bool = False) -> EvalReport:
    """Pairs prediction and ground-truth index PNGs by file stem and accumulates one
    confusion matrix over all of them. Predictions hold ids of `class_names` (num_classes of
    them); ground truth holds ids of `gt_class_names` (default: the same classes); the two are
    paired by name (namedmask.data.classmap). Problems (missing pair, size mismatch, unreadable
    file, a prediction id >= num_classes, a ground-truth id no class maps to) raise
    EvaluationError listing every bad file, unless skip_bad, which logs, counts and skips them."""
    if class_names is not None and len(class_names) != num_classes:
        raise InputError(f"{len(class_names)} class names given for {num_classes} classes")
    check_backend("confusion_matrix", backend)
    model_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    cmap = ClassMap(model_names, list(gt_class_names) if gt_class_names else model_names, dataset_words=gt_words,
                    ignore_index=ignore_index, ignore_unmapped=ignore_unmapped)
    num_classes, class_names = len(cmap.dataset_names), (cmap.dataset_names if class_names or gt_class_names
                                                          else None)
    preds, gts = index_label_maps(pred_dir), index_label_maps(gt_dir)
    if not gts:
        raise EvaluationError(f"{gt_dir}: no ground-truth PNG label maps found")
    bad = [(stem, f"no prediction {Path(pred_dir) / stem}.png for ground truth {gts[stem]}")
           for stem in gts if stem not in preds]
    extra = [s for s in preds if s not in gts]
    if extra:
        log.warning("%d prediction file(s) have no ground truth and are not scored (first: %s)",
                    len(extra), preds[extra[0]])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    stems = [s for s in gts if s in preds]
    scored = 0
    for stem in tqdm(stems, desc="eval", unit="img", disable=not progress):
        try:
            gt = read_label_map(gts[stem])
            pred = read_label_map(preds[stem])
            if gt.shape != pred.shape:
                raise LabelMapError(f"{preds[stem]}: size {pred.shape[1]}x{pred.shape[0]} differs from ground "
                                    f"truth {gts[stem]} {gt.shape[1]}x{gt.shape[0]} (width x height)")
            gt_t = cmap.map_ground_truth(torch.from_numpy(gt), str(gts[stem]))
            pred_t = cmap.map_prediction(torch.from_numpy(pred), str(preds[stem]))
            confusion += ops.confusion_matrix(pred_t, gt_t, num_classes, ignore_index, backend=backend)
            scored += 1
        except (LabelMapError, ValueError) as exc:
            bad.append((stem, str(exc) if str(preds[stem]) in str(exc) or str(gts[stem]) in str(exc)
                        else f"{preds[stem]}: {exc}"))
    if bad and not skip_bad:
        listing = "\n  ".join(reason for _, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise EvaluationError(f"{len(bad)} bad or missing pair(s):\n  {listing}{more}\n"
                              f"Fix them, or pass --skip-bad to score the rest.")
    for stem, reason in bad:
        log.warning("skipped %s: %s", stem, reason)
    if scored == 0:
        raise EvaluationError("no valid prediction/ground-truth pairs to score")
    return EvalReport(ops.miou(confusion), confusion, scored, class_names, bad, class_map=cmap)


def evaluate_checkpoint(run_dir: str | Path, dataset: str, root: str | Path, *, split: str = "val",
                        device: str = "auto", max_images: int | None = None, overlays_dir=None,
                        num_overlays: int = 4, backend: str = "auto", progress: bool = True,
                        ignore_unmapped: bool = False) -> EvalReport:
    """`namedmask eval --checkpoint RUN --dataset NAME --root DIR`."""
    dev = resolve_device(device)
    model, meta = load_segmenter(resolve_run_dir(run_dir), dev)
    labeled_set = open_eval_set(dataset, root, split)
    WorldCheck(meta, str(run_dir), log)(root)   # a toy / random-weight model on another world: warned once
    # fp32 as the official evaluation: bf16 logits can flip the argmax of near-ties
    return evaluate_model(model, labeled_set, meta["class_names"], device=dev, amp=False,
                          max_images=max_images, progress=progress, backend=backend,
                          overlays_dir=overlays_dir, num_overlays=num_overlays, ignore_unmapped=ignore_unmapped)


def evaluate_open(dataset: str, root, *, run_dir=None, zero_shot: dict | None = None, text: str | None = None,
                  class_set: str | None = None, split: str = "val", device: str = "auto",
                  max_images: int | None = None, overlays_dir=None, backend: str = "auto", progress: bool = True,
                  ignore_unmapped: bool = False):
    """`namedmask eval --dataset D --root R` with --zero-shot, or with --checkpoint of a text-head
    run and new text. Classes: --text, a category set / names file (`class_set`), or
    class_set="dataset" (and by default with --zero-shot) the dataset's own classes. Scored
    exactly as evaluate_checkpoint scores a closed-set run."""
    dev = resolve_device(device)
    labeled_set = open_eval_set(dataset, root, split)
    if text or (class_set and class_set != "dataset"):
        classes = text_classes(text, None if class_set == "dataset" else class_set)
    elif zero_shot is not None or class_set == "dataset":
        classes = dataset_classes(labeled_set)
    else:
        classes = None
    model, names = open_segmenter(run_dir=run_dir, zero_shot=zero_shot, classes=classes, device=dev)
    return evaluate_model(model, labeled_set, names, device=dev, amp=False, max_images=max_images, progress=progress,
                          backend=backend, overlays_dir=overlays_dir, ignore_unmapped=ignore_unmapped)
