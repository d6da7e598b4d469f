"""`namedmask run`: the whole pipeline in one run directory, stage after stage

    archive/   (A) CLIP category archives            build_archive
    saliency/  (B) DINO pseudo-masks + refinement    run_saliency
    refined/   (C) category experts (experts.enabled) refine_with_experts
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
import threading
import time
from pathlib import Path

from namedmask import io
from namedmask.config import STAGES, ConfigError, RunConfig, builtin_configs, dump_yaml, load_config, to_dict  # noqa: F401
from namedmask.data.archive import load_archive
from namedmask.data.pseudo_masks import load_manifest
from namedmask.data.synthetic import write_dataset
from namedmask.errors import BadInputError, OutputStateError
from namedmask.models.provenance import describe as describe_provenance
from namedmask.report import build_report, iou_bar_chart
from namedmask.runtime import configure_threads
from namedmask.stages.archive import build_archive
from namedmask.evaluation import write_report
from namedmask.stages.evaluate import evaluate_checkpoint
from namedmask.stages.experts import refine_with_experts
from namedmask.stages.predict import predict
from namedmask.stages.saliency import run_saliency
from namedmask.stages.saliency import write_report as write_mask_report
from namedmask.training import train

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: this run uses untrained CLIP/DINO models because no pretrained weights "
                          "were given. It proves the machinery, NOT segmentation quality. Pass real weights "
                          "(see the configs in namedmask/configs/) for meaningful archives, masks and mIoU.")


class PipelineError(OutputStateError):
    """A run configuration that cannot work; the message says which key to fix."""


def load_run_config(path: str | Path | None = None, overrides: dict | list | None = None) -> RunConfig:
    """A YAML file, or a built-in config by name (demo, voc, coco-object, coca,
    cityscapes-object; None = demo); then `overrides` (a nested dict or key=value strings),
    merged deeply. `$VAR` in string values is taken from the environment (an unset variable
    is an error naming it; config errors are ConfigErrors, as for every command)."""
    return load_config(RunConfig, path or "demo", overrides or ())


HEARTBEAT_S = 30.0  # how often a running stage's time is saved (what a hard kill can lose)


class _Stages:
    """Runs a stage unless it finished before with the same settings. A stage's recorded time
    is the sum of all its parts: a run interrupted (Ctrl-C, an error, a kill) and resumed counts
    every part, not only the last one. While a stage runs, <run>/.stages/<stage>.parts holds its
    parts so far (the running one saved every HEARTBEAT_S seconds, so a hard kill loses less
    than that); the finished marker <stage>.json carries the parts, their sum and the
    environment of the run (envinfo.environment: commit, versions, CPU, threads, resumed)."""

    def __init__(self, run: Path, threads: dict | None = None):
        self.folder = run / ".stages"
        self.threads = threads
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
        parts_file = self.folder / f"{name}.parts"
        parts = _read_parts(parts_file)
        for part in parts:
            if part.get("end") == "running":  # its process died without a word (killed)
                part["end"] = f"killed (time to its last save, at most {HEARTBEAT_S:.0f} s short)"
        part = {"started": _utc(), "seconds": 0.0, "end": "running", "fingerprint": key}
        parts.append(part)
        log.info("[%s] running%s", name, f" (part {len(parts)}: resuming)" if len(parts) > 1 else "")
        t0 = time.perf_counter()

        def save(end: str | None = None):
            part["seconds"] = round(time.perf_counter() - t0, 2)
            if end:
                part["end"] = end
            io.write_json(parts_file, parts)

        save()
        stop = threading.Event()

        def heartbeat():
            while not stop.wait(HEARTBEAT_S):
                save()

        beat = threading.Thread(target=heartbeat, daemon=True, name=f"namedmask-{name}-time")
        beat.start()
        try:
            fn()
        except BaseException as exc:
            stop.set()
            beat.join()
            save("interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed ({type(exc).__name__})")
            raise
        stop.set()
        beat.join()
        save("finished")
        from namedmask import envinfo

        seconds = round(sum(p["seconds"] for p in parts), 2)
        io.write_json(marker, {"fingerprint": key, "settings": settings, "seconds": seconds, "parts": parts,
                               "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                               "environment": envinfo.environment(self.threads, resumed=len(parts) > 1)})
        parts_file.unlink(missing_ok=True)
        log.info("[%s] done in %.1f s%s", name, seconds,
                 f" ({len(parts)} parts, this one {part['seconds']:.1f} s)" if len(parts) > 1 else "")
        self.ran.append(name)


def _utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def _read_parts(path: Path) -> list:
    """The parts a stage ran so far ([] when none, or when the file is unreadable: its time is
    then lost, the stage is not)."""
    try:
        parts = json.loads(path.read_text())
        return parts if isinstance(parts, list) and all(isinstance(p, dict) for p in parts) else []
    except (OSError, ValueError):
        return []


def run_pipeline(cfg: RunConfig, progress: bool = True) -> Path:
    """Runs the configured stages into cfg.out; returns the path of the report (index.html)."""
    run = Path(cfg.out).resolve()
    with io.output_folder(run, "run", legacy=("config.yaml",)):
        return _run(cfg, run, progress)


def _run(cfg: RunConfig, run: Path, progress: bool) -> Path:
    """The body of run_pipeline, inside its locked run directory."""
    if cfg.demo:
        data = write_dataset(run / "data")
        cfg = dataclasses.replace(
            cfg, pool=cfg.pool or str(data / "pool"), categories=str(data / "categories.txt"),
            eval_dataset=cfg.eval_dataset or "folder", eval_root=cfg.eval_root or str(data / "eval"),
            predict_images=cfg.predict_images or [str(p) for p in sorted((data / "eval" / "images").glob("*.jpg"))[:3]])
    io.write_text(run / "config.yaml", dump_yaml(cfg))
    threads = configure_threads(cfg.threads)
    log.info("threads: %d intra-op, %d inter-op (%s)", threads["intra_op"], threads["inter_op"], threads["source"])
    if "archive" in cfg.stages:
        if not cfg.pool:
            raise PipelineError("set 'pool' (a folder or list file of unlabelled images) in the run config")
        if not Path(cfg.pool).exists():
            hint = ("; build the toy world first: namedmask toy-world --out runs/toy (make demo does)"
                    if "/world/pool" in Path(cfg.pool).as_posix() else "")
            raise PipelineError(f"{cfg.pool}: pool not found{hint}")
    check_weights(cfg, run)
    categories = categories_file(cfg.categories, run)
    warnings = _weight_warnings(cfg)
    for w in warnings:
        log.warning("\n%s\n%s\n%s", "!" * 100, w, "!" * 100)
    stages = _Stages(run, threads)
    archive_json = run / "archive" / "archive.json"
    masks = run / "saliency"

    if "archive" in cfg.stages:
        acfg = dataclasses.replace(cfg.archive, pool=cfg.pool, categories=categories, out=str(run / "archive"))
        stages.run("archive", dataclasses.asdict(acfg), lambda: build_archive(acfg, progress=progress),
                   archive_json)

    if "saliency" in cfg.stages:
        scfg = dataclasses.replace(cfg.saliency, archive=str(archive_json), out=str(masks))
        stages.run("saliency", dataclasses.asdict(scfg), lambda: run_saliency(scfg), masks / "manifest.json")

    if "experts" in cfg.stages and cfg.experts.enabled:
        ecfg = cfg.experts
        refined = run / "refined"

        def experts():
            refine_with_experts(archive_json, masks, refined, ecfg, progress=progress)
            _mask_report(archive_json, refined)

        stages.run("experts", to_dict(ecfg), experts, refined / "manifest.json")
        masks = refined

    train_dir = run / "train"
    if "train" in cfg.stages:
        tcfg = dataclasses.replace(cfg.train, archive=str(archive_json), masks=str(masks), out=str(train_dir))
        if tcfg.val.dataset is None and cfg.eval_dataset and "eval" in cfg.stages:
            # The report's validation curve: the run's evaluation set, scored five times during
            # training. Monitoring only: the model kept is the last iteration's, whatever it scores.
            tcfg = dataclasses.replace(tcfg, val=dataclasses.replace(
                tcfg.val, dataset=cfg.eval_dataset, root=cfg.eval_root, split=cfg.eval_split,
                every=tcfg.val.every or max(1, tcfg.iterations // 5)))
        stages.run("train", to_dict(tcfg), lambda: train(tcfg, progress=progress), train_dir / "model.safetensors")

    if "eval" in cfg.stages and cfg.eval_dataset:
        options = {"split": cfg.eval_split, **dataclasses.asdict(cfg.eval)}

        def evaluate():
            report = evaluate_checkpoint(train_dir, cfg.eval_dataset, cfg.eval_root, overlays_dir=run / "eval",
                                         progress=progress, **options)
            write_report(report, run / "eval" / "metrics.json")
            iou_bar_chart(run / "eval" / "metrics.json", run / "eval" / "per_class_iou.png")
            log.info("mIoU %.4f on %s (%d images)", report.metrics.miou, cfg.eval_dataset, report.num_images)

        stages.run("eval", {"dataset": cfg.eval_dataset, "root": cfg.eval_root, **options,
                            "model": _fingerprint_file(train_dir / "model.safetensors")}, evaluate,
                   run / "eval" / "metrics.json")

    if "predict" in cfg.stages and cfg.predict_images:
        options = dataclasses.asdict(cfg.predict)
        stages.run("predict", {"images": cfg.predict_images, **options,
                               "model": _fingerprint_file(train_dir / "model.safetensors")},
                   lambda: predict(train_dir, cfg.predict_images, run / "predict", progress=progress, **options),
                   run / "predict" / "labels")

    facts = {"run directory": run, "stages run now": ", ".join(stages.ran) or "none (all done before)",
             "stages skipped (already done)": ", ".join(stages.skipped) or "none"}
    if (train_dir / "model.json").is_file():
        meta = json.loads((train_dir / "model.json").read_text())
        facts["model provenance (train/model.json)"] = describe_provenance(meta)
    return build_report(run, title=f"namedmask run: {run.name}", warnings=warnings, facts=facts)


PRESETS = ("cpu", "gpu", "paper")   # namedmask/configs/<preset>.yaml


def categories_file(categories: str, run: Path) -> str:
    """The archive's category argument: a built-in set or a names file as given, or inline text
    ("dog, cat|kitten, traffic light": classes by commas, synonyms by '|') written as
    <run>/categories.txt."""
    from namedmask.data.categories import BUILTIN
    from namedmask.models.maskclip import parse_text_classes

    if categories in BUILTIN or Path(categories).is_file():
        return categories
    if "," not in categories and "|" not in categories:
        raise PipelineError(f"categories {categories!r}: not a built-in set ({', '.join(sorted(BUILTIN))}) nor a "
                            f"file; to list names write them comma-separated: --categories \"dog, cat|kitten\"")
    try:
        classes = parse_text_classes(categories)
    except BadInputError as exc:
        raise PipelineError(f"categories: {exc}") from None
    text = "".join(f"{ws[0]}" + (f" | {', '.join(ws[1:])}" if len(ws) > 1 else "") + "\n" for ws in classes)
    path = run / "categories.txt"
    if not path.is_file() or path.read_text() != text:
        io.write_text(path, text)
    return str(path)


def check_weights(cfg: RunConfig, run: Path) -> None:
    """Before any stage: models.weights.check_run (one line for a missing weights file)."""
    from namedmask.models.weights import check_run

    check_run(cfg, run)


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
    random_clip = str(cfg.archive.pretrained) == "random" or (
        cfg.archive.model == "nm-tiny" and not cfg.archive.pretrained)
    random_dino = cfg.saliency.random_weights
    return [RANDOM_WEIGHTS_WARNING] if (random_clip or random_dino) and {"archive", "saliency"} & set(cfg.stages) else []
