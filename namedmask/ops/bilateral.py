"""bilateral_solve: edge-aware refinement of a soft mask by the fast bilateral solver
(Barron & Poole 2016), as NamedMask refines its saliency pseudo-masks.

The native op namedmask::bilateral_solve takes a batch flattened into one pixel list
(image uint8 [P, 3], target/confidence float32 [P], sizes int64 [B, 2]); its spec is
namedmask/ops/reference.py. This module validates inputs, resolves presets and packs batches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from namedmask.errors import InputError
from namedmask.kernels.spec import BILATERAL_MAX_VERTICES, bilateral_radix, bilateral_vertex_cap_message
from namedmask.ops.registry import register_op, select

DEFAULT_CONFIDENCE = 0.999  # NamedMask / TokenCut: uniform confidence
# Memory bound: the solver keeps ~200 bytes per grid vertex (CPU). A photo opens a vertex per 10-30
# pixels, so ordinary images are far below this; colours as varied as i.i.d. noise open one per
# pixel (a 10k x 10k noise image: 1e8 vertices, > 15 GiB). An image whose grid would exceed
# max_vertices is a ValueError naming it; no backend coarsens the grid on its own.
MAX_VERTICES = BILATERAL_MAX_VERTICES  # 2^24: ~3.5 GiB of solver state at most
_KEY_LIMIT = 2 ** 62        # grid keys are int64; keep a factor 2 of headroom


@dataclass(frozen=True)
class BilateralParams:
    sigma_spatial: float
    sigma_luma: float
    sigma_chroma: float
    lam: float


PRESETS = {
    # NamedMask's published values (applied to SelfMask's masks of single-object images).
    "namedmask": BilateralParams(16.0, 16.0, 8.0, 256.0),
    # TokenCut's README and get_saliency.py (16/16/8; 24/4/4 is an unused signature default; lam 256 hard-coded).
    "tokencut": BilateralParams(16.0, 16.0, 8.0, 256.0),
    # Chosen on coarse 16x16-block masks of the 30 voc_mini photos (mean IoU 0.826) by the two
    # sweeps of bench/bench_bilateral.py (108 + 60 settings): the centre of the plateau where
    # every neighbouring setting also gains (sigma_s 4-8, sigma_l 8-16, sigma_c 8-16, lam
    # 32-256), rather than the single best cell. +0.021 mean IoU, +0.019 on the worst of three
    # folds, 26 of 30 photos improved. Gentler than NamedMask's (which erases small objects).
    "tuned": BilateralParams(6.0, 8.0, 16.0, 64.0),
}


register_op("bilateral_solve", "bilateral_solver")


class KeyRangeError(InputError):
    """Sigmas so small for the image sizes that the grid's cells overflow its 64-bit keys: a
    setting to change (larger sigmas, fewer images per call), not a bad input file."""


class GridTooLargeError(InputError):
    """One image of a batch would need more than max_vertices grid vertices (the memory bound).
    `index` is its position in the caller's list, so a stage can name the file and go on."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def resolve_params(preset: str = "namedmask", sigma_spatial: float | None = None, sigma_luma: float | None = None,
                   sigma_chroma: float | None = None, lam: float | None = None) -> BilateralParams:
    """The preset's values with every explicitly given one overriding it."""
    if preset not in PRESETS:
        raise InputError(f"bilateral_solve: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    overrides = {k: float(v) for k, v in (("sigma_spatial", sigma_spatial), ("sigma_luma", sigma_luma),
                                          ("sigma_chroma", sigma_chroma), ("lam", lam)) if v is not None}
    params = replace(PRESETS[preset], **overrides)
    for name in ("sigma_spatial", "sigma_luma", "sigma_chroma"):
        value = getattr(params, name)
        if not value > 0 or value == float("inf"):
            raise InputError(f"bilateral_solve: {name} must be a positive finite number, got {value}")
    if not 0 <= params.lam < float("inf"):
        raise InputError(f"bilateral_solve: lam must be >= 0 and finite, got {params.lam}")
    return params


def _check_pair(i: int, image, target, confidence) -> bool:
    """Validates one (image, target, confidence); returns whether the target is constant."""
    where = f"bilateral_solve: image {i}" if i >= 0 else "bilateral_solve"
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{where}: image must be a uint8 tensor [H, W, 3] (RGB), got {got}")
    for name, t in (("target", target), ("confidence", confidence)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != image.shape[:2]:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be a float tensor [H, W] = {tuple(image.shape[:2])} "
                             f"matching the image, got {got}")
        if t.device != image.device:
            raise ValueError(f"{where}: {name} is on {t.device} but the image is on {image.device}")
    if not target.numel():
        return True
    # NaN propagates through min/max and fails every comparison below.
    lo, hi = _min_max(target)
    if not (lo >= 0 and hi <= 1):
        raise ValueError(f"{where}: target values must be finite and in [0, 1]")
    if confidence is not None and confidence.numel():
        c_lo, c_hi = _min_max(confidence)
        if not (c_lo >= 0 and c_hi < float("inf")):
            raise ValueError(f"{where}: confidence values must be finite and >= 0")
    return lo == hi


# Checks and concatenation of CPU tensors run on the calling thread (NumPy), not on torch's
# intra-op pool: on a busy machine each pooled op waits for a descheduled thread (measured: the
# glue of a 4-photo batch cost more than the solve), and the native kernel shares its own work.
def _on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.uint8, torch.float32, torch.float64)


def _min_max(t: torch.Tensor) -> tuple:
    if _on_cpu(t):
        a = t.detach().numpy()
        return float(a.min()), float(a.max())
    return tuple(float(v) for v in torch.aminmax(t))


def _flat_cat(tensors: list) -> torch.Tensor:
    """The tensors flattened and concatenated (no copy for one contiguous tensor)."""
    if all(_on_cpu(t) for t in tensors) and len({t.dtype for t in tensors}) == 1:
        arrays = [t.detach().numpy().reshape(-1) for t in tensors]  # a view when contiguous
        return torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
    return tensors[0].reshape(-1).contiguous() if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def bilateral_solve_batch(images: list, targets: list, confidences: list | None = None, *, preset: str = "namedmask",
                          sigma_spatial: float | None = None, sigma_luma: float | None = None,
                          sigma_chroma: float | None = None, lam: float | None = None, max_iter: int = 25,
                          tol: float = 1e-5, backend: str = "auto", max_vertices: int = MAX_VERTICES) -> list:
    """bilateral_solve on many images of different sizes in one native call (one launch
    sequence on GPU). Returns a list of float32 [H_i, W_i] soft outputs."""
    if len(images) != len(targets) or (confidences is not None and len(confidences) != len(images)):
        raise ValueError(f"bilateral_solve: got {len(images)} images, {len(targets)} targets"
                         + (f" and {len(confidences)} confidences" if confidences is not None else ""))
    params = resolve_params(preset, sigma_spatial, sigma_luma, sigma_chroma, lam)
    if int(max_iter) < 0 or not tol >= 0:
        raise ValueError(f"bilateral_solve: max_iter must be >= 0 and tol >= 0, got {max_iter} and {tol}")
    if not 1 <= int(max_vertices) < 2 ** 31:
        raise ValueError(f"bilateral_solve: max_vertices must be in [1, 2^31), got {max_vertices}")
    confidences = confidences if confidences is not None else [None] * len(images)
    constant = [_check_pair(i if len(images) > 1 else -1, img, t, c)
                for i, (img, t, c) in enumerate(zip(images, targets, confidences))]
    if not images:
        return []
    device = images[0].device
    if any(img.device != device for img in images):
        raise ValueError("bilateral_solve: all images of a batch must be on the same device")
    outputs = [None] * len(images)
    todo = []
    for i, t in enumerate(targets):
        # A constant target (all background, all foreground) is its own solution.
        if constant[i]:
            outputs[i] = t.float().clone()
        else:
            todo.append(i)
    if todo:
        sizes = torch.tensor([list(images[i].shape[:2]) for i in todo], dtype=torch.int64)
        _check_key_range(sizes, params)
        flat_image = _flat_cat([images[i] for i in todo]).view(-1, 3)
        flat_target = _flat_cat([targets[i].float() for i in todo])
        if all(confidences[i] is None for i in todo):  # one value expanded: no [P] buffer to write and read
            flat_conf = torch.full((1,), DEFAULT_CONFIDENCE, device=device).expand(flat_target.numel())
        else:
            flat_conf = _flat_cat([confidences[i].float() if confidences[i] is not None
                                   else torch.full(targets[i].shape, DEFAULT_CONFIDENCE, device=device)
                                   for i in todo])
        _, impl = select("bilateral_solve", backend, device)
        try:
            flat = impl(flat_image, flat_target, flat_conf, sizes.to(device), params.sigma_spatial, params.sigma_luma,
                        params.sigma_chroma, params.lam, int(max_iter), float(tol), int(max_vertices))
        except ValueError as exc:  # the op numbers the images it was given: name the caller's image
            over = re.match(r"bilateral_solve: image (\d+) \(\d+x\d+\) needs more than max_vertices=", str(exc))
            if over is None:
                raise
            index = todo[int(over.group(1))]
            h, w = images[index].shape[:2]
            raise GridTooLargeError(bilateral_vertex_cap_message(index, h, w, int(max_vertices)), index) from None
        for i, out in zip(todo, torch.split(flat, [targets[i].numel() for i in todo])):
            outputs[i] = out.reshape(targets[i].shape)
    return outputs


def bilateral_solve(image: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor | None = None, *,
                    preset: str = "namedmask", sigma_spatial: float | None = None, sigma_luma: float | None = None,
                    sigma_chroma: float | None = None, lam: float | None = None, max_iter: int = 25,
                    tol: float = 1e-5, backend: str = "auto", max_vertices: int = MAX_VERTICES) -> torch.Tensor:
    """Refines `target` (float [H, W] in [0, 1]) along the edges of `image` (uint8 [H, W, 3] RGB).

    confidence: float [H, W] >= 0, or None for 0.999 everywhere (as NamedMask). preset is one of
    PRESETS ("namedmask" 16/16/8 λ=256, "tokencut" 16/16/8 λ=256 as TokenCut runs it, "tuned"); explicitly given
    sigma_* / lam override it. Returns the solver's soft output, float32 [H, W]; threshold it at
    0.5 for a mask. A constant target (all 0 or all 1) is returned unchanged. An image whose
    bilateral grid would hold more than max_vertices vertices (see MAX_VERTICES) is a
    GridTooLargeError (an InputError, so a ValueError)."""
    return bilateral_solve_batch([image], [target], None if confidence is None else [confidence], preset=preset,
                                 sigma_spatial=sigma_spatial, sigma_luma=sigma_luma, sigma_chroma=sigma_chroma,
                                 lam=lam, max_iter=max_iter, tol=tol, backend=backend, max_vertices=max_vertices)[0]


def _check_key_range(sizes: torch.Tensor, params: BilateralParams) -> None:
    """Grid keys are (image, y, x, Y, U, V) mixed-radix int64 (csrc/include/namedmask/bilateral.h)."""
    max_h, max_w = (int(v) for v in sizes.amax(0))
    radix = bilateral_radix(max_h, max_w, params.sigma_spatial, params.sigma_luma, params.sigma_chroma)
    span = len(sizes)
    for r in radix:
        span *= r
    if span >= _KEY_LIMIT:
        raise KeyRangeError(f"bilateral_solve: the bilateral grid of {len(sizes)} image(s) up to {max_h}x{max_w} with "
                         f"sigmas {params.sigma_spatial}/{params.sigma_luma}/{params.sigma_chroma} has too many cells "
                         f"for 64-bit keys; use larger sigmas or fewer images per call")
