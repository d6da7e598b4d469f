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
@click.option("--num-classes", type=int, help="Number of classes including background.")
@click.option("--ignore-index", type=int, default=255, help="Ground-truth value that is not scored.")
@click.option("--class-names", default=None, help="Category set (e.g. voc) or names file, to label the table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write metrics JSON here.")
@click.option("--skip-bad", is_flag=True, help="Log, count and skip bad or missing pairs instead of failing.")
@click.option("--backend", default="auto", help="Kernel backend for the confusion matrix.")
def eval_cmd(pred_dir, gt_dir, num_classes, ignore_index, class_names, out, skip_bad, backend) -> None:
    """mIoU of prediction label maps against ground truth: one dataset-level confusion matrix."""
    from namedmask.data.categories import get_category_set
    from namedmask.stages.evaluate import EvaluationError, evaluate_label_maps, write_report

    if pred_dir is None or gt_dir is None:
        raise click.UsageError("give --pred and --gt folders of index PNGs")
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


@cli.command()
@click.option("--method", type=click.Choice(["bilateral-solver"]), default="bilateral-solver",
              help="Refinement method.")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of images (the guides).")
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
def refine(method, images_dir, masks_dir, out_dir, preset, sigma_spatial, sigma_luma, sigma_chroma, lam, threshold,
           device, backend, overwrite, skip_bad) -> None:
    """Refine a folder of masks along image edges (resumable: finished masks are skipped)."""
    from namedmask.stages.refine import RefineError, refine_folder

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
