"""Stage (E): mIoU from one dataset-level confusion matrix."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from namedmask import io, ops
from namedmask.data.classmap import ClassMap, category_words
from namedmask.data.datasets import FolderLabeledSet, open_dataset
from namedmask.data.decode import load_image
from namedmask.data.labelmaps import LabelMapError, index_label_maps, read_label_map
from namedmask.errors import InputError, NamedMaskError
from namedmask.models.deeplab import load_segmenter
from namedmask.models.provenance import WorldCheck
from namedmask.models.inference import predict_label, resolve_run_dir
from namedmask.report import save_overlay
from namedmask.runtime import check_backend, resolve_device

log = logging.getLogger(__name__)


class EvaluationError(NamedMaskError, RuntimeError):
    """Bad or missing input files; the message lists them by name."""


@dataclass
class EvalReport:
    metrics: ops.SegmentationMetrics
    confusion: torch.Tensor
    num_images: int
    class_names: list | None = None
    bad: list = field(default_factory=list)  # (name, reason) of skipped pairs
    extra: dict = field(default_factory=dict)  # additional top-level keys (e.g. mean_fg_iou of binary sets)
    class_map: ClassMap | None = None  # model -> dataset classes: what was scored, what was left out

    def to_dict(self) -> dict:
        m = self.metrics
        out = {"miou": m.miou, "pixel_acc": m.pixel_acc, "mean_acc": m.mean_acc,
               "per_class_iou": m.per_class_iou, "per_class_acc": m.per_class_acc,
               "num_images": self.num_images, "num_classes": m.num_classes}
        if self.class_names:
            out["class_names"] = list(self.class_names)
        out["skipped"] = [{"name": n, "reason": r} for n, r in self.bad]
        out["confusion_matrix"] = self.confusion.tolist()
        out.update(self.extra)
        if self.class_map is not None:
            out.update(self.class_map.describe())
        return out

    def table(self) -> str:
        names = self.class_names or [str(i) for i in range(self.metrics.num_classes)]
        width = max(12, max(len(n) for n in names) + 2)
        lines = [f"{'class':<{width}}{'IoU':>8}{'acc':>8}", "-" * (width + 16)]
        for name, iou, acc in zip(names, self.metrics.per_class_iou, self.metrics.per_class_acc):
            f = (lambda v: "     -  " if math.isnan(v) else f"{100 * v:8.2f}")
            lines.append(f"{name:<{width}}{f(iou)}{f(acc)}")
        lines += ["-" * (width + 16),
                  f"{'mIoU':<{width}}{100 * self.metrics.miou:8.2f}",
                  f"{'pixel acc':<{width}}{100 * self.metrics.pixel_acc:8.2f}",
                  f"{'mean acc':<{width}}{100 * self.metrics.mean_acc:8.2f}",
                  f"{'images':<{width}}{self.num_images:8d}"]
        if self.bad:
            lines.append(f"{'skipped':<{width}}{len(self.bad):8d}")
        for key, value in self.extra.items():
            lines.append(f"{key:<{width}}{100 * value:8.2f}")
        if self.class_map is not None and not (self.class_map.is_identity and not self.class_map.ignored_pixels):
            lines.append(self.class_map.summary())
        return "\n".join(lines)


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


def write_report(report: EvalReport, path: str | Path) -> None:
    io.write_json(path, report.to_dict())


# ------------------------------------------------------------------- model-based evaluation

def open_eval_set(name: str, root: str | Path, split: str = "val"):
    """A LabeledSet: 'folder' (images/ + labels/ under root) or a named benchmark
    (voc, coco-object, coca, cityscapes-object, imagenet-s) via namedmask.data.datasets."""
    if root is None:
        raise EvaluationError(f"dataset {name!r} needs a root folder (--root)")
    if name == "folder":
        return FolderLabeledSet(root)
    return open_dataset(name, root, split=split)


@torch.no_grad()
def evaluate_model(model, labeled_set, model_class_names: list, *, device="cpu", amp: bool = False,
                   max_images: int | None = None, rank: int = 0, world: int = 1, progress: bool = True,
                   backend: str = "auto", overlays_dir: str | Path | None = None,
                   num_overlays: int = 4, ignore_unmapped: bool = False) -> EvalReport:
    """Native resolution, single scale, argmax; one confusion matrix over the split in the
    dataset's class ids (each rank scores items[rank::world], matrices are all-reduced). Model
    classes are paired with the dataset's by name (namedmask.data.classmap; the report says
    which were scored). Binary sets (CoCA: one object per image) are scored the same way, as
    a (1 + C)-class mIoU, and also report the mean per-image foreground IoU."""
    check_backend("confusion_matrix", backend, torch.device(device))
    was_training = model.training
    model.eval()
    binary = bool(getattr(labeled_set, "binary", False))
    ignore = getattr(labeled_set, "ignore_index", 255)
    names = list(getattr(labeled_set, "class_names", None) or model_class_names)
    cmap = ClassMap(model_class_names, names, dataset_words=category_words(getattr(labeled_set, "name", None), names),
                    ignore_index=ignore, ignore_unmapped=ignore_unmapped)
    n = len(names)
    items = [it for it in labeled_set if it.label is not None][:max_images]
    confusion = torch.zeros(n, n, dtype=torch.int64)
    fg_iou = torch.zeros(2, dtype=torch.float64)  # sum of per-image fg IoU, images
    for i, item in enumerate(tqdm(items[rank::world], desc="eval", unit="img", disable=not progress)):
        image = load_image(item.image)
        gt = torch.from_numpy(labeled_set.read_label(item).astype("int64"))
        if gt.shape != image.shape[:2]:
            raise EvaluationError(f"{item.label}: label size {tuple(gt.shape)[::-1]} differs from image "
                                  f"{item.image} {tuple(image.shape[:2])[::-1]} (width x height)")
        gt = cmap.map_ground_truth(gt, str(item.label))
        pred = cmap.map_prediction(predict_label(model, image, device, amp))
        if binary:  # beside the mIoU: foreground (any class) vs background, per image
            valid = gt != ignore
            inter = ((pred > 0) & (gt > 0) & valid).sum()
            union = (((pred > 0) | (gt > 0)) & valid).sum()
            fg_iou += torch.tensor([float(inter) / float(union) if union > 0 else 1.0, 1.0], dtype=torch.float64)
        confusion += ops.confusion_matrix(pred, gt, n, ignore, backend=backend)
        if overlays_dir is not None and rank == 0 and i < num_overlays:
            save_overlay(Path(overlays_dir) / f"{Path(item.id).name}.png", image, pred, names, gt=gt)
    if world > 1:
        dist.all_reduce(confusion)
        dist.all_reduce(fg_iou)
    model.train(was_training)
    if not items:
        raise EvaluationError("no labelled images to evaluate")
    report = EvalReport(ops.miou(confusion), confusion, len(items), names, class_map=cmap)
    if binary:
        report.extra["mean_fg_iou"] = float(fg_iou[0] / fg_iou[1])
    return report


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
