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


def main() -> None:
    cli(prog_name="namedmask")


if __name__ == "__main__":
    sys.exit(main())
