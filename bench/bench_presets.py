"""How long the `cpu` preset takes on your own photos, from measured pieces (issue 25).

Each stage's unit of work is timed here with random weights at the preset's real shapes (the
speed of a network does not depend on its weights): one pool photo through ViT-B/16 CLIP at 224
px (archive), one through TokenCut on DINO ViT-S/16 at short side 320 plus the bilateral solver
at that size (saliency), one training iteration of the ResNet-18 DeepLabv3+ (output stride 16,
batch 8, 256 px crops; forward, backward, Adam step; the data augmentation runs beside it in the
preset's 2 DataLoader workers and is not counted), and one native-resolution prediction. The estimate multiplies them by the work a run of N photos and C
categories does: N CLIP images, min(N, C*K) saliency masks, `iterations` training steps and N
predictions.

    python -m bench presets                 # the table, with the estimate for 300 photos, 3 categories
    python -m bench.bench_presets --photos 300 --categories 3 --threads 1

Times are CPU seconds of the process (time.process_time), not wall time: on a machine shared
with other jobs they still measure the work; with --threads 1 they are one core's time, so a
machine with n free cores takes about that divided by n (less where a step does not parallelise).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import SHARED_DATA


def _photos(n: int) -> list:
    from namedmask.data.decode import load_image

    paths = sorted((SHARED_DATA / "pool").glob("*.jpg"))[:n]
    if not paths:
        raise SystemExit(f"no photos in {SHARED_DATA / 'pool'}")
    return [load_image(p) for p in paths]


CLOCK = time.process_time   # CPU seconds of this process (all its threads): robust to other jobs' load


def _median_time(fn, items, warmup: int = 1) -> float:
    for x in items[:warmup]:
        fn(x)
    times = []
    for x in items[warmup:]:
        t0 = CLOCK()
        fn(x)
        times.append(CLOCK() - t0)
    return float(np.median(times))


def measure(preset: str = "cpu", photos: int = 6) -> dict:
    """Seconds per unit of each stage of `preset` (random weights, real shapes, real photos)."""
    from namedmask.config import SaliencyConfig
    from namedmask.data.decode import Resize, resize_crop
    from namedmask.models.clip import load_clip
    from namedmask.models.deeplab import build_model
    from namedmask.models.inference import predict_label
    from namedmask.pipeline import load_run_config
    from namedmask.stages import saliency as sal

    cfg = load_run_config(preset, {"pool": "."})
    images = _photos(photos)
    out = {}

    clip = load_clip(cfg.archive.model, "random", "cpu")
    resize = Resize(clip.image_size, clip.image_size)
    out["archive s/photo"] = _median_time(lambda im: clip.encode_images(resize_crop(im, resize)[None]), images)

    scfg = sal.resolve_config(SaliencyConfig(**{**cfg.saliency.__dict__, "random_weights": True, "device": "cpu",
                                               "archive": ".", "out": "."}))
    model, refine = sal.build_model(scfg), sal.bilateral_refiner(scfg.refine)
    out["saliency s/photo"] = _median_time(
        lambda im: list(sal._predict_batch(model, refine, ["x"], [im], "cpu")), images)

    t = cfg.train
    net = build_model(t.model, 4).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(t.batch_size, 3, t.augment.crop_size, t.augment.crop_size, generator=g)
    labels = torch.randint(0, 4, (t.batch_size, t.augment.crop_size, t.augment.crop_size), generator=g)

    def step(_):
        loss = torch.nn.functional.cross_entropy(net(batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["train s/iteration"] = _median_time(step, list(range(4)))
    net.eval()
    out["predict s/photo"] = _median_time(lambda im: predict_label(net, im, "cpu"), images)
    out["iterations"] = t.iterations
    out["k"] = cfg.archive.k
    return out


def estimate(units: dict, photos: int, categories: int) -> dict:
    """Seconds per stage for `photos` photos and `categories` categories."""
    masks = min(photos, categories * units["k"])
    return {"archive": units["archive s/photo"] * photos, "saliency": units["saliency s/photo"] * masks,
            "train": units["train s/iteration"] * units["iterations"], "predict": units["predict s/photo"] * photos}


def run(photos: int = 300, categories: int = 3) -> list:
    from namedmask.runtime import format_duration

    units = measure("cpu")
    est = estimate(units, photos, categories)
    rows = [{"name": f"cpu preset: {k}", "seconds": round(v, 4)} for k, v in units.items() if "s/" in k]
    rows += [{"name": f"cpu preset, {photos} photos x {categories} categories: {k}", "seconds": round(v, 1),
              "human": format_duration(v)} for k, v in est.items()]
    total = sum(est.values())
    rows.append({"name": f"cpu preset, {photos} photos x {categories} categories: total", "seconds": round(total, 1),
                 "human": format_duration(total), "threads": torch.get_num_threads()})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bench_presets")
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--categories", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--wall", action="store_true",
                        help="wall-clock seconds instead of CPU seconds (only meaningful on an idle machine)")
    args = parser.parse_args()
    if args.wall:
        CLOCK = time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in run(args.photos, args.categories):
        print(row)
