"""What the commands do with their typed configs, where it is more than one stage call: which
model `eval` and `predict` use (a trained run, zero-shot dense CLIP, or regions named by CLIP),
and which run config `run`/`weights` load for your photos. cli.py parses options into the configs
of config.py and calls these; options that do not go together are OptionErrors (usage errors).
Imports stay inside the functions: `weights` and `--help` answer without loading torch."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from namedmask.config import (DEFAULT_DINO, EvalCommandConfig, OptionError, PredictCommandConfig, PredictConfig,
                              TwoStageConfig, ZeroShotConfig, project)

log = logging.getLogger("namedmask")


def zero_shot_settings(values: dict, *, preset: str | None, checkpoint, text) -> dict | None:
    """zero_shot_segmenter's keyword arguments when --model asks for zero-shot dense CLIP, else
    None (a preset fills what the options leave empty; checked as ZeroShotConfig before any work)."""
    from namedmask.models.maskclip import apply_preset

    if preset is not None and preset != "maskclip":
        raise OptionError(f"--preset {preset} belongs to --proposals segmenter, not to dense zero-shot CLIP")
    if values.get("model") is None:
        if preset is not None:
            raise OptionError("--preset maskclip is zero-shot dense CLIP: give --model (and --pretrained)")
        return None
    if checkpoint is not None:
        raise OptionError("give --checkpoint (a trained run) or --model (zero-shot dense CLIP), not both")
    if not text:
        raise OptionError("zero-shot dense CLIP needs class names: --text \"a, b|synonym\" (predict) "
                          "or --zero-shot --dataset (eval)")
    names = {f.name for f in dataclasses.fields(ZeroShotConfig)}
    settings = apply_preset({k: values.get(k) for k in names}, preset)
    settings = {k: v for k, v in settings.items() if v is not None}
    return dataclasses.asdict(ZeroShotConfig(**settings))


def _path(value) -> Path | None:
    return None if value is None else Path(value)


def _check_out_file(path: str) -> None:
    from namedmask import io

    if Path(path).is_dir():
        raise OptionError(f"--out {path} is a folder; give a file name")
    io.check_writable_dir(Path(path).parent if str(Path(path).parent) else Path("."))


def evaluate(cfg: EvalCommandConfig, values: dict) -> list:
    """`namedmask eval`: the lines to print (a metrics table); the JSON goes to cfg.out."""
    from namedmask.evaluation import write_report

    if cfg.discover is not None:
        return evaluate_discovered(cfg)
    if cfg.out is not None:  # before the work: a table printed, then its JSON lost, helps nobody
        _check_out_file(cfg.out)
    if cfg.zero_shot and values.get("model") is None:
        raise OptionError("--zero-shot needs --model (an open_clip model name) and usually --pretrained")
    zs = zero_shot_settings(values, preset=cfg.preset, checkpoint=cfg.checkpoint,
                            text=cfg.text or ("dataset" if cfg.zero_shot else None))
    if cfg.checkpoint is not None or zs is not None:
        report = _evaluate_model(cfg, zs)
    else:
        report = _evaluate_files(cfg)
    lines = [report.table()]
    if cfg.out:
        write_report(report, Path(cfg.out))
        lines.append(f"metrics written to {cfg.out}")
    return lines


def _evaluate_model(cfg: EvalCommandConfig, zs: dict | None):
    from namedmask.stages.evaluate import evaluate_checkpoint, evaluate_open

    if cfg.dataset is None or cfg.root is None:
        raise OptionError("--checkpoint / --zero-shot need --dataset and --root")
    common = dict(split=cfg.split, device=cfg.device, max_images=cfg.max_images, overlays_dir=_path(cfg.overlays),
                  backend=cfg.backend, ignore_unmapped=cfg.ignore_unmapped)
    if zs is not None or cfg.text or cfg.text_classes:
        return evaluate_open(cfg.dataset, Path(cfg.root), run_dir=_path(cfg.checkpoint), zero_shot=zs, text=cfg.text,
                             class_set=cfg.text_classes, **common)
    return evaluate_checkpoint(_path(cfg.checkpoint), cfg.dataset, Path(cfg.root), num_overlays=cfg.num_overlays, **common)


def _evaluate_files(cfg: EvalCommandConfig):
    from namedmask.data.categories import get_category_set
    from namedmask.stages.evaluate import evaluate_label_maps

    if cfg.pred is None or cfg.gt is None:
        raise OptionError("give --pred and --gt folders of index PNGs, or --checkpoint with --dataset/--root")
    names = list(get_category_set(cfg.class_names).names) if cfg.class_names else None
    gt_set = get_category_set(cfg.gt_classes) if cfg.gt_classes else None
    num_classes = cfg.num_classes or (len(names) if names else None)
    if num_classes is None:
        raise OptionError("give --num-classes (or --class-names to infer it)")
    return evaluate_label_maps(Path(cfg.pred), Path(cfg.gt), num_classes, cfg.ignore_index, cfg.skip_bad, names, cfg.backend,
                               gt_class_names=gt_set and list(gt_set.names),
                               gt_words=gt_set and {n: gt_set.prompt_words(n) for n in gt_set.names},
                               ignore_unmapped=cfg.ignore_unmapped)


def evaluate_discovered(cfg: EvalCommandConfig) -> list:
    """`eval --discover DIR`: the zero-guidance paper's metrics of a discover folder."""
    from namedmask import io
    from namedmask.data.categories import get_category_set
    from namedmask.data.datasets import open_dataset
    from namedmask.errors import NamedMaskError
    from namedmask.stages.discover_eval import evaluate_discovered as score

    if cfg.dataset is None or cfg.root is None:
        raise OptionError("--discover needs --dataset (voc, folder, ...) and --root")
    if cfg.out is not None:
        _check_out_file(cfg.out)
    labeled = open_dataset(cfg.dataset, Path(cfg.root), cfg.split)
    names = None
    if cfg.class_names:
        cs = get_category_set(cfg.class_names)
        names = [cs.prompt_name(n) for n in cs.names]
    elif labeled.class_names:
        try:  # the official prompt words of a built-in set (VOC: "dining table", ...)
            cs = get_category_set(cfg.dataset)
            names = [cs.prompt_name(n) for n in labeled.class_names]
        except NamedMaskError:
            names = list(labeled.class_names)
    result = score(Path(cfg.discover), labeled, class_names=names, mode=cfg.discover_mode, sentence_model=cfg.sentence_model,
                   text_threshold=cfg.text_threshold, clip_threshold=cfg.clip_threshold, max_images=cfg.max_images)
    lines = [f"zero-guidance evaluation of {cfg.discover} ({result['images']} images, mode {cfg.discover_mode}, "
             f"{result['matching']} >= {result['threshold']}):"]
    lines += [f"  {key:14s} {result[key]:.4f}"
              for key in ("iou_union", "iou_argmax", "recall_union", "recall_argmax", "recall_allseg")]
    if cfg.out:
        io.write_json(Path(cfg.out), result)
        lines.append(f"metrics written to {cfg.out}")
    return lines


def _two_stage(cfg: PredictCommandConfig, values: dict) -> TwoStageConfig:
    """predict --proposals: the region source and CLIP naming, from the options given."""
    from namedmask.models.mask_prompts import OVSEG_INFERENCE

    if values.get("model") is None:
        raise OptionError("--proposals names regions with CLIP: give --model (and --pretrained)")
    if any(values.get(k) is not None for k in ("short_side", "recipe")) or values.get("refine") not in (None, "none") \
            or values.get("smooth") not in (None, "none") or cfg.preset == "maskclip":
        raise OptionError("--short-side, --refine, --smooth, --recipe and --preset maskclip belong to dense zero-shot "
                          "CLIP, not to --proposals")
    ovseg = OVSEG_INFERENCE if cfg.preset == "ovseg" else {}
    if ovseg and values.get("threshold") is not None:
        raise OptionError("--preset ovseg names every proposed region among the --text classes (OVSeg has "
                          "no background choice for a region): drop --background-threshold")
    names = {f.name for f in dataclasses.fields(TwoStageConfig)}
    given = {k: v for k, v in values.items() if k in names and v is not None}
    return TwoStageConfig(**{"templates": ovseg.get("templates", "namedmask"), "ensemble": ovseg.get("ensemble"),
                             "dino": DEFAULT_DINO, **given, "proposals": cfg.proposals})


def predict(cfg: PredictCommandConfig, images, values: dict) -> list:
    """`namedmask predict`: the label maps written (with a trained run, zero-shot dense CLIP, or
    --proposals regions named by CLIP)."""
    from namedmask.stages.predict import predict as run

    if cfg.preset == "ovseg" and cfg.proposals != "segmenter":
        raise OptionError("--preset ovseg is OVSeg's inference on a segmenter's regions: add --proposals "
                          "segmenter (with --checkpoint RUN)")
    two = zs = None
    if cfg.proposals:
        two = _two_stage(cfg, values)
    else:
        if values.get("mask_prompts") or values.get("random_dino") or values.get("embed") not in (None, "crop"):
            raise OptionError("--embed, --mask-prompts and --random-dino go with --proposals")
        zs = zero_shot_settings(values, preset=cfg.preset, checkpoint=cfg.checkpoint, text=cfg.text)
        if cfg.checkpoint is None and zs is None:
            raise OptionError("give --checkpoint RUN, or --text with --model (zero-shot dense CLIP)")
    extra = {"categories": cfg.categories} if cfg.categories else {}
    return run(_path(cfg.checkpoint), images, Path(cfg.out), text=cfg.text, zero_shot=zs, proposals=two, **extra,
               **dataclasses.asdict(project(cfg, PredictConfig)))


def default_preset() -> str:
    """gpu when `nvidia-smi -L` lists a GPU, else cpu (no torch import: `weights` stays fast)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return "gpu" if "GPU" in listed else "cpu"


def run_config_source(config, pool, categories, preset, out, values: dict):
    """The config `run` loads for --pool/--categories/--preset (their values go into `values`)."""
    if preset and config:
        raise OptionError("give --preset or --config, not both (a preset is a built-in config)")
    if pool is None and preset is None:
        if categories:
            values["categories"] = categories
        return config
    if config is None:
        if pool is None:
            raise OptionError("--preset trains on your photos: give --pool DIR and --categories \"a, b|synonym\"")
        if not categories:
            raise OptionError('--pool needs --categories, e.g. --categories "dog, cat|kitten, traffic light"')
        if not out and "out" not in values:
            raise OptionError("--pool needs --out DIR (the run folder)")
        if preset is None:
            preset = default_preset()
            log.info("preset %s (%s); choose with --preset cpu|gpu|paper", preset,
                     "a GPU is present" if preset == "gpu" else "no GPU")
        config = preset
        # your photos, named: every pool photo is predicted; no labelled evaluation set
        values.setdefault("predict_images", [str(pool)])
    if pool is not None:
        values["pool"] = str(pool)
    if categories:
        values["categories"] = categories
    return config


def run(config, pool, categories, preset, out, stages, overrides) -> Path:
    """`namedmask run`: the whole pipeline; returns the report's path."""
    from namedmask.config import RunConfig, load_config, parse_overrides

    values = parse_overrides(overrides)
    config = run_config_source(config, pool, categories, preset, out, values)
    if out:
        values["out"] = out
    if stages:
        values["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    if pool is not None:  # your photos: a missing weights file is one line at once, before the stages load
        from namedmask.models.weights import check_run

        cfg = load_config(RunConfig, config, values)
        check_run(cfg, Path(cfg.out))
    from namedmask.pipeline import load_run_config, run_pipeline

    return run_pipeline(load_run_config(config, values))


def weights(preset, config, overrides) -> tuple[list, bool]:
    """`namedmask weights`: (a line per pretrained model the run needs, whether one required is missing)."""
    import os

    from namedmask.config import RunConfig, load_config, parse_overrides
    from namedmask.models.weights import run_weights

    if preset and config:
        raise OptionError("give --preset or --config, not both")
    values = parse_overrides(overrides)
    for key in ("pool", "eval_root"):  # a dataset config's $IMAGENET_TRAIN / $VOC_ROOT: not needed to list weights
        values.setdefault(key, ".")
    # no torch, open_clip or timm imports for the presets' models: this answers in about a second
    cfg = load_config(RunConfig, config or preset or default_preset(), values)
    offline = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
        else None
    entries = run_weights(cfg)
    return [w.line(offline) for w in entries], any(not w.ok and w.required for w in entries)
