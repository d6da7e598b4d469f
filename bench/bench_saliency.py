"""Saliency stage, seconds per image at short side 512 on this machine's CPU, split into its
parts: TokenCut (ViT-S/16) feature extraction / eigen-solve / refinement, SelfMask (ViT-S/8)
encoder / decoder + selection / refinement. Refinement only when namedmask.ops.bilateral_solve
exists. The eigen-solve rows compare our solvers with the spec, scipy's generalised
eigh(D − A, D) restricted to the one eigenpair, measured in the same run (ratio = spec / ours).

Random weights (no pretrained DINO here): the ViT cost does not depend on the weights; the
Lanczos iteration count does depend on the affinity's spectrum, so its time on real DINO
keys may differ. Real pool photos are used when ../shared/data is present."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from bench.common import Row, print_table, timeit
from namedmask import ops
from namedmask.models.dino import build_vit, forward_tokens
from namedmask.models.saliency import SelfMask, SelfMaskPredictor, TokenCut, normalize
from namedmask.models.saliency.selfmask import select_masks
from namedmask.models.saliency.tokencut import fiedler_vector

SHARED = Path(os.environ.get("NAMEDMASK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def sample_images(n: int) -> list:
    from namedmask.data.decode import load_image

    pool = SHARED / "pool"
    if pool.is_dir():
        photos = sorted(p for p in pool.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
        return [load_image(p) for p in photos]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (375, 500, 3), generator=g, dtype=torch.uint8) for _ in range(n)]


def scipy_generalised(keys: torch.Tensor, tau: float = 0.2, eps: float = 1e-5) -> np.ndarray:
    f = F.normalize(keys.double(), dim=1)
    a = (f @ f.T > tau).double().numpy()
    a[a == 0] = eps
    d = np.diag(a.sum(1))
    return scipy.linalg.eigh(d - a, d, subset_by_index=[1, 1])[1][:, 0]


def _mean_time(fn, items, repeat):
    return float(np.mean([timeit(lambda: fn(x), repeat=repeat, warmup=0) for x in items]))


def run(images: int = 2, short_side: int = 512, repeat: int = 1) -> list[Row]:
    torch.manual_seed(0)
    solve = getattr(ops, "bilateral_solve", None)
    photos = sample_images(images)
    rows = []

    tc = TokenCut(build_vit("vit_small_patch16_224.dino"), short_side)
    prepared = [tc.prepare(p) for p in photos]
    shape = f"{prepared[0].shape[0]}x{prepared[0].shape[1]} ViT-S/16 x{len(prepared)}"
    x = [normalize([p]) for p in prepared]
    t_feat = _mean_time(tc.features, x, repeat)
    keys = [tc.features(xi) for xi in x]
    tokens = keys[0][0].shape[1]
    t_spec = _mean_time(lambda kg: scipy_generalised(kg[0][0]), keys, repeat)
    rows.append(Row("tokencut", "features", shape, t_feat, extra={"tokens": tokens}))
    rows.append(Row("tokencut", "eigen spec", shape, t_spec, 1.0))
    for solver in ("arpack", "dense"):
        t = _mean_time(lambda kg: fiedler_vector(kg[0][0], solver=solver), keys, repeat)
        rows.append(Row("tokencut", f"eigen {solver}", shape, t, t_spec / t))
    t_cut = _mean_time(lambda kg: tc.cut(kg[0][0], kg[1]), keys, repeat)
    rows.append(Row("tokencut", "cut", shape, t_cut, extra={"what": "affinity + arpack eigen + bipartition + component"}))
    if solve is not None:
        masks = [tc.predict(xi)[0] for xi in x]
        t_ref = _mean_time(lambda im: solve(im[0], im[1].float(), preset="namedmask"), list(zip(prepared, masks)), repeat)
        rows.append(Row("tokencut", "bilateral solver", shape, t_ref))
    else:
        t_ref = 0.0
    no_refine = {} if solve else {"refinement": "not measured: namedmask.ops.bilateral_solve not on this branch"}
    rows.append(Row("tokencut", "total / image", shape, t_feat + t_cut + t_ref, extra=no_refine))

    sm = SelfMaskPredictor(SelfMask(build_vit("vit_small_patch8_224.dino")), short_side)
    prepared = [sm.prepare(p) for p in photos]
    shape = f"{prepared[0].shape[0]}x{prepared[0].shape[1]} ViT-S/8 x{len(prepared)}"
    padded = [F.pad(normalize([p]), (0, (-p.shape[1]) % 8, 0, (-p.shape[0]) % 8)) for p in prepared]
    with torch.no_grad():
        t_enc = _mean_time(lambda xi: forward_tokens(sm.model.encoder, xi), padded, repeat)
        encoded = [(forward_tokens(sm.model.encoder, xi), tuple(xi.shape[-2:])) for xi in padded]
        t_dec = _mean_time(lambda e: select_masks(*sm.model.head(*e[0]), e[1], e[1]), encoded, repeat)
    t_all = t_enc + t_dec
    rows.append(Row("selfmask", "encoder", shape, t_enc, extra={"tokens": padded[0].shape[-2] * padded[0].shape[-1] // 64}))
    rows.append(Row("selfmask", "decoder+select", shape, t_dec))
    if solve is not None:
        masks = [sm.predict(normalize([p]))[0] for p in prepared]
        t_ref = _mean_time(lambda im: solve(im[0], im[1].float(), preset="namedmask"), list(zip(prepared, masks)), repeat)
        rows.append(Row("selfmask", "bilateral solver", shape, t_ref))
    else:
        t_ref = 0.0
    rows.append(Row("selfmask", "total / image", shape, t_all + t_ref, extra=no_refine))
    return rows


if __name__ == "__main__":
    print_table(run(), "saliency (CPU, seconds per image)")
