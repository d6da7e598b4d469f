"""bilateral_solve: speed per 500x375 photo (torch reference, C++, CUDA/Triton on a GPU, the
published scipy formulation, a dense CRF peer) and quality: mean foreground IoU of coarse
16x16-block masks of the voc_mini photos before and after refinement, per preset and for the CRF.

  python -m bench bilateral                      speed + quality rows
  python -m bench.bench_bilateral --sweep coarse  the sweeps behind the `tuned` preset (then --sweep fine)
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import SHARED_DATA, Row, print_table, settle, timeit
from namedmask import ops
from namedmask.ops.bilateral import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bilateral_oracle import coarse_mask, foreground_iou, scipy_bilateral_solve  # noqa: E402

VOC_MINI = SHARED_DATA / "voc_mini"
SIZE = (500, 375)  # width, height


def load_photos(size: tuple | None = None) -> list:
    """[(stem, rgb uint8 [H, W, 3], coarse target [H, W], gt labels)] of voc_mini, resized when asked."""
    out = []
    for path in sorted((VOC_MINI / "SegmentationClass").glob("*.png")):
        rgb, gt = Image.open(VOC_MINI / "JPEGImages" / f"{path.stem}.jpg").convert("RGB"), Image.open(path)
        if size:
            rgb, gt = rgb.resize(size, Image.BILINEAR), gt.resize(size, Image.NEAREST)
        gt = np.array(gt)
        out.append((path.stem, torch.from_numpy(np.array(rgb)), coarse_mask(gt), gt))
    return out


def synthetic_photos(n: int = 8) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        rgb = torch.randint(0, 256, (SIZE[1], SIZE[0], 3), generator=g, dtype=torch.uint8)
        rgb[100:300, 120:380] //= 4
        gt = np.zeros((SIZE[1], SIZE[0]), np.uint8)
        gt[100:300, 120:380] = 1
        out.append((f"synthetic{i}", rgb, coarse_mask(gt), gt))
    return out


def dense_crf(rgb: np.ndarray, mask: np.ndarray, iterations: int = 5) -> np.ndarray | None:
    """The CRF peer: pydensecrf2 with its README settings (unary from labels, gt_prob 0.7;
    Gaussian sxy 3 compat 3; bilateral sxy 80 srgb 13 compat 10). None when not installed."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels
    except ImportError:
        return None
    h, w = mask.shape
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(unary_from_labels(mask.astype(np.int32), 2, gt_prob=0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(rgb), compat=10)
    q = np.array(crf.inference(iterations)).reshape(2, h, w)
    return q.argmax(0).astype(bool)


def mean_iou(photos: list, masks: list) -> float:
    return float(np.mean([foreground_iou(torch.as_tensor(m), gt) for (_, _, _, gt), m in zip(photos, masks)]))


def refine(photos: list, **params) -> list:
    outs = ops.bilateral_solve_batch([p[1] for p in photos], [p[2] for p in photos], **params)
    return [o > 0.5 for o in outs]


def speed_rows(photos: list) -> list[Row]:
    """Every method on the same photos (those whose coarse mask is not constant: a constant
    target is returned as is, which would flatter the op)."""
    timed = [p for p in photos if float(p[2].min()) != float(p[2].max())][:8]
    shape = f"{len(timed)} photos {SIZE[0]}x{SIZE[1]}"

    def per_image(fn, repeat=3, items=timed, **kw):
        return timeit(lambda: [fn(*p[1:3]) for p in items], repeat=repeat, **kw) / len(items)

    t_torch = per_image(lambda x, t: ops.bilateral_solve(x, t, backend="torch"), repeat=1)
    scipy = lambda x, t: scipy_bilateral_solve(x.numpy(), t.numpy(), np.full(t.shape, 0.999), 16, 16, 8,  # noqa: E731
                                               256.0, published_hash=True)
    rows = [Row("bilateral_solve", "torch", shape, t_torch, 1.0)]
    if "cpp" not in ops.available_backends("bilateral_solve", "cpu"):
        t_scipy = per_image(scipy, repeat=3)
    else:
        for _, x, t, _ in timed:  # agreement with the reference on these photos, then time
            diff = (ops.bilateral_solve(x, t, backend="cpp") - ops.bilateral_solve(x, t, backend="torch")).abs().max()
            assert float(diff) <= 1e-3, f"cpp disagrees with the reference by {float(diff)}"
        threads = torch.get_num_threads()

        def with_threads(n, fn):  # fn() with n torch threads
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)

        cpp = lambda x, t: ops.bilateral_solve(x, t, backend="cpp")  # noqa: E731
        batch = lambda: ops.bilateral_solve_batch([p[1] for p in timed], [p[2] for p in timed], backend="cpp")  # noqa
        methods = {  # name -> per-image seconds of one measurement
            f"cpp {threads} thread{'s' * (threads > 1)}": lambda: per_image(cpp, repeat=3),
            "cpp 1 thread": lambda: with_threads(1, lambda: per_image(cpp, repeat=3)),
            "cpp batch": lambda: timeit(batch, repeat=3) / len(timed),
            "scipy": lambda: per_image(scipy, repeat=1),
        }
        # Rounds of every method in turn, so that a drift in machine speed (this machine is shared)
        # hits them alike; ratios to scipy are taken per round, then the median.
        times = {name: [] for name in methods}
        for _ in range(5):
            for name, measure in methods.items():
                times[name].append(measure())
                settle()  # scipy's BLAS threads spin on after it, taking the core the next method may share
        t_scipy = statistics.median(times["scipy"])
        for name in methods:
            if name == "scipy":
                continue
            t_cpp = statistics.median(times[name])
            ratio = statistics.median(s / c for s, c in zip(times["scipy"], times[name]))
            extra = {"vs published scipy": f"{ratio:.1f}x (median of 5 interleaved rounds)"}
            if name == "cpp batch":
                extra["note"] = (f"one call for the {len(timed)} photos: one image per thread from 16 images, "
                                 f"else on the calling thread plus the cores idle at the time of the call")
            elif name == "cpp 1 thread":
                each = sorted(with_threads(1, lambda: per_image(cpp, repeat=5, items=[p])) for p in timed)
                extra["per photo"] = f"median {each[len(each) // 2] * 1e3:.2f} ms, max {each[-1] * 1e3:.2f} ms"
            else:
                extra["note"] = ("a photo below 2 M pixels: its grid, slicing, bistochastization and CG shared only "
                                 "with cores idle at the time of the call (none on a busy machine)")
            rows.append(Row("bilateral_solve", name, shape, t_cpp, t_torch / t_cpp, None, extra))
    if torch.cuda.is_available():
        gpu = [(s, x.cuda(), t.cuda(), g) for s, x, t, g in timed]
        solve = lambda backend: ops.bilateral_solve_batch([p[1] for p in gpu], [p[2] for p in gpu],  # noqa: E731
                                                          backend=backend)
        t_ref = timeit(lambda: solve("torch"), repeat=1, sync_cuda=True) / len(gpu)
        for backend in ops.available_backends("bilateral_solve", "cuda"):
            t = timeit(lambda: solve(backend), repeat=5, sync_cuda=True) / len(gpu)
            rows.append(Row("bilateral_solve", f"{backend} (gpu batch)", shape, t, t_ref / t))
    rows.append(Row("bilateral_solve", "scipy published", shape, t_scipy, t_torch / t_scipy, None,
                    {"formulation": "TokenCut's bilateral_solver.py (base-255 hash, csr, scipy cg)"}))
    if dense_crf(timed[0][1].numpy(), timed[0][2].numpy() > 0.5) is None:
        rows.append(Row("dense CRF peer", "pydensecrf2", "not installed (pip install pydensecrf2)", float("nan")))
    else:
        t_crf = per_image(lambda x, t: dense_crf(x.numpy(), t.numpy() > 0.5), repeat=1)
        rows.append(Row("dense CRF peer", "pydensecrf2", shape, t_crf, t_torch / t_crf, None, {"iterations": 5}))
    return rows


def quality_rows(photos: list) -> list[Row]:
    shape = f"{len(photos)} voc_mini photos"
    before = mean_iou(photos, [p[2] > 0.5 for p in photos])
    rows = [Row("coarse masks", "before", shape, 0.0, None, None, {"mean IoU": f"{before:.3f}"})]
    for name, p in PRESETS.items():
        t0 = time.perf_counter()
        after = mean_iou(photos, refine(photos, preset=name))
        rows.append(Row("refined", f"preset {name}", shape, (time.perf_counter() - t0) / len(photos), None, None,
                        {"mean IoU": f"{before:.3f} -> {after:.3f} ({after - before:+.3f})",
                         "params": f"{p.sigma_spatial:g}/{p.sigma_luma:g}/{p.sigma_chroma:g} lam {p.lam:g}"}))
    t0 = time.perf_counter()
    crf = [dense_crf(x.numpy(), t.numpy() > 0.5) for _, x, t, _ in photos]
    if all(c is not None for c in crf):
        after = mean_iou(photos, [torch.from_numpy(c) for c in crf])
        rows.append(Row("refined", "dense CRF", shape, (time.perf_counter() - t0) / len(photos), None, None,
                        {"mean IoU": f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"}))
    return rows


def run() -> list[Row]:
    have_data = (VOC_MINI / "JPEGImages").is_dir()
    photos = load_photos(SIZE) if have_data else synthetic_photos()
    rows = speed_rows(photos)
    if have_data:
        rows += quality_rows(load_photos())
    return rows


# Stage 1 scans the space; stage 2 zooms in where stage 1 peaked (its best lam sat on the edge).
SWEEPS = {
    "coarse": {"sigma_spatial": (4, 8, 16), "sigma_luma": (4, 8, 16), "sigma_chroma": (4, 8, 16),
               "lam": (2, 8, 32, 128)},
    "fine": {"sigma_spatial": (4, 6, 8), "sigma_luma": (8, 16), "sigma_chroma": (8, 16),
             "lam": (32, 64, 128, 256, 512)},
}


def sweep(name: str = "coarse", folds: int = 3) -> None:
    """Per-image IoU gain of every setting of SWEEPS[name] over the coarse masks, summarised as
    the mean gain and the worst mean gain over `folds` interleaved folds (robustness)."""
    grid = SWEEPS[name]
    photos = load_photos()
    before = np.array([foreground_iou(p[2] > 0.5, p[3]) for p in photos])
    results = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        gain = np.array([foreground_iou(m, p[3]) for p, m in zip(photos, refine(photos, **params))]) - before
        fold_means = [gain[f::folds].mean() for f in range(folds)]
        results.append((min(fold_means), gain.mean(), float((gain > 0).mean()), values))
    results.sort(reverse=True)
    print(f"coarse masks: mean IoU {before.mean():.4f} over {len(photos)} photos; sweep of {len(results)} settings")
    print(f"{'sigma s/l/c':>14}{'lam':>6}{'mean gain':>11}{'worst fold':>12}{'improved':>10}")
    for worst, mean, improved, (ss, sl, sc, lam) in results[:25]:
        print(f"{f'{ss}/{sl}/{sc}':>14}{lam:>6}{mean:>+11.4f}{worst:>+12.4f}{100 * improved:>9.0f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", choices=sorted(SWEEPS), help="run a parameter sweep instead")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.sweep)
    else:
        print_table(run(), "bilateral_solve")
