"""Segmentation metrics computed from one dataset-level confusion matrix."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class SegmentationMetrics:
    miou: float              # nanmean of per-class IoU over classes present in gt or pred
    pixel_acc: float         # correct / counted pixels
    mean_acc: float          # nanmean over classes present in gt of recall
    per_class_iou: list      # float, NaN for classes absent from both gt and pred
    per_class_acc: list      # float, NaN for classes absent from gt
    num_classes: int

    def to_dict(self) -> dict:
        return asdict(self)


def miou(confmat: torch.Tensor) -> SegmentationMetrics:
    """IoU_c = diag / (row + col - diag); rows = ground truth, columns = prediction.
    Classes absent from both gt and pred are NaN and excluded from the mean (background
    included, as in NamedMask's protocol)."""
    if confmat.ndim != 2 or confmat.shape[0] != confmat.shape[1]:
        raise ValueError(f"miou: expected a square confusion matrix, got shape {tuple(confmat.shape)}")
    cm = confmat.double().cpu()
    diag = cm.diagonal()
    rows, cols = cm.sum(1), cm.sum(0)
    union = rows + cols - diag
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, diag / union.clamp(min=1), nan)
    acc = torch.where(rows > 0, diag / rows.clamp(min=1), nan)
    total = cm.sum()
    return SegmentationMetrics(
        miou=float(iou.nanmean()) if (union > 0).any() else float("nan"),
        pixel_acc=float(diag.sum() / total) if total > 0 else float("nan"),
        mean_acc=float(acc.nanmean()) if (rows > 0).any() else float("nan"),
        per_class_iou=iou.tolist(),
        per_class_acc=acc.tolist(),
        num_classes=int(cm.shape[0]),
    )
