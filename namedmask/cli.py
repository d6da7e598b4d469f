"""The `namedmask` command: one subcommand per pipeline stage. Each command parses its
options and calls one library function; errors become one clear line and exit code != 0."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

log = logging.getLogger("namedmask")


class _Error(click.ClickException):
    """An error the user can act on: printed without a traceback."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More logging (-v info is default, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """namedmask: segment and name objects without pixel labels (NamedMask)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


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
        click.option("--templates", default="namedmask", show_default=True,
                     help="Zero-shot prompt templates: namedmask (85) | simple | FILE."),
        click.option("--background-threshold", type=float, default=None,
                     help="Zero-shot: pixels whose best class probability is below this are background."),
        click.option("--no-background-prompt", is_flag=True, help="Zero-shot: no 'background' prompt (needs a threshold)."),
        click.option("--recipe", type=click.Choice(["maskclip", "value"]), default="maskclip", show_default=True,
                     help="Zero-shot dense path of the last ViT block (maskclip keeps residual + MLP)."),
        click.option("--short-side", type=int, default=None, help="Zero-shot: CLIP input short side (default: its size)."),
        click.option("--refine", type=click.Choice(["none", "bilateral"]), default="none", show_default=True,
                     help="Zero-shot: refine the labels with the bilateral solver."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _zero_shot_settings(run_dir, text, *, model, pretrained, templates, background_threshold, no_background_prompt,
                        recipe, short_side, refine) -> dict | None:
    """zero_shot_segmenter's keyword arguments when --model asks for zero-shot, else None."""
    if model is None:
        return None
    if run_dir is not None:
        raise click.UsageError("give --checkpoint (a trained run) or --model (zero-shot dense CLIP), not both")
    if not text:
        raise click.UsageError("zero-shot dense CLIP needs class names: --text \"a, b|synonym\" (predict) "
                               "or --zero-shot --dataset (eval)")
    return {"model": model, "pretrained": pretrained, "templates": templates, "threshold": background_threshold,
            "background": () if no_background_prompt else ("background",), "recipe": recipe,
            "short_side": short_side, "refine": refine}


@cli.command("eval")
@click.option("--pred", "pred_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of predicted index PNGs (matched to --gt by file stem).")
@click.option("--gt", "gt_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of ground-truth index PNGs (palette or grayscale).")
@click.option("--checkpoint", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Evaluate a trained model (its run directory) instead of prediction files.")
@click.option("--dataset", default=None,
              help="With --checkpoint: voc | coco-object | coca | cityscapes-object | imagenet-s | folder.")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="With --checkpoint: dataset root.")
@click.option("--split", default="val", help="With --checkpoint: dataset split.")
@click.option("--device", default="auto", help="With --checkpoint: auto | cpu | cuda.")
@click.option("--max-images", type=int, default=None, help="With --checkpoint: score only the first N images.")
@click.option("--overlays", "overlays_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --checkpoint: write colour overlays of a few images here.")
@click.option("--num-classes", type=int, help="Number of classes including background.")
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
@click.option("--backend", default="auto", help="Kernel backend for the confusion matrix.")
@click.option("--zero-shot", is_flag=True, help="Score zero-shot dense CLIP (--model/--pretrained) on --dataset.")
@click.option("--text-classes", default=None, is_flag=False, flag_value="dataset",
              help="With a text-head --checkpoint or --zero-shot: classify with these names (a category set or "
                   "names file; alone: the dataset's own class names).")
@_open_vocab_options
def eval_cmd(pred_dir, gt_dir, run_dir, dataset, root, split, device, max_images, overlays_dir, num_classes,
             ignore_index, class_names, gt_classes, ignore_unmapped, out, skip_bad, backend, zero_shot, text_classes,
             text, **zs_options) -> None:
    """mIoU of prediction label maps against ground truth (--pred/--gt), or of a trained model
    on a dataset (--checkpoint/--dataset/--root): one dataset-level confusion matrix."""
    from namedmask.data.categories import get_category_set
    from namedmask.stages.evaluate import EvaluationError, evaluate_label_maps, write_report

    if zero_shot and zs_options["model"] is None:
        raise click.UsageError("--zero-shot needs --model (an open_clip model name) and usually --pretrained")
    zs = _zero_shot_settings(run_dir, text or ("dataset" if zero_shot else None), **zs_options)
    if run_dir is not None or zs is not None:
        from namedmask.models.deeplab import ModelError
        from namedmask.stages.evaluate import evaluate_checkpoint
        from namedmask.models.clip import WeightsUnavailableError
        from namedmask.stages.openvocab import evaluate_open

        if dataset is None or root is None:
            raise click.UsageError("--checkpoint / --zero-shot need --dataset and --root")
        try:
            if zs is not None or text or text_classes:
                report = evaluate_open(dataset, root, run_dir=run_dir, zero_shot=zs, text=text, class_set=text_classes,
                                       split=split, device=device, max_images=max_images, overlays_dir=overlays_dir,
                                       backend=backend, ignore_unmapped=ignore_unmapped)
            else:
                report = evaluate_checkpoint(run_dir, dataset, root, split=split, device=device,
                                             max_images=max_images, overlays_dir=overlays_dir, backend=backend,
                                             ignore_unmapped=ignore_unmapped)
        except (EvaluationError, ModelError, FileNotFoundError, ValueError, WeightsUnavailableError) as exc:
            raise _Error(str(exc))
        click.echo(report.table())
        if out:
            write_report(report, out)
            click.echo(f"metrics written to {out}")
        return
    if pred_dir is None or gt_dir is None:
        raise click.UsageError("give --pred and --gt folders of index PNGs, or --checkpoint with --dataset/--root")
    names, gt_set = None, None
    try:
        if class_names:
            names = list(get_category_set(class_names).names)
        if gt_classes:
            gt_set = get_category_set(gt_classes)
    except ValueError as exc:
        raise _Error(str(exc))
    if names and num_classes is None:
        num_classes = len(names)
    if num_classes is None:
        raise click.UsageError("give --num-classes (or --class-names to infer it)")
    try:
        report = evaluate_label_maps(pred_dir, gt_dir, num_classes, ignore_index, skip_bad, names, backend,
                                     gt_class_names=gt_set and list(gt_set.names),
                                     gt_words=gt_set and {n: gt_set.prompt_words(n) for n in gt_set.names},
                                     ignore_unmapped=ignore_unmapped)
    except (EvaluationError, FileNotFoundError, ValueError) as exc:
        raise _Error(str(exc))
    click.echo(report.table())
    if out:
        write_report(report, out)
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

    try:
        counts = prepare_coco_object(root, split, out_dir, overwrite)
    except (FileNotFoundError, ValueError) as exc:
        raise _Error(str(exc))
    click.echo(f"{counts['images']} images: {counts['written']} masks written, {counts['kept']} already there "
               f"-> {counts['out_dir']}")


@prepare.command("check")
@click.option("--dataset", required=True, help="voc, coco-object, coca, cityscapes-object or imagenet-s.")
@click.option("--root", required=True, type=click.Path(path_type=Path), help="The dataset's root folder.")
@click.option("--split", default="val", help="Split to check.")
def prepare_check_cmd(dataset, root, split) -> None:
    """Print what of a dataset's expected layout is found under --root and what is missing."""
    from namedmask.data.datasets import check_dataset

    try:
        report = check_dataset(dataset, root, split)
    except ValueError as exc:
        raise _Error(str(exc))
    click.echo(report.text())
    if not report.ok:
        sys.exit(1)


@cli.command("build-archive")
@click.option("--pool", required=True, type=click.Path(exists=True, path_type=Path),
              help="Image folder (searched recursively) or a list file of paths relative to its folder.")
@click.option("--categories", required=True, help="Category set (voc) or names file ('name | synonym, ...' lines).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: archive.json, embedding shards, caches; re-run with the same arguments to resume.")
@click.option("--model", default="ViT-L-14-336", help="open_clip model name (nm-tiny: a tiny test model).")
@click.option("--pretrained", default=None,
              help="open_clip tag, local checkpoint file, or 'random'  [default: openai; random for nm-tiny]")
@click.option("--k", type=int, default=500, help="Images per category archive.")
@click.option("--batch-size", type=int, default=64, help="Images per forward pass.")
@click.option("--templates", default="namedmask", help="Prompt templates: namedmask (85), simple, or a file.")
@click.option("--synonyms", default=None, type=click.Path(exists=True, dir_okay=False),
              help="File of 'name | synonym, synonym' lines; all names of a category are averaged.")
@click.option("--device", default="cpu", help="cpu, cuda (cuda:LOCAL_RANK under torchrun), cuda:N.")
@click.option("--shard-size", type=int, default=4096, help="Images per embedding shard (the unit of resumption).")
@click.option("--report", is_flag=True, help="Also write a contact sheet PNG per category to OUT/report.")
def build_archive_cmd(pool, categories, out, model, pretrained, k, batch_size, templates, synonyms, device,
                      shard_size, report) -> None:
    """Stage (A): CLIP retrieves the top-K pool images per category -> OUT/archive.json.
    Distributed: torchrun --nproc-per-node N -m namedmask build-archive ..."""
    from namedmask.models.clip import WeightsUnavailableError
    from namedmask.stages.archive import ArchiveBuildError, ArchiveConfig, build_archive

    config = ArchiveConfig(str(pool), categories, str(out), model, pretrained, k, batch_size, templates, synonyms,
                           device, shard_size, report)
    try:
        archive = build_archive(config)
    except (ArchiveBuildError, WeightsUnavailableError, ValueError) as exc:
        raise _Error(str(exc))
    if archive is not None:
        click.echo(f"{len(archive.categories)} archives of up to {k} images -> {out / 'archive.json'}")


@cli.command()
@click.option("--archive", required=True, type=click.Path(path_type=Path), help="archive.json (or its folder).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Pseudo-mask folder (manifest.json + masks/); rerunning resumes it.")
@click.option("--method", type=click.Choice(["tokencut", "selfmask"]), default="tokencut",
              help="tokencut: training-free, DINO only; selfmask: needs --checkpoint.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SelfMask checkpoint (official selfmask_nq20.pt layout).")
@click.option("--dino", default=None, help="timm name of the DINO ViT [default: vit_small_patch16_224.dino for tokencut, vit_small_patch8_224.dino for a --random-weights selfmask].")
@click.option("--dino-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local DINO weights (official dino_deitsmall16_pretrain.pth layout or timm); else the timm hub.")
@click.option("--refine", type=click.Choice(["bilateral-solver", "none"]), default="bilateral-solver",
              help="Refinement of each mask (NamedMask's bilateral-solver parameters, threshold 0.5).")
@click.option("--short-side", type=int, default=512, help="Images are resized to this short side for the model.")
@click.option("--batch-size", type=int, default=8, help="Images decoded per step; equal sizes share a forward pass.")
@click.option("--tau", type=float, default=0.2, help="TokenCut affinity threshold.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--random-weights", is_flag=True, help="Random model weights: smoke runs only, masks are meaningless.")
@click.option("--report", is_flag=True, help="Also write report/<id>_<category>.png overlays of a few masks each.")
def saliency(archive, out, method, checkpoint, dino, dino_weights, refine, short_side, batch_size, tau, device,
             random_weights, report) -> None:
    """Class-agnostic pseudo-masks (0/1 PNG, native size) for every archive image."""
    from namedmask.data.archive import ArchiveError
    from namedmask.data.pseudo_masks import PseudoMaskError
    from namedmask.models.dino import DinoWeightsError
    from namedmask.stages.saliency import SaliencyConfig, SaliencyError, run_saliency

    config = SaliencyConfig(str(archive), str(out), method, refine, short_side, batch_size, dino,
                            str(dino_weights) if dino_weights else None, str(checkpoint) if checkpoint else None,
                            random_weights, tau, device=device, report=report)
    try:
        result = run_saliency(config)
    except (SaliencyError, DinoWeightsError, ArchiveError, PseudoMaskError) as exc:
        raise _Error(str(exc))
    click.echo(result.summary())
    for item in result.failed:
        click.echo(f"failed: {item['path']}: {item['reason']}")


def _config_options(fn):
    """--config FILE and repeated --set key=value, shared by the training commands."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config value, e.g. --set optim.lr_head=1e-3 (repeatable).")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="YAML config file (defaults: NamedMask's recipe).")(fn)


@cli.command()
@click.option("--archive", default=None, help="archive.json (or its folder).")
@click.option("--masks", default=None, help="Pseudo-mask folder (manifest.json).")
@click.option("--out", default=None, help="Run directory (resumed if it holds a checkpoint).")
@click.option("--iterations", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Global batch, split over DDP ranks.")
@_config_options
def train(archive, masks, out, iterations, batch_size, config_path, overrides) -> None:
    """Train the DeepLabv3+ segmenter on archives + pseudo-masks (torchrun for DDP)."""
    from namedmask.config import ConfigError, TrainConfig, load_config
    from namedmask.data.archive import ArchiveError
    from namedmask.data.pseudo_masks import PseudoMaskError
    from namedmask.models.deeplab import ModelError
    from namedmask.stages.train import TrainError, train as run

    try:
        cfg = load_config(TrainConfig, config_path, overrides, archive=archive, masks=masks, out=out,
                          iterations=iterations, batch_size=batch_size)
        run_dir = run(cfg)
    except (ConfigError, ArchiveError, PseudoMaskError, ModelError, TrainError) as exc:
        raise _Error(str(exc))
    click.echo(f"trained model in {run_dir}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", "run_dir", default=None, type=click.Path(path_type=Path),
              help="Run directory of a trained model (or --model/--pretrained with --text for zero-shot).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="auto")
@click.option("--no-overlays", is_flag=True, help="Only label PNGs.")
@click.option("--classes", default=None,
              help="Write label ids of this category set (e.g. voc) or names file, classes paired by name.")
@click.option("--ignore-unmapped", is_flag=True, help="With --classes: model classes the set lacks become background.")
@_open_vocab_options
def predict(images, run_dir, out, device, no_overlays, classes, ignore_unmapped, text, **zero_shot) -> None:
    """Label PNGs (+ colour overlays with a legend) for images or folders of images."""
    from namedmask.models.deeplab import ModelError
    from namedmask.models.clip import WeightsUnavailableError
    from namedmask.stages.predict import PredictError, predict as run

    zs = _zero_shot_settings(run_dir, text, **zero_shot)
    if run_dir is None and zs is None:
        raise click.UsageError("give --checkpoint RUN, or --text with --model (zero-shot dense CLIP)")
    try:
        written = run(run_dir, images, out, device=device, overlays=not no_overlays, classes=classes,
                      ignore_unmapped=ignore_unmapped, text=text, zero_shot=zs)
    except (ModelError, PredictError, ValueError, WeightsUnavailableError) as exc:
        raise _Error(str(exc))
    click.echo(f"{len(written)} label maps written to {out / 'labels'}")


@cli.command("refine-experts")
@click.option("--archive", required=True, help="archive.json (or its folder).")
@click.option("--masks", required=True, help="Saliency pseudo-mask folder to refine.")
@click.option("--out", required=True, help="Folder for the refined masks (same schema) and the experts.")
@click.option("--groups", type=int, default=None, help="Number of experts (k-means over text embeddings); "
                                                        "default one per category.")
@click.option("--embeddings", default=None, help="File {category: text embedding} for --groups.")
@_config_options
def refine_experts(archive, masks, out, groups, embeddings, config_path, overrides) -> None:
    """Stage (C): train binary experts per category (group) and re-predict their archives
    (same as `namedmask refine --method experts`)."""
    _refine_with_experts(archive, masks, out, groups, embeddings, config_path, overrides)


def _refine_with_experts(archive, masks, out, groups, embeddings, config_path, overrides) -> None:
    from namedmask.config import ConfigError, ExpertsConfig, load_config
    from namedmask.data.archive import ArchiveError
    from namedmask.data.pseudo_masks import PseudoMaskError
    from namedmask.models.deeplab import ModelError
    from namedmask.stages.experts import refine_with_experts
    from namedmask.stages.train import TrainError

    try:
        cfg = load_config(ExpertsConfig, config_path, overrides, groups=groups, embeddings=embeddings)
        folder = refine_with_experts(archive, masks, out, cfg)
    except (ConfigError, ArchiveError, PseudoMaskError, ModelError, TrainError, ValueError) as exc:
        raise _Error(str(exc))
    click.echo(f"refined masks written to {folder}")


@cli.command()
@click.option("--config", "config", default=None,
              help="Run config: a YAML file or a built-in name (demo, voc, coco-object, coca, cityscapes-object) "
                   "[default: demo, generated data and tiny random models, no download].")
@click.option("--out", default=None, help="Run directory (overrides the config's 'out').")
@click.option("--stages", default=None, help="Comma-separated subset of: archive,saliency,refine,train,eval,predict.")
def run(config, out, stages) -> None:
    """The whole pipeline into one run directory, each stage resumable; writes index.html."""
    from namedmask.stages.pipeline import PipelineError, load_run_config, run_pipeline

    overrides = {}
    if out:
        overrides["out"] = out
    if stages:
        overrides["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        report = run_pipeline(load_run_config(config, overrides))
    except PipelineError as exc:
        raise _Error(str(exc))
    click.echo(f"report: {report}")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args) -> None:
    """Run the benchmark suite (python -m bench ARGS; needs the source checkout's bench/)."""
    import subprocess

    sys.exit(subprocess.call([sys.executable, "-m", "bench", *args]))


@cli.command()
@click.option("--method", type=click.Choice(["bilateral-solver", "experts"]), default="bilateral-solver",
              help="bilateral-solver: edge-aware smoothing of a folder of masks; experts: stage (C), "
                   "per-category segmenters re-predict an archive's pseudo-masks.")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="bilateral-solver: folder of images (the guides).")
@click.option("--archive", default=None, help="experts: archive.json (or its folder).")
@click.option("--groups", type=int, default=None, help="experts: number of experts (k-means over text "
                                                        "embeddings); default one per category.")
@click.option("--embeddings", default=None, help="experts: file {category: text embedding} for --groups "
              "[default: the archive folder's text_embeddings.safetensors].")
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of mask PNGs (non-zero = foreground), matched to --images by relative path and stem.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: <stem>.png, 0 = background, 1 = foreground.")
@click.option("--preset", type=click.Choice(["namedmask", "tokencut", "tuned"]), default="namedmask",
              help="Solver parameters: namedmask 16/16/8 lam 256, tokencut 24/4/4 lam 256, tuned (see README).")
@click.option("--sigma-spatial", type=float, default=None, help="Override the preset's spatial sigma (pixels).")
@click.option("--sigma-luma", type=float, default=None, help="Override the preset's luma sigma.")
@click.option("--sigma-chroma", type=float, default=None, help="Override the preset's chroma sigma.")
@click.option("--lam", type=float, default=None, help="Override the preset's smoothness weight lambda.")
@click.option("--threshold", type=float, default=0.5, help="Foreground where the soft output exceeds this.")
@click.option("--device", default="cpu", help="cpu or cuda.")
@click.option("--backend", default="auto", help="Kernel backend of the solver.")
@click.option("--overwrite", is_flag=True, help="Redo masks already in --out.")
@click.option("--skip-bad", is_flag=True, help="Log and skip bad or missing pairs instead of failing at the end.")
@_config_options
def refine(method, images_dir, archive, groups, embeddings, masks_dir, out_dir, preset, sigma_spatial, sigma_luma,
           sigma_chroma, lam, threshold, device, backend, overwrite, skip_bad, config_path, overrides) -> None:
    """Refine masks: along image edges (bilateral solver) or with category experts (stage C).
    Resumable: finished masks (experts) are skipped."""
    from namedmask.stages.refine import RefineError, refine_folder

    if method == "experts":
        if archive is None:
            raise click.UsageError("--method experts needs --archive (and --masks: the saliency folder)")
        return _refine_with_experts(archive, masks_dir, out_dir, groups, embeddings, config_path, overrides)
    if images_dir is None:
        raise click.UsageError("--method bilateral-solver needs --images (the guide images)")

    try:
        report = refine_folder(images_dir, masks_dir, out_dir, method=method, preset=preset,
                               sigma_spatial=sigma_spatial, sigma_luma=sigma_luma, sigma_chroma=sigma_chroma,
                               lam=lam, threshold=threshold, backend=backend, device=device, overwrite=overwrite,
                               skip_bad=skip_bad)
    except (RefineError, FileNotFoundError, ValueError) as exc:
        raise _Error(str(exc))
    click.echo(f"refined {report.refined}, already done {report.skipped_done}, skipped {len(report.failed)} "
               f"-> {out_dir}")


def main() -> None:
    cli(prog_name="namedmask")


if __name__ == "__main__":
    sys.exit(main())
