"""Quality on the toy world (namedmask.data.toyworld): does NamedMask segment and name objects
when its foundation models know something? Builds (or reuses) `namedmask toy-world` for a seed,
runs the pipeline of its run.yaml, and scores every stage against ground truth and trivial
baselines:

- tiny-CLIP zero-shot accuracy on the held-out single-object set (chance 1/8);
- archive precision@K (pool masks; chance = how often a category is in a random pool image);
- saliency foreground IoU on the archive images: trained tiny DINO, random weights, the tiny
  CLIP's image tower, a centred box; raw and after the bilateral solver (namedmask, tuned);
- pseudo-mask IoU after the experts vs before;
- final mIoU on the held-out single-, multi-object and all sets, with and without copy-paste,
  beside the all-background mIoU.

Environment: NAMEDMASK_TOY_OUT (default runs/toy), NAMEDMASK_TOY_SEED (default 0),
NAMEDMASK_QUALITY_ABLATION=0 to skip the second (no copy-paste) training. Nothing is tuned on
the eval sets; run another seed to check."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from bench.common import Row

REPO = Path(__file__).resolve().parents[1]


def _row(metric: str, variant: str, split: str, value: float, seconds: float = 0.0, **extra) -> Row:
    return Row(f"quality {metric}", variant, split, seconds, None, None,
               {"value": f"{value:.3f}", **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in extra.items()}})


def run() -> list:
    import torch
    import yaml

    from namedmask.stages.pipeline import load_run_config, run_pipeline
    from namedmask.toy import ToyWorldConfig, build_toy_world, saliency_settings
    from namedmask.toy import quality as q

    torch.set_num_threads(2)
    out = Path(os.environ.get("NAMEDMASK_TOY_OUT", REPO / "runs" / "toy"))
    seed = int(os.environ.get("NAMEDMASK_TOY_SEED", "0"))
    rows = []
    t0 = time.perf_counter()
    root = build_toy_world(ToyWorldConfig(str(out), seed))
    world = root / "world"
    rows.append(_row("toy-world build", f"seed {seed}", "world + CLIP + DINO (cached)", 0.0,
                     time.perf_counter() - t0))

    t0 = time.perf_counter()
    acc = q.zero_shot_accuracy("nm-toy", str(root / "clip" / "nm-toy.pt"), world / "eval" / "single")
    rows.append(_row("zero-shot acc", "tiny CLIP", "eval/single", acc, time.perf_counter() - t0,
                     chance=1 / 8, target=0.8))

    bench_dir = root / "bench"
    cfg = yaml.safe_load((root / "run.yaml").read_text())
    cfg.update(out=str(bench_dir / "main"), predict_images=[])
    t0 = time.perf_counter()
    run_pipeline(load_run_config(None, cfg), progress=False)
    main = bench_dir / "main"
    rows.append(_row("pipeline", "run.yaml", "archive..eval", 0.0, time.perf_counter() - t0))

    prec = q.archive_precision(main / "archive" / "archive.json", world)
    rows.append(_row("archive precision@K", "tiny CLIP", f"pool, K={cfg['archive']['k']}",
                     sum(prec.values()) / len(prec), chance=q.chance_precision(world), target=0.8,
                     per_category=", ".join(f"{k} {v:.2f}" for k, v in prec.items())))

    # Saliency backbones on the same archive images, unrefined, then refined two ways.
    from namedmask.stages.saliency import SaliencyConfig, run_saliency

    archive_json = str(main / "archive" / "archive.json")
    variants = {"trained tiny DINO": saliency_settings(root, "dino"),
                "random-weight DINO": {**saliency_settings(root, "dino"), "dino_weights": None,
                                       "random_weights": True},
                "tiny CLIP image tower": saliency_settings(root, "clip_tower")}
    for name, settings in variants.items():
        folder = bench_dir / "saliency" / name.replace(" ", "_")
        t0 = time.perf_counter()
        run_saliency(SaliencyConfig(archive=archive_json, out=str(folder), refine="none", short_side=96,
                                    batch_size=16, **settings))
        seconds = time.perf_counter() - t0
        rows.append(_row("saliency fg IoU", name, "archive imgs, raw", q.mask_iou(folder, world), seconds))
        for preset in ("namedmask", "tuned"):
            rows.append(_row("saliency fg IoU", name, f"archive imgs, bilateral {preset}",
                             q.mask_iou(folder, world, q.bilateral(preset)), target=0.5))
    rows.append(_row("saliency fg IoU", "centred box (60% side)", "archive imgs",
                     q.box_iou(main / "saliency", world)))

    before, after = q.mask_iou(main / "saliency", world), q.mask_iou(main / "refined", world)
    rows.append(_row("pseudo-mask IoU", "saliency (pipeline)", "archive imgs", before))
    rows.append(_row("pseudo-mask IoU", "after experts", "archive imgs", after))

    # Final segmenter with and without copy-paste, on the held-out sets.
    from namedmask.config import TrainConfig, from_dict
    from namedmask.stages.evaluate import evaluate_checkpoint
    from namedmask.stages.train import train

    runs = {"with copy-paste": main / "train"}
    tcfg = from_dict(TrainConfig, {**cfg["train"], "archive": archive_json, "masks": str(main / "refined"),
                                   "out": str(bench_dir / "no_copy_paste")})
    tcfg = dataclasses.replace(tcfg, copy_paste=dataclasses.replace(tcfg.copy_paste, p=0.0))
    t0 = time.perf_counter()
    if os.environ.get("NAMEDMASK_QUALITY_ABLATION", "1") != "0":
        train(tcfg, progress=False)
        runs["without copy-paste"] = bench_dir / "no_copy_paste"
    train_seconds = time.perf_counter() - t0
    for split, target in (("single", 0.5), ("multi", 0.4), ("all", None)):
        folder = world / "eval" / split
        for name, run_dir in runs.items():
            report = evaluate_checkpoint(run_dir, "folder", folder, progress=False)
            extra = {"all-background": q.all_background_miou(folder)}
            if target:
                extra["target"] = target
            rows.append(_row("final mIoU", name, f"eval/{split}", report.metrics.miou,
                             train_seconds if name.startswith("without") and split == "single" else 0.0, **extra))
    return rows
