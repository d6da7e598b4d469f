"""copy_paste: NamedMask's copy-paste augmentation as a batched, functional op.

`copy_paste` pastes the foreground objects of some samples of a batch onto others at given
positions; `random_copy_paste` draws those positions (and optionally a rescale and flip of
each object) with a torch.Generator and calls it. Unlike the official per-sample loop, inputs
are never modified and the object's box is inclusive (its last row and column are kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from namedmask.ops.registry import register_op, select

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)


register_op("fg_boxes", "copy_paste")
register_op("copy_paste", "copy_paste")


def _check_labels(labels: torch.Tensor, fn: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 3:
        raise ValueError(f"{fn}: labels must be [B, H, W], got shape {tuple(labels.shape)}")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"{fn}: labels must be uint8, int32 or int64, got {labels.dtype}")


def fg_boxes(labels: torch.Tensor, *, ignore_index: int = 255, background: int = 0,
             backend: str = "auto") -> torch.Tensor:
    """Tight inclusive foreground box (background < label < ignore_index) of each sample of
    labels [B, H, W]: int64 [B, 4] rows (y0, x0, y1, x1), (-1, -1, -1, -1) without foreground."""
    _check_labels(labels, "fg_boxes")
    _, impl = select("fg_boxes", backend, labels.device)
    return impl(labels, int(background), int(ignore_index))


def _check_inputs(images, labels, sources, offsets) -> None:
    for name, t in (("images", images), ("labels", labels), ("sources", sources), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"copy_paste: {name} must be a torch.Tensor, got {type(t).__name__}")
    if images.dim() != 4:
        raise ValueError(f"copy_paste: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype not in IMAGE_DTYPES:
        raise ValueError(f"copy_paste: images must be uint8 or a float dtype, got {images.dtype}")
    _check_labels(labels, "copy_paste")
    B, _, H, W = images.shape
    if labels.shape != (B, H, W):
        raise ValueError(f"copy_paste: labels must be [B, H, W] = {[B, H, W]} to match images, "
                         f"got {list(labels.shape)}")
    if sources.dim() != 2 or sources.shape[0] != B or sources.dtype != torch.int64:
        raise ValueError(f"copy_paste: sources must be int64 [B, P] with B={B}, "
                         f"got {sources.dtype} {list(sources.shape)}")
    P = sources.shape[1]
    if offsets.shape != (B, P, 2) or offsets.dtype != torch.int64:
        raise ValueError(f"copy_paste: offsets must be int64 [B, P, 2] = {[B, P, 2]}, "
                         f"got {offsets.dtype} {list(offsets.shape)}")
    for name, t in (("labels", labels), ("sources", sources), ("offsets", offsets)):
        if t.device != images.device:
            raise ValueError(f"copy_paste: {name} is on {t.device}, images on {images.device}; "
                             f"move all tensors to one device")


def _check_placements(boxes, sources, offsets, height: int, width: int) -> None:
    """Every paste must name a sample of the batch (or -1) and keep its box on the canvas."""
    B = sources.shape[0]
    wrong = (sources < -1) | (sources >= B)
    if bool(wrong.any()):
        b, p = torch.nonzero(wrong)[0].tolist()
        raise ValueError(f"copy_paste: sources[{b}, {p}] = {int(sources[b, p])} is not a sample of the batch; "
                         f"use 0..{B - 1}, or -1 for no paste")
    box = boxes[sources.clamp(min=0)]  # [B, P, 4]
    pasted = (sources >= 0) & (box[..., 0] >= 0)
    h, w = box[..., 2] - box[..., 0] + 1, box[..., 3] - box[..., 1] + 1
    oy, ox = offsets[..., 0], offsets[..., 1]
    outside = pasted & ((oy < 0) | (ox < 0) | (oy + h > height) | (ox + w > width))
    if bool(outside.any()):
        b, p = torch.nonzero(outside)[0].tolist()
        y0, x0, y1, x1 = box[b, p].tolist()
        raise ValueError(
            f"copy_paste: paste (b={b}, p={p}) of sample {int(sources[b, p])} would leave the {height}x{width} "
            f"canvas: its box (y0, x0, y1, x1) = ({y0}, {x0}, {y1}, {x1}), {y1 - y0 + 1}x{x1 - x0 + 1}, "
            f"at offset (y, x) = ({int(oy[b, p])}, {int(ox[b, p])}); offsets must satisfy "
            f"0 <= y <= {height} - box height and 0 <= x <= {width} - box width")


def copy_paste(images: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, offsets: torch.Tensor, *,
               ignore_index: int = 255, background: int = 0,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Paste objects between the samples of a batch; returns new (images, labels).

    images [B, C, H, W] uint8 or float; labels [B, H, W] uint8, int32 or int64.
    sources int64 [B, P]: for sample b, the batch indices of up to P objects to paste onto it,
    in order (-1 = none). offsets int64 [B, P, 2]: top-left (y, x) where the source's tight
    inclusive foreground box lands (foreground = background < label < ignore_index).
    Objects are cut from the input batch; where the source is foreground, the output pixel and
    label are the source's, elsewhere the base is kept; later pastes cover earlier ones. A
    source without foreground pastes nothing; a box that would leave the canvas is a
    ValueError naming b, p and the box. Inputs are never modified. On CUDA the check reads
    the boxes back to the host (one synchronisation).
    """
    _check_inputs(images, labels, sources, offsets)
    name, boxes_impl = select("fg_boxes", backend, images.device)
    _, impl = select("copy_paste", name, images.device)
    boxes = boxes_impl(labels, int(background), int(ignore_index))
    _check_placements(boxes, sources, offsets, images.shape[2], images.shape[3])
    return impl(images, labels, boxes, sources, offsets, int(background), int(ignore_index))


def random_copy_paste(images: torch.Tensor, labels: torch.Tensor, *, p: float = 0.5, max_objects: int = 1,
                      scale: tuple[float, float] | None = None, hflip: bool = False, ignore_index: int = 255,
                      background: int = 0, generator: torch.Generator | None = None,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """NamedMask's copy-paste on a whole batch, drawn with `generator` (same seed, same result).

    With probability p a sample receives k objects, k uniform in 1..max_objects, each the
    foreground of another sample of the batch (never itself), pasted at a uniform position
    where its box fits. The defaults reproduce NamedMask (p=0.5, one object, no rescale).
    Going beyond (Simple Copy-Paste): `scale=(lo, hi)` rescales each object by a factor
    uniform in [lo, hi] (shrunk further if it would not fit the canvas; image bilinear,
    labels nearest) and `hflip=True` mirrors each object with probability 0.5. Those
    transforms are applied in torch to the cut-out objects, which are then pasted from a
    temporary batch of B' extra samples (the composite then covers B + B' samples).
    The generator lives on the CPU; images and labels may be on any device.
    """
    _check_inputs(images, labels, torch.empty(images.shape[0], 0, dtype=torch.int64, device=images.device),
                  torch.empty(images.shape[0], 0, 2, dtype=torch.int64, device=images.device))
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_copy_paste: p must be in [0, 1], got {p}")
    if int(max_objects) < 1:
        raise ValueError(f"random_copy_paste: max_objects must be >= 1, got {max_objects}")
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
        raise ValueError(f"random_copy_paste: scale must be a range (lo, hi) with 0 < lo <= hi, got {scale}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"random_copy_paste: the generator must be a CPU torch.Generator (got one on "
                         f"{generator.device}); images and labels may be on any device")
    B, _, H, W = images.shape
    P = int(max_objects)
    boxes = fg_boxes(labels, ignore_index=ignore_index, background=background, backend=backend).cpu()
    sources = _draw_sources(B, P, p, generator)
    # Positions are drawn before any transform, so scale=(1, 1) reproduces the plain result.
    position = torch.rand((B, P, 2), generator=generator, dtype=torch.float64)
    if scale is not None or hflip:
        images, labels, sources, boxes = _with_transformed_objects(images, labels, boxes, sources, scale, hflip,
                                                                   background, ignore_index, generator, backend)
    offsets = _offsets(boxes, sources, H, W, position)
    extra = images.shape[0] - B  # the temporary samples receive nothing
    sources = torch.cat([sources, sources.new_full((extra, P), -1)])
    offsets = torch.cat([offsets, offsets.new_zeros(extra, P, 2)])
    out_images, out_labels = copy_paste(images, labels, sources.to(images.device), offsets.to(images.device),
                                        ignore_index=ignore_index, background=background, backend=backend)
    return out_images[:B], out_labels[:B]


def _draw_sources(B: int, P: int, p: float, generator) -> torch.Tensor:
    """int64 [B, P]: which sample each paste slot cuts from (-1 = none), never the sample itself."""
    receives = torch.rand(B, generator=generator) < p
    count = torch.randint(1, P + 1, (B,), generator=generator)
    other = torch.randint(0, max(B - 1, 1), (B, P), generator=generator)
    other += (other >= torch.arange(B)[:, None]).long()  # skip b itself: uniform over the other B - 1
    used = receives[:, None] & (torch.arange(P)[None, :] < count[:, None]) & (B > 1)
    return torch.where(used, other, torch.full_like(other, -1))


def _offsets(boxes, sources, H: int, W: int, position) -> torch.Tensor:
    """int64 [B, P, 2]: the top-left corner at relative position (uniform in [0, 1)^2) among
    those where each source's box fits the canvas; 0 for slots that paste nothing."""
    box = boxes[sources.clamp(min=0)]
    size = torch.stack([box[..., 2] - box[..., 0] + 1, box[..., 3] - box[..., 1] + 1], dim=-1)
    room = (torch.tensor([H, W]) - size + 1).clamp(min=1)  # number of valid corners per axis
    offsets = torch.minimum((position * room).long(), room - 1)
    return torch.where(((sources >= 0) & (box[..., 0] >= 0))[..., None], offsets, torch.zeros_like(offsets))


def _with_transformed_objects(images, labels, boxes, sources, scale, hflip, background, ignore_index, generator,
                              backend):
    """Cut every pasted object, rescale/flip it, and append it to the batch as an extra sample
    (object at the top-left of a background canvas); `sources` then point at those samples."""
    B, C, H, W = images.shape
    extra_images, extra_labels = [], []
    sources = sources.clone()
    for b, slot in torch.nonzero(sources >= 0).tolist():
        s = int(sources[b, slot])
        y0, x0, y1, x1 = boxes[s].tolist()
        if y0 < 0:
            continue  # nothing to cut; the op pastes nothing for it either
        image = images[s, :, y0:y1 + 1, x0:x1 + 1]
        label = labels[s, y0:y1 + 1, x0:x1 + 1]
        if scale is not None:
            factor = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator, dtype=torch.float64))
            h, w = label.shape
            factor = min(factor, H / h, W / w)
            image, label = _resize(image, label, max(1, min(H, round(h * factor))), max(1, min(W, round(w * factor))))
        if hflip and bool(torch.rand((), generator=generator) < 0.5):
            image, label = image.flip(-1), label.flip(-1)
        canvas_image = images.new_zeros(C, H, W)
        canvas_label = labels.new_full((H, W), background)
        canvas_image[:, :image.shape[1], :image.shape[2]] = image
        canvas_label[:label.shape[0], :label.shape[1]] = label
        sources[b, slot] = B + len(extra_images)
        extra_images.append(canvas_image)
        extra_labels.append(canvas_label)
    if not extra_images:
        return images, labels, sources, boxes
    images = torch.cat([images, torch.stack(extra_images)])
    labels = torch.cat([labels, torch.stack(extra_labels)])
    extra_boxes = fg_boxes(labels[B:], background=background, ignore_index=ignore_index, backend=backend)
    return images, labels, sources, torch.cat([boxes, extra_boxes.cpu()])


def _resize(image: torch.Tensor, label: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image bilinear (rounded back for integer dtypes), labels nearest (row floor(i * H / h))."""
    resized = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    if not image.dtype.is_floating_point:
        resized = resized.round().clamp(0, 255)
    rows = torch.arange(h, device=label.device) * label.shape[0] // h
    cols = torch.arange(w, device=label.device) * label.shape[1] // w
    return resized.to(image.dtype), label[rows][:, cols]
