"""Pure-PyTorch reference implementations: THE spec of every namedmask op.

Each function here is written to be read, not to be fast. Every native (C++, CUDA) and
Triton backend is tested against these: exactly for integer outputs, within stated
tolerances for float outputs. They also serve as the fallback when no kernel is built.
"""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Confusion histogram, int64 [num_classes, num_classes + 1].

    Entry [t, p] counts pixels with ground truth t and prediction p. A pixel is ignored
    when its target is outside [0, num_classes) or equals ignore_index. A prediction
    outside [0, num_classes) at a counted pixel goes to the last column [t, num_classes].
    """
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    counted = (t >= 0) & (t < num_classes) & (t != ignore_index)
    t, p = t[counted], p[counted]
    p = torch.where((p >= 0) & (p < num_classes), p, torch.full_like(p, num_classes))
    bins = t * (num_classes + 1) + p
    return torch.bincount(bins, minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)
