"""What the saliency stage needs from any detector, and the shared preprocessing."""
from __future__ import annotations

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


def resize_short_side(image: torch.Tensor, short_side: int, multiple: int | None = None,
                      resample: str = "bilinear") -> torch.Tensor:
    """uint8 [H, W, 3] resized with PIL so the short side is `short_side` (long side
    truncated, as torchvision's resize that NamedMask uses); with `multiple`, each side is
    then rounded to the nearest multiple of it (TokenCut's resize_pil). resample:
    "bilinear" (NamedMask/SelfMask) or "lanczos" (TokenCut)."""
    h, w = image.shape[:2]
    if h <= w:
        nh, nw = short_side, int(short_side * w / h)
    else:
        nh, nw = int(short_side * h / w), short_side
    if multiple:
        nh, nw = (max(multiple, int(round(n / multiple)) * multiple) for n in (nh, nw))
    if (nh, nw) == (h, w):
        return image
    method = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[resample]
    pil = Image.fromarray(image.numpy()).resize((nw, nh), method)
    return torch.from_numpy(np.asarray(pil).copy())


def normalize(images: list, device: torch.device | str = "cpu") -> torch.Tensor:
    """Equal-size uint8 [h, w, 3] images -> ImageNet-normalised float [B, 3, h, w]."""
    x = torch.stack(list(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std
