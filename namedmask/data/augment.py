"""Training transforms of NamedMask (DESIGN.md §2(D)), per sample, driven by an explicit
torch.Generator so a sample is a pure function of (seed, sample number): resumed and
multi-process runs see exactly the same data.

random scale U(lo, hi) of the original size (sizes truncated as the official int(w * s);
image bilinear, label nearest) -> pad to the crop with the scaled image's uint8 mean colour /
label 255, on a random side (one of the four corners keeps the image, uniformly) -> random crop
-> hflip -> colour jitter / grayscale / Gaussian blur -> ImageNet normalisation.

The official random_crop draws a fresh random() in each elif, so its four padding corners
come out 0.25 / 0.19 / 0.14 / 0.42 instead of the uniform quarter it evidently intends; we
draw the corner once, uniformly (README, "What differs from the official code")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from namedmask.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images [..., 3, H, W] -> ImageNet-normalised float32."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=g)) < p


def gaussian_blur(image: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [3, H, W] float (reflect padding, as torchvision's blur,
    at 2k instead of k^2 multiply-adds per pixel)."""
    x = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    pad = kernel // 2
    y = image[:, None]  # channels as batch
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k1.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k1.view(1, 1, -1, 1))
    return y[:, 0]


def color_jitter(image: torch.Tensor, strength: tuple, g: torch.Generator) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation, hue) in a random order, on [3, H, W] in [0, 1]."""
    b, c, s, h = strength
    ops = [lambda x, f=_uniform(g, max(0.0, 1 - b), 1 + b): TF.adjust_brightness(x, f),
           lambda x, f=_uniform(g, max(0.0, 1 - c), 1 + c): TF.adjust_contrast(x, f),
           lambda x, f=_uniform(g, max(0.0, 1 - s), 1 + s): TF.adjust_saturation(x, f),
           lambda x, f=_uniform(g, -h, h): TF.adjust_hue(x, f)]
    for i in torch.randperm(4, generator=g).tolist():
        image = ops[i](image)
    return image


def pad_offsets(corner: int, pad_h: int, pad_w: int) -> tuple[int, int]:
    """Where the image sits on its padded canvas, (top, left), for corner 0..3: the padding goes
    to the top+left, bottom+left, top+right or bottom+right (the official four cases)."""
    return (pad_h if corner in (0, 2) else 0), (pad_w if corner in (0, 1) else 0)


def train_transform(image: torch.Tensor, label: torch.Tensor, cfg: AugmentConfig,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image [3, H, W] + uint8 label [H, W] -> normalised float32 [3, c, c] + uint8 [c, c]."""
    c = cfg.crop_size
    h, w = label.shape
    s = _uniform(g, *cfg.scale)
    nh, nw = max(1, int(h * s)), max(1, int(w * s))  # truncation, as the official int(w * scale)
    img = F.interpolate(image[None].float() / 255.0, size=(nh, nw), mode="bilinear", align_corners=False,
                        antialias=True)[0].clamp_(0, 1)
    lab = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].to(torch.uint8)
    ph, pw = max(c, nh), max(c, nw)
    corner = int(torch.randint(0, 4, (), generator=g))  # drawn always: the stream does not depend on sizes
    if (ph, pw) != (nh, nw):
        y0, x0 = pad_offsets(corner, ph - nh, pw - nw)
        # the mean colour of the scaled image as uint8 (the official np.mean(...).astype(np.uint8))
        fill = (img * 255).round().mean(dim=(1, 2)).floor().div(255).view(3, 1, 1)
        canvas = fill.expand(3, ph, pw).clone()
        canvas[:, y0:y0 + nh, x0:x0 + nw] = img
        lab_canvas = torch.full((ph, pw), IGNORE, dtype=torch.uint8)
        lab_canvas[y0:y0 + nh, x0:x0 + nw] = lab
        img, lab = canvas, lab_canvas
    top = int(torch.randint(0, ph - c + 1, (), generator=g))
    left = int(torch.randint(0, pw - c + 1, (), generator=g))
    img, lab = img[:, top:top + c, left:left + c], lab[top:top + c, left:left + c]
    if _chance(g, cfg.hflip_p):
        img, lab = img.flip(-1), lab.flip(-1)
    if _chance(g, cfg.jitter_p):
        img = color_jitter(img, cfg.jitter, g)
    if _chance(g, cfg.grayscale_p):
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if _chance(g, cfg.blur_p):
        kernel = max(3, int(cfg.blur_kernel_fraction * c) // 2 * 2 + 1)
        img = gaussian_blur(img, kernel, _uniform(g, *cfg.blur_sigma))
    return normalize(img), lab.contiguous()


def eval_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] (as decode.load_image returns) -> normalised float32 [1, 3, H, W]."""
    return normalize(image.permute(2, 0, 1))[None]
