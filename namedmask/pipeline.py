"""`namedmask run`: the whole pipeline in one run directory, stage after stage

    archive/   (A) CLIP category archives            build_archive
    saliency/  (B) DINO pseudo-masks + refinement    run_saliency
    refined/   (C) category experts (optional)       refine_with_experts
    train/     (D) the final DeepLabv3+              train
    eval/      (E) mIoU on the evaluation set        evaluate_checkpoint
    predict/       overlays on a few images          predict
    index.html     the report

Every stage is resumable by itself; on top of that a stage whose settings have not changed
since it last finished is skipped outright (<run>/.stages/<stage>.json records them)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from namedmask import io
from namedmask.config import ExpertsConfig, TrainConfig, from_dict, to_dict
from namedmask.data.archive import load_archive
from namedmask.data.pseudo_masks import load_manifest
from namedmask.data.synthetic import write_dataset
from namedmask.errors import NamedMaskError
from namedmask.report import build_report, iou_bar_chart
from namedmask.stages.archive import ArchiveConfig, build_archive
from namedmask.stages.evaluate import evaluate_checkpoint, write_report
from namedmask.stages.experts import refine_with_experts
from namedmask.stages.predict import predict
from namedmask.stages.saliency import SaliencyConfig, run_saliency
from namedmask.stages.saliency import write_report as write_mask_report
from namedmask.stages.train import train

log = logging.getLogger(__name__)

STAGES = ("archive", "saliency", "refine", "train", "eval", "predict")
RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: this run uses untrained CLIP/DINO models because no pretrained weights "
                          "were given. It proves the machinery, NOT segmentation quality. Pass real weights "
                          "(see the configs in namedmask/configs/) for meaningful archives, masks and mIoU.")


class PipelineError(NamedMaskError, RuntimeError):
    """A run configuration that cannot work; the message says which key to fix."""


@dataclass
class RunConfig:
    out: str = "runs/demo"
    demo: bool = False                 # generate the built-in textured-shapes dataset into <out>/data
    pool: str | None = None            # unlabelled images to retrieve from (folder, list file, ImageNet root)
    categories: str = "voc"            # category set name or names file
    eval_dataset: str | None = None    # folder | voc | coco-object | coca | cityscapes-object | imagenet-s
    eval_root: str | None = None
    eval_split: str = "val"
    predict_images: list = field(default_factory=list)  # files or folders
    stages: list = field(default_factory=lambda: list(STAGES))
    archive: dict = field(default_factory=dict)    # ArchiveConfig fields
    saliency: dict = field(default_factory=dict)   # SaliencyConfig fields
    refine: dict = field(default_factory=lambda: {"method": "none"})  # method: none | experts (+ ExpertsConfig)
    train: dict = field(default_factory=dict)      # TrainConfig fields (nested)
    eval: dict = field(default_factory=dict)       # evaluate_checkpoint options
    predict: dict = field(default_factory=dict)    # predict options


def builtin_configs() -> list:
    return sorted(p.name[:-5] for p in resources.files("namedmask.configs").iterdir() if p.name.endswith(".yaml"))


def load_run_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """A YAML file, or a built-in config by name (demo, voc, coco-object, coca,
    cityscapes-object; None = demo); then `overrides`. `$VAR` in string values is taken
    from the environment (an unset variable is an error naming it)."""
    if path is None or (not Path(path).exists() and str(path) in builtin_configs()):
        name = path or "demo"
        text = resources.files("namedmask.configs").joinpath(f"{name}.yaml").read_text()
        where = f"built-in config {name!r}"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PipelineError(f"{path}: cannot read the run config ({exc})") from exc
        where = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{where}: not valid YAML ({exc})") from exc
    data.update(overrides or {})
    data = _expand_env(data, where)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    cfg = RunConfig(**data)
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise PipelineError(f"{where}: unknown stage(s) {bad}; stages are {list(STAGES)}")
    return cfg


def _expand_env(value, where: str):
    if isinstance(value, dict):
        return {k: _expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    if isinstance(value, str) and "$" in value:
        expanded = os.path.expandvars(value)
        missing = re.findall(r"\$\{?(\w+)", expanded)
        if missing:
            raise PipelineError(f"{where}: environment variable {missing[0]} is not set (used in {value!r})")
        return expanded
    return value


class _Stages:
    """Runs a stage unless it finished before with the same settings."""

    def __init__(self, run: Path):
        self.folder = run / ".stages"
        self.ran: list = []
        self.skipped: list = []

    def run(self, name: str, settings: dict, fn, output: Path):
        """`output` is the stage's main product; if it is gone the stage runs again."""
        marker = self.folder / f"{name}.json"
        key = io.fingerprint(settings)
        if output.exists() and marker.exists() and json.loads(marker.read_text()).get("fingerprint") == key:
            log.info("[%s] already done with these settings; skipping", name)
            self.skipped.append(name)
            return
        log.info("[%s] running", name)
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        io.write_json(marker, {"fingerprint": key, "settings": settings, "seconds": round(seconds, 2)})
        log.info("[%s] done in %.1f s", name, seconds)
        self.ran.append(name)


def _only_known(cls, values: dict, section: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PipelineError(f"run config section {section!r}: unknown key(s) {unknown}; valid: {sorted(names)}")
    return values


def run_pipeline(cfg: RunConfig, progress: bool = True) -> Path:
    """Runs the configured stages into cfg.out; returns the path of the report (index.html)."""
    run = Path(cfg.out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if cfg.demo:
        data = write_dataset(run / "data")
        cfg = dataclasses.replace(
            cfg, pool=cfg.pool or str(data / "pool"), categories=str(data / "categories.txt"),
            eval_dataset=cfg.eval_dataset or "folder", eval_root=cfg.eval_root or str(data / "eval"),
            predict_images=cfg.predict_images or [str(p) for p in sorted((data / "eval" / "images").glob("*.jpg"))[:3]])
    io.write_text(run / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    warnings = _weight_warnings(cfg)
    for w in warnings:
        log.warning("\n%s\n%s\n%s", "!" * 100, w, "!" * 100)
    stages = _Stages(run)
    archive_json = run / "archive" / "archive.json"
    masks = run / "saliency"

    if "archive" in cfg.stages:
        if not cfg.pool:
            raise PipelineError("set 'pool' (a folder or list file of unlabelled images) in the run config")
        acfg = ArchiveConfig(pool=cfg.pool, categories=cfg.categories, out=str(run / "archive"),
                             **_only_known(ArchiveConfig, {"report": True, **cfg.archive}, "archive"))
        stages.run("archive", dataclasses.asdict(acfg), lambda: build_archive(acfg, progress=progress),
                   archive_json)

    if "saliency" in cfg.stages:
        scfg = SaliencyConfig(archive=str(archive_json), out=str(masks),
                              **_only_known(SaliencyConfig, {"report": True, **cfg.saliency}, "saliency"))
        stages.run("saliency", dataclasses.asdict(scfg), lambda: run_saliency(scfg), masks / "manifest.json")

    method = cfg.refine.get("method", "none")
    if "refine" in cfg.stages and method == "experts":
        ecfg = from_dict(ExpertsConfig, {k: v for k, v in cfg.refine.items() if k != "method"})
        refined = run / "refined"

        def refine():
            refine_with_experts(archive_json, masks, refined, ecfg, progress=progress)
            _mask_report(archive_json, refined)

        stages.run("refine", {"method": method, **to_dict(ecfg)}, refine, refined / "manifest.json")
        masks = refined
    elif method not in ("none", "experts"):
        raise PipelineError(f"refine.method must be 'none' or 'experts', got {method!r}")

    train_dir = run / "train"
    if "train" in cfg.stages:
        tcfg = from_dict(TrainConfig, {**cfg.train, "archive": str(archive_json), "masks": str(masks),
                                       "out": str(train_dir)})
        stages.run("train", to_dict(tcfg), lambda: train(tcfg, progress=progress), train_dir / "model.safetensors")

    if "eval" in cfg.stages and cfg.eval_dataset:
        options = {"split": cfg.eval_split, **cfg.eval}

        def evaluate():
            report = evaluate_checkpoint(train_dir, cfg.eval_dataset, cfg.eval_root, overlays_dir=run / "eval",
                                         progress=progress, **options)
            write_report(report, run / "eval" / "metrics.json")
            iou_bar_chart(run / "eval" / "metrics.json", run / "eval" / "per_class_iou.png")
            log.info("mIoU %.2f on %s (%d images)", 100 * report.metrics.miou, cfg.eval_dataset, report.num_images)

        stages.run("eval", {"dataset": cfg.eval_dataset, "root": cfg.eval_root, **options,
                            "model": _fingerprint_file(train_dir / "model.safetensors")}, evaluate,
                   run / "eval" / "metrics.json")

    if "predict" in cfg.stages and cfg.predict_images:
        stages.run("predict", {"images": cfg.predict_images, **cfg.predict,
                               "model": _fingerprint_file(train_dir / "model.safetensors")},
                   lambda: predict(train_dir, cfg.predict_images, run / "predict", progress=progress, **cfg.predict),
                   run / "predict" / "labels")

    facts = {"run directory": run, "stages run now": ", ".join(stages.ran) or "none (all done before)",
             "stages skipped (already done)": ", ".join(stages.skipped) or "none"}
    metrics = run / "eval" / "metrics.json"
    if metrics.exists():
        facts["mIoU"] = f"{100 * json.loads(metrics.read_text())['miou']:.2f}"
    return build_report(run, title=f"namedmask run: {run.name}", warnings=warnings, facts=facts)


def _fingerprint_file(path: Path) -> str | None:
    """Content hash of a stage output, so later stages rerun when it changes."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _mask_report(archive_json: Path, folder: Path) -> None:

    write_mask_report(folder, load_archive(archive_json), load_manifest(folder))


def _weight_warnings(cfg: RunConfig) -> list:
    random_clip = str(cfg.archive.get("pretrained", "")) == "random" or (
        cfg.archive.get("model") == "nm-tiny" and not cfg.archive.get("pretrained"))
    random_dino = bool(cfg.saliency.get("random_weights"))
    return [RANDOM_WEIGHTS_WARNING] if (random_clip or random_dino) and {"archive", "saliency"} & set(cfg.stages) else []
