"""What the saliency stage needs from any detector, and the shared preprocessing."""
from __future__ import annotations

import functools

from typing import Protocol

import numpy as np
import torch
from PIL import Image

from namedmask.models.dino import IMAGENET_MEAN, IMAGENET_STD


class SaliencyModel(Protocol):
    name: str

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """Native uint8 [H, W, 3] -> the uint8 [h, w, 3] image the model sees (and the
        bilateral solver refines on)."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, h, w] of prepared images -> bool masks [B, h, w]."""


def short_side_size(height: int, width: int, short_side: int, multiple: int | None = None) -> tuple:
    """(h, w) that resize_short_side gives a height x width image."""
    if height <= width:
        nh, nw = short_side, int(short_side * width / height)
    else:
        nh, nw = int(short_side * height / width), short_side
    if multiple:
        nh, nw = (max(multiple, int(round(n / multiple)) * multiple) for n in (nh, nw))
    return nh, nw


def capped_short_side(height: int, width: int, short_side: int, patch: int, max_tokens: int,
                      multiple: int | None = None) -> int:
    """The short side to resize to: `short_side`, lowered one patch at a time while the patch
    grid of the resized image (short_side_size with `multiple`; a partial patch padded to a
    whole one) would hold more than max_tokens tokens."""
    def tokens(s: int) -> int:
        h, w = short_side_size(height, width, s, multiple)
        return -(-h // patch) * -(-w // patch)

    s = short_side
    while s > patch and tokens(s) > max_tokens:
        s -= patch
    return s


def resize_short_side(image: torch.Tensor, short_side: int, multiple: int | None = None,
                      resample: str = "bilinear") -> torch.Tensor:
    """uint8 [H, W, 3] resized so the short side is `short_side` (long side truncated, as
    torchvision's resize that NamedMask uses); with `multiple`, each side is then rounded to
    the nearest multiple of it (TokenCut's resize_pil). resample: "bilinear"
    (NamedMask/SelfMask) or "lanczos" (TokenCut). A CPU image is resized by PIL; an image on a
    GPU is resized there by resize_tensor (the same pixels, no trip through host memory)."""
    h, w = image.shape[:2]
    nh, nw = short_side_size(h, w, short_side, multiple)
    if (nh, nw) == (h, w):
        return image
    if image.device.type != "cpu":
        return resize_tensor(image, (nh, nw), resample)
    method = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[resample]
    pil = Image.fromarray(image.numpy()).resize((nw, nh), method)
    return torch.from_numpy(np.asarray(pil).copy())


def resize_tensor(image: torch.Tensor, size: tuple, resample: str = "bilinear") -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] on the image's device, computed as Pillow's resize
    computes it (Resample.c: the same filter windows, 22-bit fixed-point coefficients, the
    horizontal pass then the vertical one, each rounded to uint8). The saliency resizes (aspect
    kept) give PIL's pixels exactly (tests/test_gpu_data_path.py). Pillow 13 runs the vertical pass
    first on some strongly anisotropic resizes; those may differ by 1 level on a few pixels."""
    h, w = size
    x = image.permute(2, 0, 1)  # [3, H, W]
    if w != x.shape[2]:
        x = _resample_last_axis(x, w, resample)
    if h != x.shape[1]:
        x = _resample_last_axis(x.transpose(1, 2), h, resample).transpose(1, 2)
    return x.permute(1, 2, 0).contiguous()


_PRECISION_BITS = 32 - 8 - 2  # Pillow's 8-bit fixed point
_GATHER_ELEMENTS = 1 << 24      # int64 scratch per chunk of rows: 128 MiB


_FILTERS = {  # Pillow's filters: (support, function); np.sinc(x) = sin(pi x) / (pi x)
    "bilinear": (1.0, lambda x: np.where(np.abs(x) < 1.0, 1.0 - np.abs(x), 0.0)),
    "lanczos": (3.0, lambda x: np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)),
}


@functools.lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int, resample: str, device: torch.device) -> tuple:
    """Pillow's fixed-point weights int64 [out_size, ksize] and source indices for one axis,
    computed once per (sizes, filter, device): saliency resizes every image of a pool alike."""
    support, kernel = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    centre = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)           # C's (int): toward 0
    count = np.minimum((centre + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    weights = kernel((taps[None, :] + first[:, None] - centre[:, None] + 0.5) / filterscale)
    weights = np.where(taps[None, :] < count[:, None], weights, 0.0)
    total = weights.sum(1, keepdims=True)
    weights = np.divide(weights, total, out=weights, where=total != 0)
    fixed = np.where(weights < 0, -0.5, 0.5) + weights * (1 << _PRECISION_BITS)
    fixed = torch.from_numpy(np.trunc(fixed).astype(np.int64)).to(device)
    index = torch.from_numpy(np.minimum(first[:, None] + taps[None, :], in_size - 1)).to(device)
    return fixed, index


def _resample_last_axis(x: torch.Tensor, out_size: int, resample: str) -> torch.Tensor:
    """uint8 [..., n] -> uint8 [..., out_size]: Pillow's precompute_coeffs and 8-bit pass."""
    in_size = x.shape[-1]
    fixed, index = _coefficients(in_size, out_size, resample, x.device)
    ksize = index.shape[1]
    x = x.contiguous()
    rows = x.reshape(-1, in_size)
    out = torch.empty(rows.shape[0], out_size, dtype=torch.uint8, device=x.device)
    step = max(1, _GATHER_ELEMENTS // (out_size * ksize))  # rows per chunk: bounded scratch memory
    for r in range(0, rows.shape[0], step):
        taps_of = rows[r:r + step, index].long()                      # [rows, out_size, ksize]
        acc = (taps_of * fixed).sum(-1) + (1 << (_PRECISION_BITS - 1))  # integers: exact on any device
        out[r:r + step] = (acc >> _PRECISION_BITS).clamp_(0, 255)
    return out.reshape(*x.shape[:-1], out_size)


def normalize(images: list, device: torch.device | str = "cpu") -> torch.Tensor:
    """Equal-size uint8 [h, w, 3] images -> ImageNet-normalised float [B, 3, h, w] on `device`
    (images already there are not copied)."""
    x = torch.stack(list(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std
