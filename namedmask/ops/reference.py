"""Pure-PyTorch reference implementations: THE spec of every namedmask op.

Each function here is written to be read, not to be fast. Every native (C++, CUDA) and
Triton backend is tested against these: exactly for integer outputs, within stated
tolerances for float outputs. They also serve as the fallback when no kernel is built.
"""
from __future__ import annotations

import torch

from namedmask.kernels.spec import (BILATERAL_BISTOCHASTIC_STEPS, BILATERAL_DIAG_MIN, BILATERAL_DIMS,  # noqa: F401
                                    BILATERAL_MAX_VERTICES, RGB_TO_YUV_E6, YUV_OFFSET_E6,
                                    bilateral_vertex_cap_message)


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


# --- bilateral solver (issue 9) ---------------------------------------------------------------
# The fast bilateral solver of Barron & Poole (2016) as NamedMask/TokenCut use it, on a batch of
# images flattened into one pixel list (sizes[b] = (H_b, W_b), pixels of image b row-major after
# those of images < b). Per image: RGB -> YUV; vertex (x/σs, y/σs, Y/σl, U/σc, V/σc) floored;
# unique occupied vertices; splat S; blur B = [1 2 1] per dimension over existing neighbours;
# bistochastize (10 steps) to get Dn, Dm; solve (λ(Dm − Dn B Dn) + diag(S c)) y = S(c·t) by
# Jacobi-preconditioned CG exactly as scipy.sparse.linalg.cg (start at y0 = S(c·t) / S(c), stop
# before an iteration when ||r|| < tol·||b||, at most max_iter iterations); slice x = Sᵀ y.
# All vertex-space math in float64. YUV is computed exactly (integer coefficients x 1e6, see
# csrc/include/namedmask/bilateral.h) so that every backend puts boundary pixels in the same vertex.

_RGB_TO_YUV_E6 = torch.tensor(RGB_TO_YUV_E6, dtype=torch.int64)
_YUV_OFFSET_E6 = torch.tensor(YUV_OFFSET_E6, dtype=torch.int64)


def bilateral_vertex_coordinates(image: torch.Tensor, sigma_spatial: float, sigma_luma: float,
                                 sigma_chroma: float) -> torch.Tensor:
    """int64 [H*W, 5]: the grid cell (x, y, Y, U, V) of every pixel of a uint8 [H, W, 3] image."""
    h, w, _ = image.shape
    rgb = image.reshape(-1, 1, 3).long().cpu()
    yuv = ((rgb * _RGB_TO_YUV_E6).sum(-1) + _YUV_OFFSET_E6).double() / 1e6
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    cells = [xs.reshape(-1) / sigma_spatial, ys.reshape(-1) / sigma_spatial,
             yuv[:, 0] / sigma_luma, yuv[:, 1] / sigma_chroma, yuv[:, 2] / sigma_chroma]
    return torch.stack(cells, 1).floor().long()


class _BilateralGrid:
    """Occupied vertices of one image, its splat (pixel -> vertex) and blur neighbours."""

    def __init__(self, coords: torch.Tensor):
        # One integer key per vertex; radix = extent + 2 so that key ± stride is the ±1
        # neighbour and never another vertex.
        radix = coords.amax(0) + 3
        self.strides = [int(torch.prod(radix[d + 1:])) for d in range(BILATERAL_DIMS)]
        keys = ((coords + 1) * torch.tensor(self.strides)).sum(1)
        self.keys, self.vertex_of_pixel = torch.unique(keys, return_inverse=True)
        self.num_vertices = self.keys.numel()
        self.neighbours = []  # (vertex indices that have the neighbour, the neighbour's index)
        for stride in self.strides:
            for offset in (-stride, stride):
                wanted = self.keys + offset
                pos = torch.searchsorted(self.keys, wanted).clamp(max=self.num_vertices - 1)
                found = self.keys[pos] == wanted
                self.neighbours.append((found.nonzero().squeeze(1), pos[found]))

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.num_vertices, dtype=torch.float64)
        return out.index_add_(0, self.vertex_of_pixel, values.double())

    def slice(self, y: torch.Tensor) -> torch.Tensor:
        return y[self.vertex_of_pixel]

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        out = 2.0 * BILATERAL_DIMS * x
        for vertices, nbr in self.neighbours:
            out = out.index_add(0, vertices, x[nbr])
        return out


def _bilateral_solve_one(image, target, confidence, sigma_spatial, sigma_luma, sigma_chroma, lam, max_iter, tol,
                         index=0, max_vertices=BILATERAL_MAX_VERTICES):
    grid = _BilateralGrid(bilateral_vertex_coordinates(image, sigma_spatial, sigma_luma, sigma_chroma))
    if grid.num_vertices > max_vertices:
        raise ValueError(bilateral_vertex_cap_message(index, image.shape[0], image.shape[1], max_vertices))
    # Bistochastization: n such that n * B n ≈ m (pixels per vertex); then m made exact.
    m = grid.splat(torch.ones(target.numel()))
    n = torch.ones_like(m)
    for _ in range(BILATERAL_BISTOCHASTIC_STEPS):
        n = torch.sqrt(n * m / grid.blur(n))
    m = n * grid.blur(n)
    w = grid.splat(confidence)
    b = grid.splat(confidence.double() * target.double())

    def apply_a(p):
        return lam * (m * p - n * grid.blur(n * p)) + w * p

    inv_diag = 1.0 / torch.clamp(lam * (m - 2.0 * BILATERAL_DIMS * n * n) + w, min=BILATERAL_DIAG_MIN)
    # scipy.sparse.linalg.cg with x0 = b / w (0 where a vertex has no confidence).
    y = torch.where(w > 0, b / torch.where(w > 0, w, 1.0), 0.0)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return torch.zeros(target.numel(), dtype=torch.float32)  # scipy returns b itself
    r = b - apply_a(y)
    p, rho_prev = None, None
    for _ in range(max_iter):
        if float(torch.linalg.vector_norm(r)) < tol * b_norm:
            break
        z = r * inv_diag
        rho = float(r @ z)
        p = z if p is None else z + (rho / rho_prev) * p
        q = apply_a(p)
        pq = float(p @ q)
        if pq == 0.0:  # only when r == 0 exactly (tol == 0): converged; the next beta would be 0 / 0
            break
        alpha = rho / pq
        y = y + alpha * p
        r = r - alpha * q
        rho_prev = rho
    return grid.slice(y).float()


def bilateral_solve(image: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, sizes: torch.Tensor,
                    sigma_spatial: float, sigma_luma: float, sigma_chroma: float, lam: float, max_iter: int,
                    tol: float, max_vertices: int = BILATERAL_MAX_VERTICES) -> torch.Tensor:
    """float32 [P]: the solver's soft output for every pixel of a flattened batch.

    image uint8 [P, 3] RGB, target and confidence float32 [P], sizes int64 [B, 2] (H, W) with
    sum(H * W) == P. Images are solved independently. An image whose grid has more than
    max_vertices vertices is a ValueError naming it (the memory bound)."""
    out, start = [], 0
    for i, (h, w) in enumerate(sizes.tolist()):
        end = start + h * w
        out.append(_bilateral_solve_one(image[start:end].reshape(h, w, 3).cpu(), target[start:end].cpu(),
                                        confidence[start:end].cpu(), sigma_spatial, sigma_luma, sigma_chroma,
                                        lam, max_iter, tol, i, max_vertices))
        start = end
    return torch.cat(out).to(target.device) if out else torch.zeros(0, dtype=torch.float32, device=target.device)
