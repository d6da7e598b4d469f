"""Triton copy-paste: fg_boxes is one program per sample reducing its box over tiles;
copy_paste is one fused kernel over (pixel tile, sample) that resolves each output pixel's
source with the rule of csrc/include/namedmask/copy_paste.h (last paste that covers the
pixel with a foreground source pixel wins) and gathers the label and every channel.
Images are moved as integers of the same width, so any dtype is copied bit-exactly."""
import torch
import triton
import triton.language as tl

from namedmask.kernels._device import on_input_device

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _fg_boxes_kernel(labels_ptr, boxes_ptr, H, W, background, ignore_index, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    plane = H * W  # int args may arrive as constexpr (Triton specialises 1): no .to() on them
    y0 = tl.full([BLOCK], H, tl.int64)
    x0 = tl.full([BLOCK], W, tl.int64)
    y1 = tl.full([BLOCK], -1, tl.int64)
    x1 = tl.full([BLOCK], -1, tl.int64)
    for start in tl.range(0, plane, BLOCK):
        pix = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = pix < plane
        label = tl.load(labels_ptr + b * plane + pix, mask=inside, other=0).to(tl.int64)
        fg = inside & (label > background) & (label < ignore_index)
        y = pix // W
        x = pix - y * W
        y0 = tl.minimum(y0, tl.where(fg, y, H))
        x0 = tl.minimum(x0, tl.where(fg, x, W))
        y1 = tl.maximum(y1, tl.where(fg, y, -1))
        x1 = tl.maximum(x1, tl.where(fg, x, -1))
    top = tl.max(y1, axis=0)  # -1: no foreground -> (-1, -1, -1, -1)
    empty = top < 0
    tl.store(boxes_ptr + 4 * b + 0, tl.where(empty, -1, tl.min(y0, axis=0)))
    tl.store(boxes_ptr + 4 * b + 1, tl.where(empty, -1, tl.min(x0, axis=0)))
    tl.store(boxes_ptr + 4 * b + 2, top)
    tl.store(boxes_ptr + 4 * b + 3, tl.where(empty, -1, tl.max(x1, axis=0)))


@triton.jit
def _copy_paste_kernel(images_ptr, labels_ptr, boxes_ptr, sources_ptr, offsets_ptr, out_images_ptr, out_labels_ptr,
                       B, C, H, W, P, background, ignore_index, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    plane = H * W  # int args may arrive as constexpr (Triton specialises 1): no .to() on them
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = pix < plane
    y = pix // W
    x = pix - y * W
    from_sample = tl.zeros([BLOCK], tl.int64) + b  # where each output pixel reads from
    from_pixel = pix
    for p in range(0, P):  # ascending: a later paste overrides an earlier one
        source = tl.load(sources_ptr + b * P + p)
        oy = tl.load(offsets_ptr + 2 * (b * P + p))
        ox = tl.load(offsets_ptr + 2 * (b * P + p) + 1)
        in_batch = (source >= 0) & (source < B)
        s = tl.where(in_batch, source, 0)
        by0 = tl.load(boxes_ptr + 4 * s)
        bx0 = tl.load(boxes_ptr + 4 * s + 1)
        by1 = tl.load(boxes_ptr + 4 * s + 2)
        bx1 = tl.load(boxes_ptr + 4 * s + 3)
        valid = in_batch & (by0 >= 0) & (bx0 >= 0) & (by1 >= by0) & (bx1 >= bx0) & (by1 < H) & (bx1 < W)
        sy = y - oy + by0
        sx = x - ox + bx0
        covered = inside & valid & (sy >= by0) & (sy <= by1) & (sx >= bx0) & (sx <= bx1)
        src = sy * W + sx
        label = tl.load(labels_ptr + s * plane + src, mask=covered, other=0).to(tl.int64)
        take = covered & (label > background) & (label < ignore_index)
        from_sample = tl.where(take, s, from_sample)
        from_pixel = tl.where(take, src, from_pixel)
    label = tl.load(labels_ptr + from_sample * plane + from_pixel, mask=inside)
    tl.store(out_labels_ptr + b * plane + pix, label, mask=inside)
    for c in range(0, C):
        value = tl.load(images_ptr + (from_sample * C + c) * plane + from_pixel, mask=inside)
        tl.store(out_images_ptr + (b * C + c) * plane + pix, value, mask=inside)


def _block(t: torch.Tensor, plane: int) -> int:
    if t.is_cuda:
        return 1024
    return min(65536, triton.next_power_of_2(max(plane, 16)))  # the CPU interpreter wants big tiles


@on_input_device
def fg_boxes(labels: torch.Tensor, background: int, ignore_index: int) -> torch.Tensor:
    labels = labels.contiguous()
    B, H, W = labels.shape
    boxes = torch.empty(B, 4, dtype=torch.int64, device=labels.device)
    if B:
        _fg_boxes_kernel[(B,)](labels, boxes, H, W, background, ignore_index, BLOCK=_block(labels, H * W))
    return boxes


@on_input_device
def copy_paste(images, labels, boxes, sources, offsets, background: int, ignore_index: int):
    images, labels = images.contiguous(), labels.contiguous()
    boxes, sources, offsets = boxes.contiguous(), sources.contiguous(), offsets.contiguous()
    B, C, H, W = images.shape
    out_images, out_labels = torch.empty_like(images), torch.empty_like(labels)
    if images.numel() == 0 and labels.numel() == 0:
        return out_images, out_labels
    bits = _BITS[images.element_size()]
    block = _block(images, H * W)
    grid = (triton.cdiv(H * W, block), B)
    _copy_paste_kernel[grid](images.view(bits), labels, boxes, sources, offsets, out_images.view(bits), out_labels,
                             B, C, H, W, sources.shape[1], background, ignore_index, BLOCK=block)
    return out_images, out_labels
