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


# --- copy-paste augmentation (issue 3) -------------------------------------------------------

def is_foreground(labels: torch.Tensor, background: int, ignore_index: int) -> torch.Tensor:
    """Pixels that belong to an object: strictly between the background and the ignore id
    (compared as int64, so ids outside the label dtype's range, e.g. 256 for uint8, work)."""
    labels = labels.long()
    return (labels > background) & (labels < ignore_index)


def fg_boxes(labels: torch.Tensor, background: int, ignore_index: int) -> torch.Tensor:
    """Tight inclusive foreground box of each sample of labels [B, H, W]: int64 [B, 4] rows
    (y0, x0, y1, x1); (-1, -1, -1, -1) when a sample has no foreground."""
    boxes = torch.full((labels.shape[0], 4), -1, dtype=torch.int64, device=labels.device)
    for b, fg in enumerate(is_foreground(labels, background, ignore_index)):
        ys, xs = torch.nonzero(fg, as_tuple=True)
        if ys.numel():
            boxes[b] = torch.stack([ys.min(), xs.min(), ys.max(), xs.max()])
    return boxes


def copy_paste(images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, sources: torch.Tensor,
               offsets: torch.Tensor, background: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste objects between the samples of a batch; returns new (images, labels).

    Sample b receives, for p = 0, 1, ..., the foreground of sample s = sources[b, p] (-1: none)
    inside its box boxes[s] (from fg_boxes), the box's top-left corner landing at offsets[b, p]
    (y, x). Objects are cut from the input batch; where the cut is foreground, the output pixel
    (every channel) and label become the source's; later pastes cover earlier ones. Every box
    must fit inside the canvas at its offset (the public wrapper checks).
    """
    out_images, out_labels = images.clone(), labels.clone()
    for b, p in torch.nonzero(sources >= 0).tolist():  # row-major: p ascending within b
        s = int(sources[b, p])
        y0, x0, y1, x1 = boxes[s].tolist()
        if y0 < 0:
            continue  # the source has no foreground
        oy, ox = offsets[b, p].tolist()
        h, w = y1 - y0 + 1, x1 - x0 + 1
        cut_labels = labels[s, y0:y1 + 1, x0:x1 + 1]
        cut_images = images[s, :, y0:y1 + 1, x0:x1 + 1]
        fg = is_foreground(cut_labels, background, ignore_index)
        dst_labels = out_labels[b, oy:oy + h, ox:ox + w]
        dst_images = out_images[b, :, oy:oy + h, ox:ox + w]
        dst_labels.copy_(torch.where(fg, cut_labels, dst_labels))
        dst_images.copy_(torch.where(fg, cut_images, dst_images))
    return out_images, out_labels
