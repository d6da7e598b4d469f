"""The `namedmask` command: one subcommand per pipeline stage. A command's options are built from
its typed config (config.py: each field with help is an option, its default shown from the
dataclass), so a setting is written once; `--config FILE` and `--set key=value` reach every key.
Each command calls one library function and echoes the result; errors are caught once, in the
group (cli_base.Group), and become one clear line and exit code != 0."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from namedmask import __version__, config as C
from namedmask.cli_base import Group, configured, require, set_threads, setup_logging


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
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
        set_threads(threads)
    # Log lines go above the progress bars instead of through them, while the command runs.
    ctx.with_resource(logging_redirect_tqdm())


# ------------------------------------------------------------------------------ the commands

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Versions, devices and, per op, which backends are live."""
    from namedmask import envinfo

    data = envinfo.collect()
    click.echo(json.dumps(data, indent=2) if as_json else envinfo.format_info(data))


@configured(cli, "build-archive", C.ArchiveConfig)
def build_archive(cfg, given) -> None:
    """Stage (A): CLIP retrieves the top-K pool images per category -> OUT/archive.json.
    Distributed: torchrun --nproc-per-node N -m namedmask build-archive ..."""
    from namedmask.stages.archive import build_archive as run

    require(cfg, "pool", "categories", "out")
    archive = run(cfg)
    if archive is not None:
        click.echo(f"{len(archive.categories)} archives of up to {cfg.k} images -> {Path(cfg.out) / 'archive.json'}")


@configured(cli, "saliency", C.SaliencyConfig)
def saliency(cfg, given) -> None:
    """Class-agnostic pseudo-masks (0/1 PNG, native size) for every archive image."""
    from namedmask.stages.saliency import run_saliency

    require(cfg, "archive", "out")
    result = run_saliency(cfg)
    click.echo(result.summary())
    for item in result.failed:
        click.echo(f"failed: {item['path']}: {item['reason']}")


@configured(cli, "experts", C.ExpertsCommandConfig)
def experts(cfg, given) -> None:
    """Stage (C): train a binary expert per category (or group of categories) on its archive
    and saliency masks, re-predict the archive -> refined pseudo-mask folder. Resumable."""
    from namedmask.stages.experts import refine_with_experts

    require(cfg, "archive", "masks", "out")
    folder = refine_with_experts(cfg.archive, cfg.masks, cfg.out, C.project(cfg, C.ExpertsConfig))
    click.echo(f"refined masks written to {folder}")


@configured(cli, "train", C.TrainConfig)
def train(cfg, given) -> None:
    """Train the DeepLabv3+ segmenter on archives + pseudo-masks (torchrun for DDP)."""
    from namedmask.training import train as run

    click.echo(f"trained model in {run(cfg)}")


@configured(cli, "eval", C.EvalCommandConfig, C.ZeroShotConfig)
def evaluate(cfg, given) -> None:
    """mIoU of prediction label maps against ground truth (--pred/--gt), or of a trained model
    on a dataset (--checkpoint/--dataset/--root): one dataset-level confusion matrix."""
    from namedmask import commands

    for line in commands.evaluate(cfg, given):
        click.echo(line)


@configured(cli, "predict", C.PredictCommandConfig, C.ZeroShotConfig, C.TwoStageConfig, images=True)
def predict(cfg, given, images) -> None:
    """Label PNGs (+ colour overlays with a legend) for images or folders of images."""
    from namedmask import commands

    require(cfg, "out")
    written = commands.predict(cfg, [Path(p) for p in images], given)
    click.echo(f"{len(written)} label maps written to {Path(cfg.out) / 'labels'}")


@configured(cli, "refine", C.RefineConfig)
def refine(cfg, given) -> None:
    """Refine masks along image edges with the fast bilateral solver. Resumable: finished
    masks are skipped."""
    from namedmask.stages.refine import refine_folder

    if cfg.images is None:
        raise C.OptionError("refine needs --images (the guide images)")
    require(cfg, "masks", "out")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("images", "masks", "out")}
    report = refine_folder(cfg.images, cfg.masks, cfg.out, **settings)
    click.echo(f"refined {report.refined}, already done {report.skipped_done}, skipped {len(report.failed)} "
               f"-> {cfg.out}")


@configured(cli, "discover", C.DiscoverCommandConfig, images=True, presets=C.DISCOVER_PRESETS.get)
def discover(cfg, given, images) -> None:
    """Segments and their names with no query and no class list (zero-guidance segmentation)."""
    from namedmask.stages.discover import discover as run

    require(cfg, "out")
    result = run([Path(p) for p in images], Path(cfg.out), C.project(cfg, C.DiscoverConfig))
    n = sum(len(v) for v in result["segments"].values())
    bad = f", {result['bad']} unreadable skipped" if result["bad"] else ""
    click.echo(f"{result['done']} images segmented ({result['skipped']} already done{bad}), {n} segments -> {cfg.out}")


def _adapt_preset(name: str) -> dict:
    from namedmask.models.mask_prompts import OVSEG_TRAINING

    return {"ovseg": OVSEG_TRAINING}[name]


@configured(cli, "adapt-clip", C.AdaptCommandConfig, presets=_adapt_preset)
def adapt_clip(cfg, given) -> None:
    """Mask prompt tuning: learn tokens for CLIP's blanked patches on the archive's masked regions."""
    from namedmask.stages.adapt_clip import adapt_clip as run

    require(cfg, "archive", "masks", "out")
    s = run(Path(cfg.archive), Path(cfg.masks), Path(cfg.out), C.project(cfg, C.AdaptConfig))
    click.echo(f"mask prompts -> {Path(cfg.out) / 'mask_prompts.safetensors'}; held-out masked-region accuracy "
               f"{s['val_accuracy_plain']} plain, {s['val_accuracy_prompts']} with prompts ({s['val']} regions)")


STEPS = [click.Option([f"--{m}-steps", f"{m}_steps"], type=int, default=None,
                      help=f"Tiny {m.upper()} training steps (= --set {m}.steps=N){' (0 = skip)' if m == 'dino' else ''}.")
         for m in ("clip", "dino")]


@configured(cli, "toy-world", C.ToyWorldConfig, extra=STEPS)
def toy_world(cfg, given) -> None:
    """Generated captioned scenes + a tiny CLIP and DINO trained on them (resumable, cached per
    seed); writes OUT/seed-N/run.yaml for `namedmask run --config`."""
    from namedmask.toy import build_toy_world

    require(cfg, "out")
    steps = {m: {**getattr(cfg, m), "steps": given[f"{m}_steps"]} for m in ("clip", "dino") if f"{m}_steps" in given}
    root = build_toy_world(dataclasses.replace(cfg, **steps))
    click.echo(f"toy world and models in {root}; run NamedMask on it: namedmask run --config {root / 'run.yaml'}")


PRESET_HELP = "namedmask/configs/<preset>.yaml, docs/your-photos.md [default: gpu when nvidia-smi lists a GPU, else cpu]"


@cli.command()
@click.option("--config", "config", default=None,
              help="Run config: a YAML file or a built-in name (demo, voc, coco-object, coca, cityscapes-object) "
                   "[default: demo, generated data and tiny random models, no download].")
@click.option("--pool", default=None, type=click.Path(exists=True),
              help="Your photos: a folder (searched recursively) or a list file. Trains on them and writes named "
                   "masks of every photo; with --categories and a --preset, no config file is needed.")
@click.option("--categories", default=None,
              help='What to find: "dog, cat|kitten, traffic light" (| = synonyms), a built-in set (voc) or a names file.')
@click.option("--preset", type=click.Choice(["cpu", "gpu", "paper"]), default=None,
              help="Built-in settings for --pool: cpu = about an hour on a laptop for a few hundred photos, gpu = "
                   f"about a day on one GPU, paper = NamedMask's protocol ({PRESET_HELP}).")
@click.option("--out", default=None, help="Run directory (overrides the config's 'out').")
@click.option("--stages", default=None, help="Comma-separated subset of: archive,saliency,experts,train,eval,predict.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.iterations=100 (repeatable).")
def run(config, pool, categories, preset, out, stages, overrides) -> None:
    """The whole pipeline into one run directory, each stage resumable; writes index.html."""
    from namedmask import commands

    click.echo(f"report: {commands.run(config, pool, categories, preset, out, stages, overrides)}")


@cli.command()
@click.option("--preset", type=click.Choice(["cpu", "gpu", "paper"]), default=None,
              help=f"The preset whose models to list ({PRESET_HELP}).")
@click.option("--config", "config", default=None, help="Or a run config (YAML file or built-in name).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config values as `run` takes them, e.g. --set saliency.dino_weights=FILE (repeatable).")
def weights(preset, config, overrides) -> None:
    """Every pretrained model a run needs: present (and where), or missing (where namedmask looked,
    the URL, and the option or config key that takes the file). Exit code 1 when one is missing."""
    from namedmask import commands

    lines, missing = commands.weights(preset, config, overrides)
    for line in lines:
        click.echo(line)
    if missing:
        sys.exit(1)


@cli.group("config")
def config_group() -> None:
    """Inspect configs."""


CONFIG_KINDS = {"run": "RunConfig", "train": "TrainConfig", "experts": "ExpertsCommandConfig",
                "build-archive": "ArchiveConfig", "saliency": "SaliencyConfig", "refine": "RefineConfig",
                "eval": "EvalCommandConfig", "predict": "PredictCommandConfig", "discover": "DiscoverCommandConfig",
                "adapt-clip": "AdaptCommandConfig", "toy-world": "ToyWorldConfig"}


@config_group.command("show")
@click.option("--config", "config_path", default=None,
              help="YAML file (or, for run, a built-in name) to resolve [default: the defaults; for run: demo].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value (repeatable).")
@click.option("--for", "kind", type=click.Choice(sorted(CONFIG_KINDS)), default="run", help="Which command's config.")
def config_show(config_path, overrides, kind) -> None:
    """Print the resolved config (defaults ⊕ --config ⊕ --set) as YAML."""
    if kind == "run":
        from namedmask.pipeline import load_run_config

        cfg = load_run_config(config_path, list(overrides))
    else:
        cfg = C.load_config(getattr(C, CONFIG_KINDS[kind]), config_path, overrides)
    click.echo(C.dump_yaml(cfg), nl=False)


@cli.group()
def prepare() -> None:
    """Prepare and check evaluation datasets."""


@configured(prepare, "coco-object", C.PrepareCocoConfig)
def prepare_coco_object(cfg, given) -> None:
    """Build the 81-id COCO-Object label PNGs from the instances json (crowd -> 255,
    overlapping instances: the smaller wins). Resumable."""
    from namedmask.data.coco import prepare_coco_object as run

    require(cfg, "root")
    counts = run(Path(cfg.root), cfg.split, cfg.out and Path(cfg.out), cfg.overwrite)
    click.echo(f"{counts['images']} images: {counts['written']} masks written, {counts['kept']} already there "
               f"-> {counts['out_dir']}")


@configured(prepare, "check", C.CheckDatasetConfig)
def prepare_check(cfg, given) -> None:
    """Print what of a dataset's expected layout is found under --root and what is missing."""
    from namedmask.data.datasets import check_dataset

    require(cfg, "dataset", "root")
    report = check_dataset(cfg.dataset, Path(cfg.root), cfg.split)
    click.echo(report.text())
    if not report.ok:
        sys.exit(1)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args) -> None:
    """Run the benchmark suite (python -m bench ARGS; needs the source checkout's bench/)."""
    import subprocess

    sys.exit(subprocess.call([sys.executable, "-m", "bench", *args]))


def main() -> None:
    cli(prog_name="namedmask")


if __name__ == "__main__":
    sys.exit(main())
