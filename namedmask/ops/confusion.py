"""confusion_matrix: the dataset-level confusion matrix behind every mIoU we report."""
from __future__ import annotations

import operator

import torch

from namedmask.ops.registry import register_op, select

LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)


register_op("confusion_matrix", "confusion_matrix")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     backend: str = "auto") -> torch.Tensor:
    """int64 [num_classes, num_classes]: rows = ground truth, columns = prediction.

    `pred` and `target` have the same shape (any shape) and dtype uint8, int32 or int64.
    Pixels whose target is outside [0, num_classes) or equals `ignore_index` are ignored.
    A prediction outside [0, num_classes) at a counted pixel is a ValueError.
    Accumulate over a whole split by summing the returned matrices (never average per batch).
    """
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"confusion_matrix: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in LABEL_DTYPES:
            raise ValueError(f"confusion_matrix: {name} must be uint8, int32 or int64, got {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred and target must have the same shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"confusion_matrix: pred and target must be on the same device, "
                         f"got {pred.device} and {target.device}")
    num_classes = _integer("num_classes", num_classes)
    ignore_index = _integer("ignore_index", ignore_index)
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    _, impl = select("confusion_matrix", backend, pred.device)
    hist = impl(pred, target, int(num_classes), int(ignore_index))
    if int(hist[:, num_classes].sum()) > 0:
        _raise_bad_prediction(pred, target, num_classes, ignore_index)
    return hist[:, :num_classes].contiguous()


def _integer(name: str, value) -> int:
    """An integer argument (a Python or NumPy int, a 0-d integer tensor); 2.7, "3" or True are a
    TypeError naming it, not a silent int() or an IndexError further on."""
    if isinstance(value, bool):
        raise TypeError(f"confusion_matrix: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"confusion_matrix: {name} must be an integer, got {value!r}") from None


def _raise_bad_prediction(pred, target, num_classes, ignore_index):
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    counted = (t >= 0) & (t < num_classes) & (t != ignore_index)
    bad = p[counted & ((p < 0) | (p >= num_classes))]
    values = sorted(set(bad.unique().tolist()))
    raise ValueError(f"confusion_matrix: prediction value(s) {values[:10]} outside [0, {num_classes}) "
                     f"at {bad.numel()} non-ignored pixel(s); predictions must be class ids < num_classes")
