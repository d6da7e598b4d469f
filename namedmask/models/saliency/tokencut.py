"""TokenCut (Wang et al. 2022): training-free salient-object masks from DINO.

Last-layer key features of the patch tokens, L2-normalised; affinity A = F Fᵀ binarised at
τ (A > τ -> 1, else ε = 1e-5 so the graph stays connected); the second-smallest generalised
eigenvector v of (D − A) v = λ D v; bipartition at mean(v); the seed is argmax |v| and the
partition is flipped if it does not contain the seed; only the seed's 4-connected component
is kept (an opt-in `corner_rule`, after MaskCut's, flips a chosen side holding 3 or 4 grid
corners: see `bipartition`). The patch mask is upsampled (nearest) to the input resolution.

Images are resized to the stage's short side (512) with each side rounded to a multiple
of the patch size (LANCZOS, as the official resize_pil does at native resolution).

Memory is bounded: the affinity is dense, N x N float64 for N patch tokens (plus the ViT's own
N x N attention per head), so N is capped at `max_tokens` (default 4096: 128 MiB of affinity;
images up to 4:1 at short side 512 are unaffected). Resize rule: when the short-side resize
would give more tokens, the short side is lowered one patch at a time until the grid has at most
`max_tokens` tokens (`token_short_side`; a 4000x600 photo: short side 512 would give 32x213 =
6816 tokens, 384 gives 24x160 = 3840). A direct cut of more tokens is a ValueError, never an out-of-memory kill.

Ties: when the second eigenvalue of the normalised affinity is repeated (a degenerate graph,
e.g. every cosine > τ), its eigenvector is not unique and ARPACK's answer depends on its
internal random restarts (different masks from identical features in one process); such
graphs are solved by the dense LAPACK solver, deterministic for identical features.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from namedmask.errors import InputError
from namedmask.models.dino import last_layer_keys, patch_size
from namedmask.models.saliency.common import capped_short_side, resize_short_side

log = logging.getLogger(__name__)

MAX_TOKENS = 4096
TIE_GAP = 1e-8  # eigenvalues of M lie in [-1, 1]: closer than this is a tie


@dataclass
class Cut:
    mask: np.ndarray         # bool [h, w]: the seed's connected component
    seed: int                # flat patch index of argmax |v|
    eigenvector: np.ndarray  # float64 [h, w], sign chosen so the object side is > mean


def fiedler_vector(features: torch.Tensor, tau: float = 0.2, eps: float = 1e-5, solver: str = "arpack",
                   max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """Second-smallest generalised eigenvector of (D − A, D) for the binarised cosine
    affinity of `features` [N, C], normalised so vᵀ D v = 1 (scipy's convention).

    Solved as the symmetric problem M u = (1 − λ) u with M = D^-1/2 A D^-1/2, v = D^-1/2 u:
    the second-largest eigenpair of M. solver="arpack" (ARPACK Lanczos; ~5x faster than dense at
    1.3k tokens) or "dense" (LAPACK eigh restricted to that one pair); both give
    scipy.linalg.eigh(D − A, D)'s vector up to sign, which `bipartition` fixes. A tied second
    eigenvalue is solved densely (see the module doc). M is built in place: peak memory
    N² x 9 bytes (float64 M and a bool mask), N <= max_tokens."""
    if solver not in ("arpack", "dense"):
        raise InputError(f"solver must be 'arpack' or 'dense', got {solver!r}")
    n = features.shape[0]
    if n > max_tokens:
        raise InputError(f"TokenCut: {n} patch tokens exceed max_tokens={max_tokens} (the dense affinity would "
                         f"take {n * n * 9 / 2**30:.1f} GiB); resize the image (TokenCut.prepare does) or raise "
                         "max_tokens")
    f = F.normalize(features.detach().to("cpu", torch.float64), dim=1)
    m = f @ f.T
    linked = m > tau
    m.fill_(eps).masked_fill_(linked, 1.0)  # the binarised affinity A
    del linked
    d_inv_sqrt = m.sum(1).rsqrt()
    m.mul_(d_inv_sqrt[:, None]).mul_(d_inv_sqrt[None, :])
    m = m.numpy()
    u = None
    if solver == "arpack" and n > 8:
        v0 = np.linspace(1.0, 2.0, n)  # fixed start vector
        try:
            vals, vecs = eigsh(m, k=3, which="LA", v0=v0, tol=1e-10)  # ascending: [3rd, 2nd, largest]
            if vals[1] - vals[0] > TIE_GAP:
                u = vecs[:, 1]
            else:
                log.debug("TokenCut: tied second eigenvalue on %d tokens (degenerate affinity); solving densely", n)
        except ArpackNoConvergence:
            log.debug("ARPACK did not converge on %d tokens; solving densely", n)
    if u is None:
        u = scipy.linalg.eigh(m, subset_by_index=[n - 2, n - 2])[1][:, 0]
    return d_inv_sqrt.numpy() * u


def token_short_side(height: int, width: int, short_side: int, patch: int, max_tokens: int = MAX_TOKENS) -> int:
    """The short side to resize to: `short_side`, lowered one patch at a time while the patch
    grid of the resized image (sides rounded to multiples of `patch`, as resize_short_side)
    would hold more than max_tokens tokens."""
    return capped_short_side(height, width, short_side, patch, max_tokens, multiple=patch)


def bipartition(eigenvector: np.ndarray, grid: tuple, corner_rule: bool = False) -> Cut:
    """The object side of the cut: v > mean(v), flipped if it misses the seed argmax |v|,
    reduced to the seed's 4-connected component.

    corner_rule (off: TokenCut's rule, as its official saliency code): an object prior after
    MaskCut's (CutLER) for objects that fill the frame, where argmax |v| falls in the thin
    background: the side chosen by the seed is flipped when it holds at least 3 of the grid's 4
    corners, and the seed becomes argmax v on the side kept. (MaskCut tests the corners of
    v > mean(v) before the seed rule, so its outcome depends on the eigenvector's arbitrary sign;
    testing the chosen side does not.)"""
    v = np.asarray(eigenvector, dtype=np.float64).reshape(-1)
    part = v > v.mean()
    seed = int(np.argmax(np.abs(v)))
    if not part[seed]:
        part, v = ~part, -v
    if corner_rule:
        if int(part.reshape(grid)[[0, 0, -1, -1], [0, -1, 0, -1]].sum()) >= 3:
            part, v = ~part, -v
        seed = int(np.argmax(v))
    labels, _ = ndimage.label(part.reshape(grid))
    mask = labels == labels.reshape(-1)[seed]
    return Cut(mask, seed, v.reshape(grid))


def normalized_cut(features: torch.Tensor, grid: tuple, tau: float = 0.2, eps: float = 1e-5,
                   solver: str = "arpack", max_tokens: int = MAX_TOKENS, corner_rule: bool = False) -> Cut:
    """features [h*w, C] of one image on an (h, w) patch grid -> the TokenCut object cut."""
    if features.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"{features.shape[0]} features do not fill a {grid} grid")
    if features.shape[0] < 3:
        raise ValueError(f"a {grid} patch grid is too small to cut (need >= 3 patches)")
    return bipartition(fiedler_vector(features, tau, eps, solver, max_tokens), grid, corner_rule)


class TokenCut:
    """The saliency-model face of TokenCut around a DINO ViT (see common.SaliencyModel)."""
    name = "tokencut"

    def __init__(self, vit, short_side: int = 512, tau: float = 0.2, eps: float = 1e-5, solver: str = "arpack",
                 max_tokens: int = MAX_TOKENS, corner_rule: bool = False):
        self.vit, self.short_side, self.tau, self.eps, self.solver = vit.eval(), short_side, tau, eps, solver
        self.patch, self.max_tokens, self.corner_rule = patch_size(vit), max_tokens, corner_rule

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        side = token_short_side(image.shape[0], image.shape[1], self.short_side, self.patch, self.max_tokens)
        return resize_short_side(image, side, multiple=self.patch, resample="lanczos")

    def features(self, images: torch.Tensor):
        """[B, 3, h, w] -> (keys [B, h/p * w/p, C], patch grid)."""
        return last_layer_keys(self.vit, images)

    def cut(self, keys: torch.Tensor, grid: tuple) -> torch.Tensor:
        """Keys of one image -> bool patch mask [h/p, w/p]."""
        return torch.from_numpy(normalized_cut(keys, grid, self.tau, self.eps, self.solver, self.max_tokens,
                                               self.corner_rule).mask)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        keys, grid = self.features(images)
        # The cut runs on the host (scipy); only the small patch masks go back to the images' device.
        masks = torch.stack([self.cut(k, grid) for k in keys]).to(images.device)
        return masks.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2)  # nearest upsampling
