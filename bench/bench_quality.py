"""Quality on the toy world (namedmask.toy.world): does NamedMask segment and name objects
when its foundation models know something? Builds (or reuses) `namedmask toy-world` for a seed,
runs the pipeline of its run.yaml, and scores every stage against ground truth and trivial
baselines:

- tiny-CLIP zero-shot accuracy on the held-out single-object set (chance 1/8);
- archive precision@K (pool masks; chance = how often a category is in a random pool image);
- saliency foreground IoU on the archive images: trained tiny DINO, random weights, the tiny
  CLIP's image tower, a centred box; raw and after the bilateral solver (namedmask, tuned);
- pseudo-mask IoU after the experts vs before;
- final mIoU on the held-out single-, multi-object and all sets, with and without copy-paste
  (the paper's ablation: both trainings from the same archive and masks, same seed and schedule,
  only train.copy_paste.p differs), beside the all-background mIoU. The table is written to
  <run>/ablations/copy_paste.json, which the run's report (index.html) shows.

Environment: NAMEDMASK_TOY_OUT (default runs/toy), NAMEDMASK_TOY_SEED (default 0),
NAMEDMASK_QUALITY_ONLY=copy-paste to run only the pipeline and the ablation,
NAMEDMASK_QUALITY_ITERATIONS=N to train both segmenters N iterations instead of run.yaml's,
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

    from namedmask.pipeline import load_run_config, run_pipeline
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
    if os.environ.get("NAMEDMASK_QUALITY_ITERATIONS"):
        cfg["train"]["iterations"] = int(os.environ["NAMEDMASK_QUALITY_ITERATIONS"])
    t0 = time.perf_counter()
    run_pipeline(load_run_config(None, cfg), progress=False)
    main = bench_dir / "main"
    rows.append(_row("pipeline", "run.yaml", "archive..eval", 0.0, time.perf_counter() - t0))
    if os.environ.get("NAMEDMASK_QUALITY_ONLY") == "copy-paste":
        return rows + copy_paste_ablation(world, cfg, main, bench_dir)

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

    return rows + copy_paste_ablation(world, cfg, main, bench_dir)


def copy_paste_ablation(world: Path, cfg: dict, main: Path, bench_dir: Path) -> list:
    """Final mIoU with (the pipeline's own training) and without copy-paste (a second training
    from the same archive and masks, only train.copy_paste.p = 0) on eval/single, multi, all;
    writes <main>/ablations/copy_paste.json and refreshes the run's report."""
    from namedmask import io
    from namedmask.config import TrainConfig, from_dict
    from namedmask.report import build_report
    from namedmask.stages.evaluate import evaluate_checkpoint
    from namedmask.training import train
    from namedmask.toy import quality as q

    masks = main / "refined" if (main / "refined" / "manifest.json").exists() else main / "saliency"
    with_cp = from_dict(TrainConfig, {**cfg["train"], "archive": str(main / "archive" / "archive.json"),
                                      "masks": str(masks), "out": str(main / "train")})
    runs = {f"with copy-paste (p={with_cp.copy_paste.p})": main / "train"}
    seconds = {}
    if os.environ.get("NAMEDMASK_QUALITY_ABLATION", "1") != "0":
        tcfg = dataclasses.replace(with_cp, out=str(bench_dir / "no_copy_paste"),
                                   copy_paste=dataclasses.replace(with_cp.copy_paste, p=0.0))
        t0 = time.perf_counter()
        train(tcfg, progress=False)
        seconds["without copy-paste (p=0.0)"] = time.perf_counter() - t0
        runs = {"without copy-paste (p=0.0)": bench_dir / "no_copy_paste", **runs}
    rows, table = [], {name: [] for name in runs}
    splits = [s for s in ("single", "multi", "all") if (world / "eval" / s).is_dir()]
    background = []
    for split in splits:
        folder = world / "eval" / split
        background.append(q.all_background_miou(folder))
        for name, run_dir in runs.items():
            t0 = time.perf_counter()
            miou = evaluate_checkpoint(run_dir, "folder", folder, progress=False).metrics.miou
            table[name].append(miou)
            extra = {"all-background": background[-1], **({"target": {"single": 0.5, "multi": 0.4}[split]}
                                                         if split in ("single", "multi") else {})}
            rows.append(_row("final mIoU", name, f"eval/{split}", miou, time.perf_counter() - t0, **extra))
    io.write_json(main / "ablations" / "copy_paste.json", {
        "title": "Copy-paste augmentation (final segmenter)",
        "metric": "mIoU",
        "columns": [f"eval/{s}" for s in splits],
        "rows": [{"name": name, "values": [round(v, 3) for v in vals]} for name, vals in table.items()]
        + [{"name": "all-background", "values": [round(v, 3) for v in background]}],
        "reference": [{"name": "paper, ImageNet-S300 single/multi/all, without copy-paste", "values": [0.670, 0.505, 0.566]},
                      {"name": "paper, ImageNet-S300, with copy-paste", "values": [0.680, 0.536, 0.587]}],
        "notes": (f"Both trainings: {with_cp.iterations} iterations, batch {with_cp.batch_size}, seed "
                  f"{with_cp.seed}, the same archive and pseudo-masks ({masks.name}/); only "
                  "train.copy_paste.p differs. Evaluated on the toy world's held-out sets."),
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
    })
    build_report(main, title=f"namedmask run: {main.name}")
    return rows
