"""Scoring a segmenter: one dataset-level confusion matrix (native resolution, single scale,
argmax), the report it makes, and the evaluation sets. Shared by the evaluate stage and by
training's validation (namedmask/training.py), so it lives below the stages."""
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
from namedmask.errors import BadInputError
from namedmask.models.inference import predict_label
from namedmask.report import save_overlay
from namedmask.runtime import check_backend

log = logging.getLogger(__name__)


class EvaluationError(BadInputError, RuntimeError):
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
            f = (lambda v: "     -  " if math.isnan(v) else f"{v:8.4f}")
            lines.append(f"{name:<{width}}{f(iou)}{f(acc)}")
        lines += ["-" * (width + 16),
                  f"{'mIoU':<{width}}{self.metrics.miou:8.4f}",
                  f"{'pixel acc':<{width}}{self.metrics.pixel_acc:8.4f}",
                  f"{'mean acc':<{width}}{self.metrics.mean_acc:8.4f}",
                  f"{'images':<{width}}{self.num_images:8d}"]
        if self.bad:
            lines.append(f"{'skipped':<{width}}{len(self.bad):8d}")
        for key, value in self.extra.items():
            lines.append(f"{key:<{width}}{value:8.4f}")
        if self.class_map is not None and not (self.class_map.is_identity and not self.class_map.ignored_pixels):
            lines.append(self.class_map.summary())
        return "\n".join(lines)


def write_report(report: EvalReport, path: str | Path) -> None:
    io.write_json(path, report.to_dict())



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
