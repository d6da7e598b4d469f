"""An independent oracle of the fast bilateral solver: the published scipy-sparse formulation
(Barron & Poole's notebook as TokenCut ships it: csr splat and blur matrices, diags, and
scipy.sparse.linalg.cg itself), with two deliberate changes that make it exact:
  * YUV is computed from integer coefficients x 1e6 (same vertex for boundary pixels as the
    kernels; the published float formula may flip a pixel on an exact cell boundary), and
  * vertices are found with np.unique over coordinate rows (no base-255 hash, so no aliasing).
With published_hash=True it uses the published base-255 hash instead (as fast as the original,
for the benchmark; exact only while every coordinate is < 255); with published_yuv=True the
published float YUV (np.tensordot with the float matrix, cells by astype(int) truncation) as
TokenCut's and NamedMask's bilateral_solver.py compute it (bench/bench_official.py).
Also the coarse-mask recipe of issue 9 (shared by the tests and bench/bench_bilateral.py).
"""
import numpy as np
import torch
from scipy.sparse import csr_matrix, diags
from scipy.sparse.linalg import cg

RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
RGB_TO_YUV_E6 = np.array([[299000, 587000, 114000], [-168736, -331264, 500000], [500000, -418688, -81312]],
                         dtype=np.int64)
YUV_OFFSET_E6 = np.array([0, 128000000, 128000000], dtype=np.int64)


class ScipyBilateralGrid:
    def __init__(self, rgb: np.ndarray, sigma_spatial, sigma_luma, sigma_chroma, published_hash=False,
                 published_yuv=False):
        h, w, _ = rgb.shape
        if published_yuv:
            yuv = (np.tensordot(rgb, RGB_TO_YUV, ([2], [1])) + np.array([0.0, 128.0, 128.0])).reshape(-1, 3)
            cell = lambda v, sigma: (v / sigma).astype(np.int64)  # noqa: E731  truncation, as published
        else:
            yuv = (rgb.reshape(-1, 3).astype(np.int64) @ RGB_TO_YUV_E6.T + YUV_OFFSET_E6) / 1e6
            cell = lambda v, sigma: np.floor(v / sigma)  # noqa: E731
        iy, ix = np.mgrid[:h, :w]
        coords = np.stack([cell(ix.reshape(-1), sigma_spatial), cell(iy.reshape(-1), sigma_spatial),
                           cell(yuv[:, 0], sigma_luma), cell(yuv[:, 1], sigma_chroma),
                           cell(yuv[:, 2], sigma_chroma)], 1).astype(np.int64)
        self.npixels, self.dim = coords.shape
        if published_hash:
            hash_vec = 255.0 ** np.arange(self.dim)
            hashes = coords @ hash_vec
            flat, first, idx = np.unique(hashes, return_index=True, return_inverse=True)
            unique = coords[first]
            key = lambda rows: rows @ hash_vec  # noqa: E731
        else:
            unique, idx = np.unique(coords, axis=0, return_inverse=True)
            # Rows are looked up by their ravelled index over the occupied box (+1 margin),
            # ascending because np.unique sorts rows.
            box = unique.max(0) + 3
            key = lambda rows: np.ravel_multi_index(tuple((rows + 1).T), box)  # noqa: E731
            flat = key(unique)
        idx = idx.reshape(-1)
        self.nvertices = len(unique)
        self.S = csr_matrix((np.ones(self.npixels), (idx, np.arange(self.npixels))),
                            shape=(self.nvertices, self.npixels))
        self.blurs = []
        for d in range(self.dim):
            rows, cols = [], []
            for offset in (-1, 1):
                shifted = unique.copy()
                shifted[:, d] += offset
                wanted = key(shifted)
                pos = np.clip(np.searchsorted(flat, wanted), 0, self.nvertices - 1)
                hit = np.flatnonzero(flat[pos] == wanted)
                rows.append(hit), cols.append(pos[hit])
            rows, cols = np.concatenate(rows), np.concatenate(cols)
            self.blurs.append(csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(self.nvertices, self.nvertices)))

    def splat(self, x):
        return self.S @ x

    def slice(self, y):
        return self.S.T @ y

    def blur(self, x):
        out = 2 * self.dim * x
        for blur in self.blurs:
            out = out + blur @ x
        return out


def scipy_bilateral_solve(rgb, target, confidence, sigma_spatial, sigma_luma, sigma_chroma, lam,
                          max_iter=25, tol=1e-5, published_hash=False, published_yuv=False):
    grid = ScipyBilateralGrid(rgb, sigma_spatial, sigma_luma, sigma_chroma, published_hash, published_yuv)
    m = grid.splat(np.ones(grid.npixels))
    n = np.ones(grid.nvertices)
    for _ in range(10):
        n = np.sqrt(n * m / grid.blur(n))
    m = n * grid.blur(n)
    dn, dm = diags(n), diags(m)
    blur_matrix = 2 * grid.dim * diags(np.ones(grid.nvertices)) + sum(grid.blurs)
    a_smooth = dm - dn @ blur_matrix @ dn
    t, c = target.reshape(-1).astype(np.float64), confidence.reshape(-1).astype(np.float64)
    w_splat = grid.splat(c)
    a = lam * a_smooth + diags(w_splat)
    b = grid.splat(c * t)
    precond = diags(1 / np.maximum(a.diagonal(), 1e-5))
    y0 = np.where(w_splat > 0, b / np.where(w_splat > 0, w_splat, 1), 0)
    y, _ = cg(a, b, x0=y0, M=precond, maxiter=max_iter, rtol=tol, atol=0.0)
    return grid.slice(y).reshape(target.shape)


def coarse_mask(gt: np.ndarray, block: int = 16) -> torch.Tensor:
    """Issue 9's coarse mask: foreground = any class (255 is not foreground), majority vote per
    block x block cell (cells cut at the border vote over the pixels they have), nearest upsample."""
    fg = torch.from_numpy((gt != 0) & (gt != 255)).float()
    h, w = fg.shape
    votes = torch.nn.functional.avg_pool2d(fg[None, None], block, ceil_mode=True)[0, 0]
    return (votes > 0.5).float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]


def foreground_iou(mask: torch.Tensor, gt: np.ndarray) -> float:
    """IoU of a boolean mask with the ground-truth foreground, 255 pixels not scored."""
    keep = torch.from_numpy(gt != 255)
    fg = torch.from_numpy((gt != 0) & (gt != 255))
    m = mask.bool() & keep
    union = int((m | fg).sum())
    return float((m & fg).sum()) / union if union else 1.0
