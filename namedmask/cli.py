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
@click.option("--class-names", default=None, help="Category set (e.g. voc) or names file, to label the table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write metrics JSON here.")
@click.option("--skip-bad", is_flag=True, help="Log, count and skip bad or missing pairs instead of failing.")
@click.option("--backend", default="auto", help="Kernel backend for the confusion matrix.")
def eval_cmd(pred_dir, gt_dir, run_dir, dataset, root, split, device, max_images, overlays_dir, num_classes,
             ignore_index, class_names, out, skip_bad, backend) -> None:
    """mIoU of prediction label maps against ground truth (--pred/--gt), or of a trained model
    on a dataset (--checkpoint/--dataset/--root): one dataset-level confusion matrix."""
    from namedmask.data.categories import get_category_set
    from namedmask.stages.evaluate import EvaluationError, evaluate_label_maps, write_report

    if run_dir is not None:
        from namedmask.models.deeplab import ModelError
        from namedmask.stages.evaluate import evaluate_checkpoint

        if dataset is None or root is None:
            raise click.UsageError("--checkpoint needs --dataset and --root")
        try:
            report = evaluate_checkpoint(run_dir, dataset, root, split=split, device=device, max_images=max_images,
                                         overlays_dir=overlays_dir, backend=backend)
        except (EvaluationError, ModelError, FileNotFoundError, ValueError) as exc:
            raise _Error(str(exc))
        click.echo(report.table())
        if out:
            write_report(report, out)
            click.echo(f"metrics written to {out}")
        return
    if pred_dir is None or gt_dir is None:
        raise click.UsageError("give --pred and --gt folders of index PNGs, or --checkpoint with --dataset/--root")
    names = None
    if class_names:
        try:
            names = list(get_category_set(class_names).names)
        except ValueError as exc:
            raise _Error(str(exc))
        if num_classes is None:
            num_classes = len(names)
    if num_classes is None:
        raise click.UsageError("give --num-classes (or --class-names to infer it)")
    try:
        report = evaluate_label_maps(pred_dir, gt_dir, num_classes, ignore_index, skip_bad, names, backend)
    except (EvaluationError, FileNotFoundError, ValueError) as exc:
        raise _Error(str(exc))
    click.echo(report.table())
    if out:
        write_report(report, out)
        click.echo(f"metrics written to {out}")


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
@click.option("--checkpoint", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory of a trained model.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="auto")
@click.option("--no-overlays", is_flag=True, help="Only label PNGs.")
def predict(images, run_dir, out, device, no_overlays) -> None:
    """Label PNGs (+ colour overlays with a legend) for images or folders of images."""
    from namedmask.models.deeplab import ModelError
    from namedmask.stages.predict import PredictError, predict as run

    try:
        written = run(run_dir, images, out, device=device, overlays=not no_overlays)
    except (ModelError, PredictError) as exc:
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
    """Stage (C): train binary experts per category (group) and re-predict their archives."""
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


def main() -> None:
    cli(prog_name="namedmask")


if __name__ == "__main__":
    sys.exit(main())
