"""Stage (E): mIoU from one dataset-level confusion matrix."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from namedmask import io, ops
from namedmask.data.labelmaps import LabelMapError, index_label_maps, read_label_map

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """Bad or missing input files; the message lists them by name."""


@dataclass
class EvalReport:
    metrics: ops.SegmentationMetrics
    confusion: torch.Tensor
    num_images: int
    class_names: list | None = None
    bad: list = field(default_factory=list)  # (name, reason) of skipped pairs

    def to_dict(self) -> dict:
        m = self.metrics
        out = {"miou": m.miou, "pixel_acc": m.pixel_acc, "mean_acc": m.mean_acc,
               "per_class_iou": m.per_class_iou, "per_class_acc": m.per_class_acc,
               "num_images": self.num_images, "num_classes": m.num_classes}
        if self.class_names:
            out["class_names"] = list(self.class_names)
        out["skipped"] = [{"name": n, "reason": r} for n, r in self.bad]
        out["confusion_matrix"] = self.confusion.tolist()
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
        return "\n".join(lines)


def evaluate_label_maps(pred_dir: str | Path, gt_dir: str | Path, num_classes: int, ignore_index: int = 255,
                        skip_bad: bool = False, class_names: list | None = None, backend: str = "auto",
                        progress: bool = True) -> EvalReport:
    """Pairs prediction and ground-truth index PNGs by file stem and accumulates one
    confusion matrix over all of them. Problems (missing pair, size mismatch, unreadable
    file, prediction id >= num_classes) raise EvaluationError listing every bad file,
    unless skip_bad, which logs, counts and skips them."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
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
            confusion += ops.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), num_classes,
                                              ignore_index, backend=backend)
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
    return EvalReport(ops.miou(confusion), confusion, scored, class_names, bad)


def write_report(report: EvalReport, path: str | Path) -> None:
    io.write_json(path, report.to_dict())
