"""The `namedmask` command: one subcommand per pipeline stage. Each command parses its
options, calls one library function and echoes the result; errors are caught once, in the
group (_Group), and become one clear line and exit code != 0."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from namedmask import __version__
from namedmask.errors import NamedMaskError

log = logging.getLogger("namedmask")


# Errors a user can act on: ours, and the operating system's (a missing file, a full disk, no
# permission). A plain ValueError or RuntimeError is a bug and keeps its traceback.
USER_ERRORS = (NamedMaskError, OSError)


class _Group(click.Group):
    """The one place errors become output: a NamedMaskError (or an OSError: a missing file, no permission)
    prints as `Error: <message>` with exit code 1; its traceback only with -vv."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            if ctx.params.get("verbose", 0) > 1:
                traceback.print_exc()
            raise click.ClickException(_one_line(exc)) from None
        except Exception as exc:
            # An error of ours re-raised by a DataLoader worker comes back as its original
            # type only when that type takes one string; torch may wrap it otherwise.
            if "Original Traceback" in str(exc) and "namedmask" in str(exc) and ctx.params.get("verbose", 0) <= 1:
                raise click.ClickException(_one_line(exc)) from None
            raise


def _one_line(exc: BaseException) -> str:
    """The message of `exc`; for an error raised inside a DataLoader worker (torch puts the
    worker's traceback in the message) only the original error's own message."""
    text = str(exc)
    if "Original Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """namedmask logs INFO by default, other libraries (open_clip, timm, ...) only warnings;
    -v: INFO from every library and DEBUG from namedmask; -vv: DEBUG everywhere; -q: warnings."""
    if quiet:
        root, ours = logging.WARNING, logging.WARNING
    else:
        root = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
        ours = logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(format=LOG_FORMAT, datefmt="%H:%M:%S")  # no-op where the host set up logging
    logging.getLogger().setLevel(root)
    logging.getLogger("namedmask").setLevel(ours)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True,
              help="More logging: -v adds other libraries' INFO (open_clip, timm) and namedmask's DEBUG; "
                   "-vv DEBUG everywhere and tracebacks of errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--threads", default=None, envvar="NAMEDMASK_THREADS", metavar="N|auto",
              help="torch threads of every stage: N, or auto = the cores this process may use (affinity, cgroup "
                   "quota) [default: a run config's 'threads', else $OMP_NUM_THREADS, else auto]. Training "
                   "results depend on it; it is recorded in each run's JSON (docs/reproducibility.md).")
@click.version_option(__version__, "--version", prog_name="namedmask")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, threads: str | None) -> None:
    """namedmask: segment and name objects without pixel labels (NamedMask)."""
    setup_logging(verbose, quiet)
    if ctx.invoked_subcommand not in (None, "bench", "config", "weights"):  # bench sets its own; these compute nothing
        from namedmask import runtime

        if threads is not None:
            try:
                runtime.parse_threads(threads)
            except NamedMaskError as exc:
                raise click.BadParameter(str(exc), param_hint="--threads") from None
            os.environ[runtime.THREADS_ENV] = threads  # wins over a config's `threads` (runtime.resolve_threads)
        runtime.configure_threads(threads)
    # Log lines go above the progress bars instead of through them, while the command runs.
    ctx.with_resource(logging_redirect_tqdm())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Versions, devices and, per op, which backends are live."""
    from namedmask import envinfo

    data = envinfo.collect()
    click.echo(json.dumps(data, indent=2) if as_json else envinfo.format_info(data))


def _open_vocab_options(fn):
    """--text and the zero-shot dense CLIP options shared by eval and predict."""
    options = [
        click.option("--text", default=None, help='Class names, e.g. "dog, cat|kitten, traffic light" (| = synonyms): '
                                                  "a text-head --checkpoint or zero-shot dense CLIP labels them."),
        click.option("--model", default=None, help="Zero-shot: an open_clip model name (e.g. ViT-B-16)."),
        click.option("--pretrained", default=None, help="Zero-shot: a pretrained tag, a weights file or 'random'."),
        click.option("--templates", default=None, show_default="namedmask",
                     help="Zero-shot prompt templates: namedmask (85) | vild (14) | simple | FILE."),
        click.option("--background-threshold", type=float, default=None,
                     help="Zero-shot: pixels whose best class probability is below this are background."),
        click.option("--no-background-prompt", is_flag=True,
                     help="Zero-shot: no 'background' prompt (needs a threshold)."),
        click.option("--recipe", type=click.Choice(["value", "maskclip"]), default=None, show_default="value",
                     help="Zero-shot dense path of the last ViT block: value = the value path alone, without the "
                          "block's residual and MLP (dropping them is ClearCLIP's finding; not ClearCLIP itself); "
                          "maskclip = MaskCLIP's released code (value path + residual + MLP)."),
        click.option("--short-side", type=int, default=None,
                     help="Zero-shot: CLIP input short side (default: its size)."),
        click.option("--refine", type=click.Choice(["none", "bilateral", "dino"]), default="none", show_default=True,
                     help="Zero-shot: refine the labels with the bilateral solver, or average the scores over "
                          "DINO-key neighbours (needs --dino/--dino-weights)."),
        click.option("--dino", default=None,
                     help="The DINO ViT (a timm name) of zero-shot --refine dino, or of predict --proposals discover "
                          "[there default: vit_small_patch16_224.dino]."),
        click.option("--dino-weights", default=None, type=click.Path(dir_okay=False),
                     help="That DINO's local weights file (official or timm layout)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_PRESET_HELP = ("maskclip: zero-shot dense CLIP as MaskCLIP's released code (recipe maskclip, short side 512, "
                "key smoothing 1.0, prompt denoising 0.5; options given win)")


def _zero_shot_settings(run_dir, text, *, model, pretrained, templates, background_threshold, no_background_prompt,
                        recipe, short_side, refine, dino, dino_weights, preset=None) -> dict | None:
    """zero_shot_segmenter's keyword arguments when --model asks for zero-shot, else None
    (a preset fills what the options leave empty; checked as config.ZeroShotConfig before any work)."""
    from namedmask.config import ZeroShotConfig
    from namedmask.models.maskclip import apply_preset

    if preset is not None and preset != "maskclip":
        raise click.UsageError(f"--preset {preset} belongs to --proposals segmenter, not to dense zero-shot CLIP")
    if model is None:
        if preset is not None:
            raise click.UsageError("--preset maskclip is zero-shot dense CLIP: give --model (and --pretrained)")
        return None
    if run_dir is not None:
        raise click.UsageError("give --checkpoint (a trained run) or --model (zero-shot dense CLIP), not both")
    if not text:
        raise click.UsageError("zero-shot dense CLIP needs class names: --text \"a, b|synonym\" (predict) "
                               "or --zero-shot --dataset (eval)")
    settings = apply_preset({"model": model, "pretrained": pretrained, "templates": templates or "namedmask",
                             "threshold": background_threshold,
                             "background": () if no_background_prompt else ("background",), "recipe": recipe,
                             "short_side": short_side, "refine": refine, "dino": dino, "dino_weights": dino_weights},
                            preset)
    return dataclasses.asdict(ZeroShotConfig(**{**settings, "recipe": settings["recipe"] or "value"}))


def _config_options(fn):
    """--config FILE and repeated --set key=value, shared by the stage commands."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config value, e.g. --set optim.lr_head=1e-3 (repeatable).")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="YAML config file of this command's keys (`namedmask config show` lists them); "
                             "options given on the command line win.")(fn)


def _flag(value: bool):
    """A flag given on the command line overrides the config; an absent one leaves it."""
    return True if value else None


@cli.command("eval")
@click.option("--pred", "pred_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of predicted index PNGs (matched to --gt by file stem).")
@click.option("--gt", "gt_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of ground-truth index PNGs (palette or grayscale).")
@click.option("--checkpoint", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Evaluate a trained model (its run folder, checkpoint.pt or model.safetensors) instead of "
                   "prediction files.")
@click.option("--dataset", default=None,
              help="With --checkpoint: voc | coco-object | coca | cityscapes-object | imagenet-s | folder.")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="With --checkpoint: dataset root.")
@click.option("--split", default="val", help="With --checkpoint: dataset split.")
@click.option("--device", default=None, show_default="auto", help="With --checkpoint: auto | cpu | cuda.")
@click.option("--max-images", type=int, default=None, help="With --checkpoint: score only the first N images.")
@click.option("--overlays", "overlays_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --checkpoint: write colour overlays of a few images here.")
@click.option("--num-classes", type=click.IntRange(1, 65536), help="Number of classes including background.")
@click.option("--ignore-index", type=int, default=255, help="Ground-truth value that is not scored.")
@click.option("--class-names", default=None, help="Category set (e.g. voc) or names file: the classes of --pred.")
@click.option("--gt-classes", default=None,
              help="Category set or names file of the --gt ids when they differ from --class-names; "
                   "classes are paired by name (synonyms count).")
@click.option("--ignore-unmapped", is_flag=True,
              help="Leave ground-truth ids no predicted class maps to unscored (counted in the report) "
                   "instead of failing; model classes the dataset lacks score as background.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write metrics JSON here.")
@click.option("--skip-bad", is_flag=True, help="Log, count and skip bad or missing pairs instead of failing.")
@click.option("--backend", default=None, show_default="auto", help="Kernel backend for the confusion matrix.")
@click.option("--zero-shot", is_flag=True, help="Score zero-shot dense CLIP (--model/--pretrained) on --dataset.")
@click.option("--text-classes", default=None, is_flag=False, flag_value="dataset",
              help="With a text-head --checkpoint or --zero-shot: classify with these names (a category set or "
                   "names file; alone: the dataset's own class names).")
@click.option("--discover", "discover_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Score a `namedmask discover` folder (free names) on --dataset/--root as the zero-guidance paper "
                   "does: names matched to classes, IoU and recall over IoU thresholds 0-1 (docs/discover.md).")
@click.option("--discover-mode", type=click.Choice(["t-t", "i-t"]), default="t-t", show_default=True,
              help="--discover matching: t-t names to class names (sentence model, else CLIP text); i-t segment "
                   "image embeddings to CLIP class prompts.")
@click.option("--sentence-model", default=None, metavar="FOLDER|NAME",
              help="--discover t-t: a sentence-embedding model (sentence-transformers layout, e.g. all-mpnet-base-v2).")
@click.option("--text-threshold", type=float, default=0.5, show_default=True, help="--discover t-t: least cosine.")
@click.option("--clip-threshold", type=float, default=0.1, show_default=True, help="--discover i-t: least cosine.")
@_open_vocab_options
@click.option("--preset", type=click.Choice(["maskclip"]), default=None, help=_PRESET_HELP + ".")
@_config_options
def eval_cmd(pred_dir, gt_dir, run_dir, dataset, root, split, device, max_images, overlays_dir, num_classes,
             ignore_index, class_names, gt_classes, ignore_unmapped, out, skip_bad, backend, zero_shot, text_classes,
             discover_dir, discover_mode, sentence_model, text_threshold, clip_threshold,
             text, config_path, overrides, **zs_options) -> None:
    """mIoU of prediction label maps against ground truth (--pred/--gt), or of a trained model
    on a dataset (--checkpoint/--dataset/--root): one dataset-level confusion matrix."""
    from namedmask.config import EvalConfig, load_config
    from namedmask.data.categories import get_category_set
    from namedmask.evaluation import write_report
    from namedmask.stages.evaluate import evaluate_label_maps

    if discover_dir is not None:
        return _eval_discover(discover_dir, dataset, root, split, class_names, discover_mode, sentence_model,
                              text_threshold, clip_threshold, max_images, out)

    cfg = load_config(EvalConfig, config_path, overrides, device=device, max_images=max_images, backend=backend,
                      ignore_unmapped=_flag(ignore_unmapped))
    device, max_images, backend, ignore_unmapped = cfg.device, cfg.max_images, cfg.backend, cfg.ignore_unmapped
    if out is not None:  # before the work: a table printed, then its JSON lost, helps nobody
        _check_out_file(out)
    if zero_shot and zs_options["model"] is None:
        raise click.UsageError("--zero-shot needs --model (an open_clip model name) and usually --pretrained")
    zs = _zero_shot_settings(run_dir, text or ("dataset" if zero_shot else None), **zs_options)
    if run_dir is not None or zs is not None:
        from namedmask.stages.evaluate import evaluate_checkpoint
        from namedmask.stages.evaluate import evaluate_open

        if dataset is None or root is None:
            raise click.UsageError("--checkpoint / --zero-shot need --dataset and --root")
        if zs is not None or text or text_classes:
            report = evaluate_open(dataset, root, run_dir=run_dir, zero_shot=zs, text=text, class_set=text_classes,
                                   split=split, device=device, max_images=max_images, overlays_dir=overlays_dir,
                                   backend=backend, ignore_unmapped=ignore_unmapped)
        else:
            report = evaluate_checkpoint(run_dir, dataset, root, split=split, device=device, max_images=max_images,
                                         overlays_dir=overlays_dir, num_overlays=cfg.num_overlays, backend=backend,
                                         ignore_unmapped=ignore_unmapped)
        click.echo(report.table())
        if out:
            write_report(report, out)
            click.echo(f"metrics written to {out}")
        return
    if pred_dir is None or gt_dir is None:
        raise click.UsageError("give --pred and --gt folders of index PNGs, or --checkpoint with --dataset/--root")
    names, gt_set = None, None
    if class_names:
        names = list(get_category_set(class_names).names)
    if gt_classes:
        gt_set = get_category_set(gt_classes)
    if names and num_classes is None:
        num_classes = len(names)
    if num_classes is None:
        raise click.UsageError("give --num-classes (or --class-names to infer it)")
    report = evaluate_label_maps(pred_dir, gt_dir, num_classes, ignore_index, skip_bad, names, backend,
                                 gt_class_names=gt_set and list(gt_set.names),
                                 gt_words=gt_set and {n: gt_set.prompt_words(n) for n in gt_set.names},
                                 ignore_unmapped=ignore_unmapped)
    click.echo(report.table())
    if out:
        write_report(report, out)
        click.echo(f"metrics written to {out}")


def _eval_discover(discover_dir, dataset, root, split, class_names, mode, sentence_model, text_threshold,
                   clip_threshold, max_images, out) -> None:
    from namedmask import io
    from namedmask.data.categories import get_category_set
    from namedmask.data.datasets import open_dataset
    from namedmask.stages.discover_eval import evaluate_discovered

    if dataset is None or root is None:
        raise click.UsageError("--discover needs --dataset (voc, folder, ...) and --root")
    if out is not None:
        _check_out_file(out)
    labeled = open_dataset(dataset, root, split)
    names = None
    if class_names:
        cs = get_category_set(class_names)
        names = [cs.prompt_name(n) for n in cs.names]
    elif labeled.class_names:
        from namedmask.errors import NamedMaskError

        try:  # the official prompt words of a built-in set (VOC: "dining table", ...)
            cs = get_category_set(dataset)
            names = [cs.prompt_name(n) for n in labeled.class_names]
        except NamedMaskError:
            names = list(labeled.class_names)
    result = evaluate_discovered(discover_dir, labeled, class_names=names, mode=mode, sentence_model=sentence_model,
                                 text_threshold=text_threshold, clip_threshold=clip_threshold, max_images=max_images)
    click.echo(f"zero-guidance evaluation of {discover_dir} ({result['images']} images, mode {mode}, "
               f"{result['matching']} >= {result['threshold']}):")
    for key in ("iou_union", "iou_argmax", "recall_union", "recall_argmax", "recall_allseg"):
        click.echo(f"  {key:14s} {result[key]:.4f}")
    if out:
        io.write_json(out, result)
        click.echo(f"metrics written to {out}")


@cli.group()
def prepare() -> None:
    """Prepare and check evaluation datasets."""


@prepare.command("coco-object")
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="COCO root holding <split>2017/ and annotations/instances_<split>2017.json.")
@click.option("--split", default="val", help="COCO split (val, train).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the label PNGs [default: <root>/annotations/coco_object_<split>2017].")
@click.option("--overwrite", is_flag=True, help="Rebuild masks that already exist.")
def prepare_coco_object_cmd(root, split, out_dir, overwrite) -> None:
    """Build the 81-id COCO-Object label PNGs from the instances json (crowd -> 255,
    overlapping instances: the smaller wins). Resumable."""
    from namedmask.data.coco import prepare_coco_object

    counts = prepare_coco_object(root, split, out_dir, overwrite)
    click.echo(f"{counts['images']} images: {counts['written']} masks written, {counts['kept']} already there "
               f"-> {counts['out_dir']}")


@prepare.command("check")
@click.option("--dataset", required=True, help="voc, coco-object, coca, cityscapes-object, imagenet-s or folder.")
@click.option("--root", required=True, type=click.Path(path_type=Path), help="The dataset's root folder.")
@click.option("--split", default="val", help="Split to check.")
def prepare_check_cmd(dataset, root, split) -> None:
    """Print what of a dataset's expected layout is found under --root and what is missing."""
    from namedmask.data.datasets import check_dataset

    report = check_dataset(dataset, root, split)
    click.echo(report.text())
    if not report.ok:
        sys.exit(1)


@cli.command("build-archive")
@click.option("--pool", type=click.Path(exists=True, path_type=Path),
              help="Image folder (searched recursively) or a list file of paths relative to its folder.")
@click.option("--categories", help="Category set (voc) or names file ('name | synonym, ...' lines).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: archive.json, embedding shards, caches; re-run with the same arguments to resume.")
@click.option("--model", default=None, show_default="ViT-L-14-336",
              help="open_clip model name (nm-tiny: a tiny test model).")
@click.option("--pretrained", default=None,
              help="open_clip tag, local checkpoint file, or 'random'  [default: openai; random for nm-tiny]")
@click.option("--k", type=int, default=None, show_default="500", help="Images per category archive.")
@click.option("--batch-size", type=int, default=None, show_default="64", help="Images per forward pass.")
@click.option("--templates", default=None, show_default="namedmask",
              help="Prompt templates: namedmask (85), simple, or a file.")
@click.option("--synonyms", default=None, type=click.Path(exists=True, dir_okay=False),
              help="File of 'name | synonym, synonym' lines; all names of a category are averaged.")
@click.option("--device", default=None, show_default="auto",
              help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun), cuda:N.")
@click.option("--shard-size", type=int, default=None, show_default="4096",
              help="Images per embedding shard (the unit of resumption).")
@click.option("--report", is_flag=True, help="Also write a contact sheet PNG per category to OUT/report.")
@_config_options
def build_archive_cmd(pool, categories, out, model, pretrained, k, batch_size, templates, synonyms, device,
                      shard_size, report, config_path, overrides) -> None:
    """Stage (A): CLIP retrieves the top-K pool images per category -> OUT/archive.json.
    Distributed: torchrun --nproc-per-node N -m namedmask build-archive ..."""
    from namedmask.config import ArchiveConfig, load_config
    from namedmask.stages.archive import build_archive

    cfg = load_config(ArchiveConfig, config_path, overrides, pool=pool and str(pool), categories=categories,
                      out=out and str(out), model=model, pretrained=pretrained, k=k, batch_size=batch_size,
                      templates=templates, synonyms=synonyms, device=device, shard_size=shard_size,
                      report=_flag(report))
    _require(cfg, "pool", "categories", "out")
    archive = build_archive(cfg)
    if archive is not None:
        click.echo(f"{len(archive.categories)} archives of up to {cfg.k} images -> {Path(cfg.out) / 'archive.json'}")


def _check_out_file(path: Path) -> None:
    from namedmask import io

    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder; give a file name", param_hint="--out")
    io.check_writable_dir(path.parent if str(path.parent) else Path("."))


def _require(cfg, *keys) -> None:
    missing = [k for k in keys if getattr(cfg, k) is None]
    if missing:
        raise click.UsageError("missing " + ", ".join(f"--{k.replace('_', '-')}" for k in missing)
                               + " (or set them in --config)")


@cli.command()
@click.option("--archive", type=click.Path(path_type=Path), help="archive.json (or its folder).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Pseudo-mask folder (manifest.json + masks/); rerunning resumes it.")
@click.option("--method", type=click.Choice(["tokencut", "selfmask"]), default=None, show_default="tokencut",
              help="tokencut: training-free, DINO only; selfmask: needs --checkpoint.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SelfMask checkpoint (official selfmask_nq20.pt layout).")
@click.option("--dino", default=None, help="timm name of the DINO ViT [default: vit_small_patch16_224.dino for tokencut, vit_small_patch8_224.dino for a --random-weights selfmask].")
@click.option("--dino-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local DINO weights (official dino_deitsmall16_pretrain.pth layout or timm); else the timm hub.")
@click.option("--refine", type=click.Choice(["bilateral-solver", "none"]), default=None,
              show_default="bilateral-solver",
              help="Refinement of each mask (NamedMask's bilateral-solver parameters, threshold 0.5).")
@click.option("--short-side", type=int, default=None, show_default="512",
              help="Images are resized to this short side for the model.")
@click.option("--batch-size", type=int, default=None, show_default="8",
              help="Images decoded per step; equal sizes share a forward pass.")
@click.option("--tau", type=float, default=None, show_default="0.2", help="TokenCut affinity threshold.")
@click.option("--device", default=None, show_default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--random-weights", is_flag=True, help="Random model weights: smoke runs only, masks are meaningless.")
@click.option("--report", is_flag=True, help="Also write report/<id>_<category>.png overlays of a few masks each.")
@_config_options
def saliency(archive, out, method, checkpoint, dino, dino_weights, refine, short_side, batch_size, tau, device,
             random_weights, report, config_path, overrides) -> None:
    """Class-agnostic pseudo-masks (0/1 PNG, native size) for every archive image."""
    from namedmask.config import SaliencyConfig, load_config
    from namedmask.stages.saliency import run_saliency

    cfg = load_config(SaliencyConfig, config_path, overrides, archive=archive and str(archive), out=out and str(out),
                      method=method, refine=refine, short_side=short_side, batch_size=batch_size, dino=dino,
                      dino_weights=dino_weights and str(dino_weights), checkpoint=checkpoint and str(checkpoint),
                      random_weights=_flag(random_weights), tau=tau, device=device, report=_flag(report))
    _require(cfg, "archive", "out")
    result = run_saliency(cfg)
    click.echo(result.summary())
    for item in result.failed:
        click.echo(f"failed: {item['path']}: {item['reason']}")


@cli.command()
@click.option("--archive", default=None, help="archive.json (or its folder).")
@click.option("--masks", default=None, help="Pseudo-mask folder (manifest.json).")
@click.option("--out", default=None, help="Run directory (resumed if it holds a checkpoint).")
@click.option("--iterations", type=int, default=None, help="Training iterations (optimizer steps)  [default: 20000].")
@click.option("--batch-size", type=int, default=None, help="Global batch, split over DDP ranks.")
@_config_options
def train(archive, masks, out, iterations, batch_size, config_path, overrides) -> None:
    """Train the DeepLabv3+ segmenter on archives + pseudo-masks (torchrun for DDP)."""
    from namedmask.config import TrainConfig, load_config
    from namedmask.training import train as run

    cfg = load_config(TrainConfig, config_path, overrides, archive=archive, masks=masks, out=out,
                      iterations=iterations, batch_size=batch_size)
    run_dir = run(cfg)
    click.echo(f"trained model in {run_dir}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", "run_dir", default=None, type=click.Path(path_type=Path),
              help="A trained model: its run folder, checkpoint.pt or model.safetensors (or, for zero-shot "
                   "dense CLIP, --model/--pretrained with --text).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: labels/<name>.png (class ids) and overlays/<name>.png.")
@click.option("--device", default=None, show_default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--no-overlays", is_flag=True, help="Only label PNGs.")
@click.option("--classes", default=None,
              help="Write label ids of this category set (e.g. voc) or names file, classes paired by name.")
@click.option("--ignore-unmapped", is_flag=True, help="With --classes: model classes the set lacks become background.")
@click.option("--skip-bad", is_flag=True, help="Log, list and skip unreadable images instead of failing.")
@click.option("--categories", default=None,
              help="With an official NamedMask final_model.pt as --checkpoint: the classes it was trained on, in "
                   "order (voc, a names file, or \"a, b|synonym\").")
@_open_vocab_options
@click.option("--proposals", type=click.Choice(["discover", "segmenter"]), default=None,
              help="Two-stage open vocabulary: regions from discover's DINO over-segmentation or from the "
                   "--checkpoint segmenter's masks, each named among --text by CLIP (--model/--pretrained).")
@click.option("--embed", type=click.Choice(["crop", "attention", "whole"]), default="crop", show_default=True,
              help="--proposals: region embedding (masked crop, class-row attention mask, whole image).")
@click.option("--mask-prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--proposals with --embed crop: mask-prompt tokens from `namedmask adapt-clip`.")
@click.option("--random-dino", is_flag=True, help="--proposals discover: random DINO weights (smoke runs only).")
@click.option("--size", type=int, default=512, show_default=True,
              help="--proposals discover: short side (px) for DINO and the solver.")
@click.option("--k", type=int, default=8, show_default=True, help="--proposals discover: most regions per image.")
@click.option("--preset", type=click.Choice(["maskclip", "ovseg"]), default=None,
              help=_PRESET_HELP + "; ovseg: --proposals segmenter as OVSeg's inference (14 ViLD templates, each "
                                  "region's class = argmax of segmenter^0.3 x CLIP^0.7 probabilities; use with "
                                  "--mask-prompts from `adapt-clip --preset ovseg`).")
@_config_options
def predict(images, run_dir, out, device, no_overlays, classes, ignore_unmapped, skip_bad, categories, text, proposals,
            embed, mask_prompts, random_dino, size, k, preset, config_path, overrides, **zero_shot) -> None:
    """Label PNGs (+ colour overlays with a legend) for images or folders of images."""
    from namedmask.config import PredictConfig, load_config
    from namedmask.stages.predict import TwoStageConfig, predict as run

    cfg = load_config(PredictConfig, config_path, overrides, device=device, overlays=False if no_overlays else None,
                      classes=classes, ignore_unmapped=_flag(ignore_unmapped), skip_bad=_flag(skip_bad))

    two = None
    if preset == "ovseg" and proposals != "segmenter":
        raise click.UsageError("--preset ovseg is OVSeg's inference on a segmenter's regions: add --proposals "
                               "segmenter (with --checkpoint RUN)")
    if proposals:
        from namedmask.models.mask_prompts import OVSEG_INFERENCE

        if zero_shot["model"] is None:
            raise click.UsageError("--proposals names regions with CLIP: give --model (and --pretrained)")
        if zero_shot["short_side"] is not None or zero_shot["refine"] != "none" or zero_shot["recipe"] \
                or preset == "maskclip":
            raise click.UsageError("--short-side, --refine, --recipe and --preset maskclip belong to dense zero-shot "
                                   "CLIP, not to --proposals")
        ovseg = OVSEG_INFERENCE if preset == "ovseg" else {}
        if ovseg and zero_shot["background_threshold"] is not None:
            raise click.UsageError("--preset ovseg names every proposed region among the --text classes (OVSeg has "
                                   "no background choice for a region): drop --background-threshold")
        two = TwoStageConfig(proposals, zero_shot["model"], zero_shot["pretrained"],
                             zero_shot["templates"] or ovseg.get("templates", "namedmask"),
                             () if zero_shot["no_background_prompt"] else ("background",),
                             zero_shot["background_threshold"], embed=embed, ensemble=ovseg.get("ensemble"),
                             mask_prompts=mask_prompts and str(mask_prompts),
                             dino=zero_shot["dino"] or "vit_small_patch16_224.dino",
                             dino_weights=zero_shot["dino_weights"], random_dino=random_dino, size=size, k=k)
        zs = None
    else:
        if mask_prompts or random_dino or embed != "crop":
            raise click.UsageError("--embed, --mask-prompts and --random-dino go with --proposals")
        zs = _zero_shot_settings(run_dir, text, preset=preset, **zero_shot)
        if run_dir is None and zs is None:
            raise click.UsageError("give --checkpoint RUN, or --text with --model (zero-shot dense CLIP)")
    extra = {"categories": categories} if categories else {}
    written = run(run_dir, images, out, text=text, zero_shot=zs, proposals=two, **extra, **dataclasses.asdict(cfg))
    click.echo(f"{len(written)} label maps written to {out / 'labels'}")


def _experts_options(fn):
    for opt in reversed([
        click.option("--archive", required=True, help="archive.json (or its folder)."),
        click.option("--masks", required=True, help="Saliency pseudo-mask folder to refine."),
        click.option("--out", required=True, help="Folder for the refined masks (same schema) and the experts."),
        click.option("--groups", type=int, default=None, help="Number of experts (k-means over text embeddings); "
                                                               "default one per category."),
        click.option("--embeddings", default=None, help="File {category: text embedding} for --groups "
                     "[default: the archive folder's text_embeddings.safetensors]."),
    ]):
        fn = opt(fn)
    return _config_options(fn)


@cli.command()
@_experts_options
def experts(archive, masks, out, groups, embeddings, config_path, overrides) -> None:
    """Stage (C): train a binary expert per category (or group of categories) on its archive
    and saliency masks, re-predict the archive -> refined pseudo-mask folder. Resumable."""
    _run_experts(archive, masks, out, groups, embeddings, config_path, overrides)


@cli.command("refine-experts", hidden=True)
@_experts_options
def refine_experts(archive, masks, out, groups, embeddings, config_path, overrides) -> None:
    """Deprecated name of `namedmask experts`."""
    _deprecated("refine-experts", "namedmask experts")
    _run_experts(archive, masks, out, groups, embeddings, config_path, overrides)


def _deprecated(old: str, new: str) -> None:
    click.echo(f"Warning: `{old}` is deprecated and will be removed; use `{new}`.", err=True)


def _run_experts(archive, masks, out, groups, embeddings, config_path, overrides) -> None:
    from namedmask.config import ExpertsConfig, load_config
    from namedmask.stages.experts import refine_with_experts

    cfg = load_config(ExpertsConfig, config_path, overrides, groups=groups, embeddings=embeddings)
    folder = refine_with_experts(archive, masks, out, cfg)
    click.echo(f"refined masks written to {folder}")


@cli.command()
@click.option("--config", "config", default=None,
              help="Run config: a YAML file or a built-in name (demo, voc, coco-object, coca, cityscapes-object) "
                   "[default: demo, generated data and tiny random models, no download].")
@click.option("--pool", default=None, type=click.Path(exists=True, path_type=Path),
              help="Your photos: a folder (searched recursively) or a list file. Trains on them and writes named "
                   "masks of every photo; with --categories and a --preset, no config file is needed.")
@click.option("--categories", default=None,
              help='What to find: "dog, cat|kitten, traffic light" (| = synonyms), a built-in set (voc) or a names file.')
@click.option("--preset", type=click.Choice(["cpu", "gpu", "paper"]), default=None,
              help="Built-in settings for --pool (namedmask/configs/<preset>.yaml, docs/your-photos.md): cpu = about an "
                   "hour on a laptop for a few hundred photos, gpu = about a day on one GPU, paper = NamedMask's "
                   "protocol  [default: gpu when nvidia-smi lists a GPU, else cpu].")
@click.option("--out", default=None, help="Run directory (overrides the config's 'out').")
@click.option("--stages", default=None, help="Comma-separated subset of: archive,saliency,experts,train,eval,predict.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.iterations=100 (repeatable).")
def run(config, pool, categories, preset, out, stages, overrides) -> None:
    """The whole pipeline into one run directory, each stage resumable; writes index.html."""
    from namedmask.config import parse_overrides

    values = parse_overrides(overrides)
    config = _run_preset(config, pool, categories, preset, out, values)
    if out:
        values["out"] = out
    if stages:
        values["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    if pool is not None:  # your photos: a missing weights file is one line at once, before the stages load
        from namedmask.config import RunConfig, load_config
        from namedmask.models.weights import check_run

        cfg = load_config(RunConfig, config, values)
        check_run(cfg, Path(cfg.out))
    from namedmask.pipeline import load_run_config, run_pipeline

    report = run_pipeline(load_run_config(config, values))
    click.echo(f"report: {report}")


def _default_preset() -> str:
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


def _run_preset(config, pool, categories, preset, out, values: dict):
    """The config `run` loads for --pool/--categories/--preset (their values go into `values`)."""
    if preset and config:
        raise click.UsageError("give --preset or --config, not both (a preset is a built-in config)")
    if pool is None and preset is None:
        if categories:
            values["categories"] = categories
        return config
    if config is None:
        if pool is None:
            raise click.UsageError("--preset trains on your photos: give --pool DIR and --categories \"a, b|synonym\"")
        if not categories:
            raise click.UsageError('--pool needs --categories, e.g. --categories "dog, cat|kitten, traffic light"')
        if not out and "out" not in values:
            raise click.UsageError("--pool needs --out DIR (the run folder)")
        if preset is None:
            preset = _default_preset()
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


@cli.command()
@click.option("--preset", type=click.Choice(["cpu", "gpu", "paper"]), default=None,
              help="The preset whose models to list [default: gpu when nvidia-smi lists a GPU, else cpu].")
@click.option("--config", "config", default=None, help="Or a run config (YAML file or built-in name).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config values as `run` takes them, e.g. --set saliency.dino_weights=FILE (repeatable).")
def weights(preset, config, overrides) -> None:
    """Every pretrained model a run needs: present (and where), or missing (where namedmask looked,
    the URL, and the option or config key that takes the file). Exit code 1 when one is missing."""
    import os

    from namedmask.config import RunConfig, load_config, parse_overrides
    from namedmask.models.weights import run_weights

    if preset and config:
        raise click.UsageError("give --preset or --config, not both")
    values = parse_overrides(overrides)
    for key in ("pool", "eval_root"):  # a dataset config's $IMAGENET_TRAIN / $VOC_ROOT: not needed to list weights
        values.setdefault(key, ".")
    # no torch, open_clip or timm imports for the presets' models: this answers in about a second
    cfg = load_config(RunConfig, config or preset or _default_preset(), values)

    offline = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
        else None
    entries = run_weights(cfg)
    for w in entries:
        click.echo(w.line(offline))
    if any(not w.ok and w.required for w in entries):
        sys.exit(1)


@cli.group("config")
def config_group() -> None:
    """Inspect configs."""


CONFIG_KINDS = {"run": "RunConfig", "train": "TrainConfig", "experts": "ExpertsConfig",
                "build-archive": "ArchiveConfig", "saliency": "SaliencyConfig", "refine": "RefineConfig",
                "eval": "EvalConfig", "predict": "PredictConfig", "discover": "DiscoverConfig",
                "adapt-clip": "AdaptConfig"}


@config_group.command("show")
@click.option("--config", "config_path", default=None,
              help="YAML file (or, for run, a built-in name) to resolve [default: the defaults; for run: demo].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value (repeatable).")
@click.option("--for", "kind", type=click.Choice(sorted(CONFIG_KINDS)), default="run",
              help="Which command's config.")
def config_show(config_path, overrides, kind) -> None:
    """Print the resolved config (defaults ⊕ --config ⊕ --set) as YAML."""
    from namedmask import config as config_module
    from namedmask.config import dump_yaml, load_config

    if kind == "run":
        from namedmask.pipeline import load_run_config

        cfg = load_run_config(config_path, list(overrides))
    else:
        cfg = load_config(getattr(config_module, CONFIG_KINDS[kind]), config_path, overrides)
    click.echo(dump_yaml(cfg), nl=False)


@cli.command("toy-world")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the world and the models (cached per seed in OUT/seed-N).")
@click.option("--seed", type=int, default=0, help="World and training seed.")
@click.option("--size", type=click.Choice(["full", "ci"]), default="full", help="ci: a reduced world for tests.")
@click.option("--clip-steps", type=int, default=None, help="Tiny CLIP training steps [default: 250].")
@click.option("--dino-steps", type=int, default=None, help="Tiny DINO training steps (0 = skip) [default: 100].")
def toy_world(out, seed, size, clip_steps, dino_steps) -> None:
    """Generated captioned scenes + a tiny CLIP and DINO trained on them (resumable, cached per
    seed); writes OUT/seed-N/run.yaml for `namedmask run --config`."""
    from namedmask.toy import ToyWorldConfig, build_toy_world

    cfg = ToyWorldConfig(str(out), seed, size, {} if clip_steps is None else {"steps": clip_steps},
                         {} if dino_steps is None else {"steps": dino_steps})
    root = build_toy_world(cfg)
    click.echo(f"toy world and models in {root}; run NamedMask on it: namedmask run --config {root / 'run.yaml'}")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args) -> None:
    """Run the benchmark suite (python -m bench ARGS; needs the source checkout's bench/)."""
    import subprocess

    sys.exit(subprocess.call([sys.executable, "-m", "bench", *args]))


@cli.command()
@click.option("--method", type=click.Choice(["bilateral-solver", "experts"]), default="bilateral-solver",
              help="bilateral-solver: edge-aware smoothing of a folder of masks ('experts' is a deprecated "
                   "spelling of `namedmask experts`).")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of images (the guides), e.g. the archive's pool root.")
@click.option("--archive", default=None, hidden=True, help="Deprecated (--method experts).")
@click.option("--groups", type=int, default=None, hidden=True, help="Deprecated (--method experts).")
@click.option("--embeddings", default=None, hidden=True, help="Deprecated (--method experts).")
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of mask PNGs (non-zero = foreground), matched to --images by relative path and stem; "
                   "a pseudo-mask folder (or its masks/) makes --out one too (manifest.json, for train --masks).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <stem>.png, 0 = background, 1 = foreground.")
@click.option("--preset", type=click.Choice(["namedmask", "tokencut", "tuned"]), default=None,
              show_default="namedmask",
              help="Solver parameters: namedmask 16/16/8 lam 256, tokencut 24/4/4 lam 256, tuned (see README).")
@click.option("--sigma-spatial", type=float, default=None, help="Override the preset's spatial sigma (pixels).")
@click.option("--sigma-luma", type=float, default=None, help="Override the preset's luma sigma.")
@click.option("--sigma-chroma", type=float, default=None, help="Override the preset's chroma sigma.")
@click.option("--lam", type=float, default=None, help="Override the preset's smoothness weight lambda.")
@click.option("--threshold", type=float, default=None, show_default="0.5",
              help="Foreground where the soft output exceeds this.")
@click.option("--device", default=None, show_default="cpu", help="cpu or cuda.")
@click.option("--backend", default=None, show_default="auto", help="Kernel backend of the solver.")
@click.option("--overwrite", is_flag=True, help="Redo masks already in --out.")
@click.option("--skip-bad", is_flag=True, help="Log and skip bad or missing pairs instead of failing at the end.")
@_config_options
def refine(method, images_dir, archive, groups, embeddings, masks_dir, out_dir, preset, sigma_spatial, sigma_luma,
           sigma_chroma, lam, threshold, device, backend, overwrite, skip_bad, config_path, overrides) -> None:
    """Refine masks along image edges with the fast bilateral solver. Resumable: finished
    masks are skipped."""
    from namedmask.config import RefineConfig, load_config
    from namedmask.stages.refine import refine_folder

    if method == "experts":
        _deprecated("refine --method experts", "namedmask experts")
        if archive is None:
            raise click.UsageError("--method experts needs --archive (and --masks: the saliency folder)")
        if masks_dir is None or out_dir is None:
            raise click.UsageError("--method experts needs --masks and --out")
        return _run_experts(archive, masks_dir, out_dir, groups, embeddings, config_path, overrides)
    cfg = load_config(RefineConfig, config_path, overrides, images=images_dir and str(images_dir),
                      masks=masks_dir and str(masks_dir), out=out_dir and str(out_dir), preset=preset,
                      sigma_spatial=sigma_spatial, sigma_luma=sigma_luma, sigma_chroma=sigma_chroma, lam=lam,
                      threshold=threshold, backend=backend, device=device, overwrite=_flag(overwrite),
                      skip_bad=_flag(skip_bad))
    if cfg.images is None:
        raise click.UsageError("--method bilateral-solver needs --images (the guide images)")
    _require(cfg, "masks", "out")
    report = refine_folder(cfg.images, cfg.masks, cfg.out, method=method, preset=cfg.preset,
                           sigma_spatial=cfg.sigma_spatial, sigma_luma=cfg.sigma_luma, sigma_chroma=cfg.sigma_chroma,
                           lam=cfg.lam, threshold=cfg.threshold, backend=cfg.backend, device=cfg.device,
                           batch_size=cfg.batch_size, overwrite=cfg.overwrite, skip_bad=cfg.skip_bad)
    click.echo(f"refined {report.refined}, already done {report.skipped_done}, skipped {len(report.failed)} "
               f"-> {cfg.out}")


# ---------------------------------------------------------------- zero-guidance discovery (issue 19)

@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: labels/, segments/, overlays/, segments.json (resumable).")
@click.option("--vocabulary", default=None, show_default="builtin",
              help="'builtin' (~5,800 ImageNet-1k/21k, COCO, COCO-Stuff nouns, see README) or a file: one name a line, "
                   "synonyms after '|'.")
@click.option("--templates", default=None, show_default="namedmask",
              help="Prompt templates: namedmask (85), simple, or a file.")
@click.option("--model", default=None, show_default="ViT-L-14-336", help="open_clip model name (nm-tiny for tests).")
@click.option("--pretrained", default=None, help="open_clip tag, local checkpoint file, or 'random'.")
@click.option("--dino", default=None, show_default="vit_small_patch16_224.dino", help="timm name of the DINO ViT.")
@click.option("--dino-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local DINO weights (official or timm layout); else the timm hub.")
@click.option("--random-weights", is_flag=True, help="Random DINO weights: smoke runs only.")
@click.option("--size", type=int, default=None, show_default="512", help="Short side (px) for DINO and the solver.")
@click.option("--k", type=int, default=None, show_default="8", help="Most segments per image before merging.")
@click.option("--preset", type=click.Choice(["default", "paper"]), default=None, show_default="default",
              help="paper: the zero-guidance paper's method as its official code runs it (DINO ViT-S/8 keys, "
                   "Ward tree cut and image+text tree merge, dense CRF, soft-area attention masking with global "
                   "subtraction, GPT-2 caption naming; see docs/discover.md). Lower precedence than --config, "
                   "--set and the options below.")
@click.option("--embed", type=click.Choice(["attention", "crop", "whole", "zero-guidance"]), default=None,
              show_default="attention",
              help="Segment embedding: class-row attention mask in CLIP's last layers, masked crop, the whole "
                   "image (baseline), or zero-guidance (the paper's: every query row masked by the segment's "
                   "soft area, global subtraction).")
@click.option("--cluster", type=click.Choice(["kmeans", "tree"]), default=None, show_default="kmeans",
              help="Over-segmentation: cosine k-means (--k), or the paper's cut Ward tree of DINO keys.")
@click.option("--refine-method", type=click.Choice(["bilateral", "densecrf"]), default=None,
              show_default="bilateral", help="Refinement of the segments: the bilateral solver, or the dense CRF "
                                             "(needs pydensecrf2: pip install \"namedmask[densecrf]\").")
@click.option("--namer", type=click.Choice(["vocabulary", "caption"]), default=None, show_default="vocabulary",
              help="Names: the nearest --vocabulary entry (fast), or a caption decoded by --captioner guided by "
                   "CLIP (the paper's; slow).")
@click.option("--captioner", default=None, metavar="NAME|FOLDER",
              help="--namer caption: a Hugging Face causal language model (gpt2, gpt2-medium) or a local folder.")
@click.option("--context", type=float, default=None, show_default="0.1",
              help="Factor (0..1) on the class token's attention to each patch outside the segment: 0 = the segment "
                   "only, 1 = no mask (per patch, not a total share: see README).")
@click.option("--mask-layers", type=int, default=None, show_default="3",
              help="Last CLIP blocks that get the attention mask.")
@click.option("--mask-prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Mask-prompt tokens from `namedmask adapt-clip` (with --embed crop).")
@click.option("--min-score", type=float, default=None, show_default="0.2",
              help="Cosine below which a segment gets no name.")
@click.option("--merge-threshold", type=float, default=None, show_default="0.9",
              help="Touching segments whose embeddings have at least this cosine are merged.")
@click.option("--no-refine", is_flag=True, help="No bilateral-solver refinement of the segments.")
@click.option("--device", default=None, show_default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--skip-bad", is_flag=True, help="Log, list and skip unreadable images instead of failing at the end.")
@_config_options
def discover(images, out, vocabulary, templates, model, pretrained, dino, dino_weights, random_weights, size, k, preset,
             embed, cluster, refine_method, namer, captioner, context, mask_layers, mask_prompts, min_score,
             merge_threshold, no_refine, device, skip_bad, config_path, overrides) -> None:
    """Segments and their names with no query and no class list (zero-guidance segmentation)."""
    from namedmask.config import DISCOVER_PRESETS, DiscoverConfig, load_config, parse_overrides, read_yaml

    from namedmask.stages.discover import discover as run

    if preset and preset != "default":  # defaults < preset < --config < --set < options
        base = dict(DISCOVER_PRESETS[preset])
        if config_path is not None:
            base.update(read_yaml(config_path)[0])
        base.update(parse_overrides(overrides))
        config_path, overrides = None, base
    cfg = load_config(DiscoverConfig, config_path, overrides, vocabulary=vocabulary, templates=templates, model=model,
                      pretrained=pretrained, dino=dino, dino_weights=dino_weights and str(dino_weights),
                      random_weights=_flag(random_weights), size=size, k=k, refine=False if no_refine else None,
                      embed=embed, context=context, mask_layers=mask_layers,
                      mask_prompts=mask_prompts and str(mask_prompts), min_score=min_score,
                      merge_threshold=merge_threshold, device=device, cluster=cluster, refine_method=refine_method,
                      namer=namer, captioner=captioner, skip_bad=_flag(skip_bad))
    result = run(images, out, cfg)
    n = sum(len(v) for v in result["segments"].values())
    bad = f", {result['bad']} unreadable skipped" if result["bad"] else ""
    click.echo(f"{result['done']} images segmented ({result['skipped']} already done{bad}), {n} segments -> {out}")


@cli.command("adapt-clip")
@click.option("--archive", required=True, type=click.Path(path_type=Path), help="RUN/archive (or its archive.json).")
@click.option("--masks", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The archive's refined pseudo-mask folder (manifest.json + masks/).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: mask_prompts.safetensors and adapt.json.")
@click.option("--model", default=None, show_default="ViT-L-14-336", help="open_clip model name (nm-tiny for tests).")
@click.option("--pretrained", default=None, help="open_clip tag, local checkpoint file, or 'random'.")
@click.option("--templates", default=None, show_default="namedmask", help="Prompt templates for the category words.")
@click.option("--depth", type=int, default=None, show_default="1",
              help="CLIP blocks whose blank-patch tokens are learned prompts.")
@click.option("--steps", type=int, default=None, show_default="300", help="Training steps.")
@click.option("--batch-size", type=int, default=None, show_default="32", help="Masked regions per training step.")
@click.option("--lr", type=float, default=None, show_default="2e-3", help="Learning rate of the prompt tokens.")
@click.option("--val-fraction", type=float, default=None, show_default="0.2",
              help="Share of regions held out for the accuracy report.")
@click.option("--finetune", is_flag=True, help="Also fine-tune CLIP's image tower (off: CLIP stays frozen).")
@click.option("--negatives", default=None, metavar="builtin|FILE|none", show_default="builtin",
              help="Train against this vocabulary's other nouns as negatives: give the vocabulary discover will "
                   "name with ('none': a closed choice among the categories only).")
@click.option("--device", default=None, show_default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--preset", type=click.Choice(["ovseg"]), default=None,
              help="ovseg: OVSeg's released training (depth 3; open_clip's symmetric in-batch contrastive loss "
                   "against plain nouns, logit scale learned; AdamW lr 0.05, betas 0.9/0.98, eps 1e-6, 100 warm-up "
                   "steps then cosine; ViLD templates for the accuracy report; no negatives). --set and the options "
                   "above win over it.")
@_config_options
def adapt_clip_cmd(archive, masks, out, model, pretrained, templates, depth, steps, batch_size, lr, val_fraction,
                   finetune, negatives, device, preset, config_path, overrides) -> None:
    """Mask prompt tuning: learn tokens for CLIP's blanked patches on the archive's masked regions."""
    from namedmask.config import AdaptConfig, load_config, parse_overrides
    from namedmask.stages.adapt_clip import adapt_clip

    if preset == "ovseg":
        from namedmask.models.mask_prompts import OVSEG_TRAINING

        overrides = {**OVSEG_TRAINING, **parse_overrides(overrides)}
    cfg = load_config(AdaptConfig, config_path, overrides, model=model, pretrained=pretrained, templates=templates,
                      depth=depth, steps=steps, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                      finetune=_flag(finetune), negatives=negatives, device=device)
    s = adapt_clip(archive, masks, out, cfg)
    click.echo(f"mask prompts -> {out / 'mask_prompts.safetensors'}; held-out masked-region accuracy "
               f"{s['val_accuracy_plain']} plain, {s['val_accuracy_prompts']} with prompts ({s['val']} regions)")


def main() -> None:
    cli(prog_name="namedmask")


if __name__ == "__main__":
    sys.exit(main())
