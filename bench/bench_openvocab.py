"""Open vocabulary on the toy world (namedmask.toy.world, its tiny trained CLIP):

- zero-shot dense CLIP (MaskCLIP, both dense recipes, background by a "background" prompt or a
  0.5 probability threshold, with and without the DINO-key refinement by the toy DINO) on
  eval/multi and on a pool dev split (200 pool images with their generated masks, ten names:
  where the default recipe was chosen), beside all-background and random-weight CLIP;
- NamedMask closed-set vs the text head trained with the names "name | first synonym"
  (diversification: one of the two per iteration), scored with its own text (the ensemble of
  both training names, stored in the checkpoint), with the first name alone, and with
  the second synonym, which no segmenter ever trained with (the tiny CLIP saw it in captions);
  the same with diversification off (trained with the name alone);
- held-out categories (kite, arrow: in CLIP's captions, not in NamedMask's list): a generated
  multi-object split of all ten categories, scored with all ten names, distillation on vs off
  (teacher: the default value recipe, and MaskCLIP's) vs zero-shot dense CLIP (mIoU of the 11
  classes and mean IoU of the two held-out ones);
- speed: per-image inference of the open segmenter vs a two-stage method that runs CLIP's image
  encoder on every predicted region (masked crop), on the same images;
- the MaskCLIP preset (part "maskclip"): `--preset maskclip` (recipe maskclip, short side 512,
  key smoothing 1.0, prompt denoising 0.5), the same at CLIP's own input size, and its two
  refinements on the default recipe, beside the default (value, CLIP's size), with the
  "background" prompt (a threshold does not apply to smoothed scores); mIoU as MaskCLIP reports it.

Every segmenter trains on the same archive and pseudo-masks (the toy pipeline's archive and
saliency stages; experts are skipped to save time). Nothing is tuned on the evaluation sets:
the zero-shot variants are a fixed, fully reported grid.

Environment: NAMEDMASK_TOY_ROOT (a built `namedmask toy-world` seed folder: world/, clip/),
NAMEDMASK_OPENVOCAB_DATA (a folder with archive/archive.json and saliency/ masks of that world;
default <out>/data, built with the stages when missing), NAMEDMASK_OPENVOCAB_ITERS
(training iterations, default 400 as the toy run.yaml), NAMEDMASK_OPENVOCAB_OUT (where runs and
generated splits go; default <root>/openvocab), NAMEDMASK_OPENVOCAB_VARIANTS (the training
variants to run, separated by "|", e.g. "closed set|text head, diversified|text head, GKC"; default
all), NAMEDMASK_OPENVOCAB_TRAIN_SEED (the training seed; default the world's run.yaml) and
NAMEDMASK_OPENVOCAB_PARTS.

"text head, GKC" is the recipe gkc (models/gkc.py) with the same names file as "text head,
diversified": per instance and iteration one of the names CLIP keeps on its box crop, and
region distillation against the tiny CLIP's embedding of the grey-filled masked crop."""
from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import Row

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 1000          # the generated open split's RNG: distinct from every world split


def _row(metric: str, variant: str, split: str, value: float, seconds: float = 0.0, **extra) -> Row:
    print(f"  {metric} | {variant} | {split}: {value:.3f} ({seconds:.1f} s) {extra}", flush=True)  # progress
    return Row(f"openvocab {metric}", variant, split, seconds, None, None,
               {"value": f"{value:.3f}", **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in extra.items()}})


def _toy_root() -> Path:
    if os.environ.get("NAMEDMASK_TOY_ROOT"):
        return Path(os.environ["NAMEDMASK_TOY_ROOT"])
    from namedmask.toy import ToyWorldConfig, build_toy_world

    return build_toy_world(ToyWorldConfig(str(REPO / "runs" / "toy"), int(os.environ.get("NAMEDMASK_TOY_SEED", "0"))))


def _archive_and_masks(root: Path, data: Path) -> tuple[Path, Path]:
    """The toy pipeline's archive and saliency masks (built once, from root/run.yaml)."""
    archive, masks = data / "archive" / "archive.json", data / "saliency"
    if archive.is_file() and (masks / "manifest.json").is_file():
        return archive, masks
    import yaml

    from namedmask.stages.archive import ArchiveConfig, build_archive
    from namedmask.stages.saliency import SaliencyConfig, run_saliency

    cfg = yaml.safe_load((root / "run.yaml").read_text())
    build_archive(ArchiveConfig(pool=cfg["pool"], categories=cfg["categories"], out=str(data / "archive"),
                                **cfg["archive"]), progress=False)
    run_saliency(SaliencyConfig(archive=str(archive), out=str(masks), **cfg["saliency"]))
    return archive, masks


def _write_open_split(folder: Path, count: int = 96) -> Path:
    """Multi-object scenes (2-3 objects) of all ten categories; label ids in CATEGORIES order."""
    import numpy as np

    from namedmask import io
    from namedmask.toy import world as tw
    from namedmask.data.categories import voc_palette

    if (folder / "done").is_file():
        return folder
    rng = np.random.default_rng([0, HELD_OUT_SEED])
    ids = {c.name: i + 1 for i, c in enumerate(tw.CATEGORIES)}
    for i in range(count):
        cats = [tw.CATEGORIES[j] for j in rng.choice(len(tw.CATEGORIES), size=int(rng.choice([2, 3])), replace=False)]
        img, lab = tw.render(rng, cats, (0.3, 0.5))
        lut = np.zeros(256, np.uint8)
        for k, c in enumerate(cats):
            lut[k + 1] = ids[c.name]
        io.save_png(folder / "images" / f"{i:04d}.png", img)
        io.save_png(folder / "labels" / f"{i:04d}.png", lut[lab], voc_palette())
    io.write_text(folder / "done", "")
    return folder


def _pool_dev_split(world: Path, folder: Path, count: int = 200) -> Path:
    """The first `count` pool images with their generated masks (ids 1..10 in CATEGORIES order):
    where the zero-shot options are compared, so no choice is made on eval/*. Symlinks."""
    from namedmask import io

    if (folder / "done").is_file():
        return folder
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for path in sorted((world / "pool").iterdir())[:count]:
        for sub, src in (("images", path), ("labels", world / "pool_labels" / f"{path.stem}.png")):
            link = folder / sub / src.name
            if not link.is_symlink():
                link.symlink_to(src.resolve())
    io.write_text(folder / "done", "")
    return folder


def _toy_dino(root: Path):
    """The toy world's DINO (its run.yaml's saliency settings), for the DINO-key refinement."""
    import yaml

    from namedmask.models.dino import create_dino

    sal = yaml.safe_load((root / "run.yaml").read_text())["saliency"]
    return create_dino(sal["dino"], sal["dino_weights"], **sal.get("vit_kwargs", {}))


def _score(model, names: list, folder: Path, held_out: tuple = ()) -> tuple[float, float | None]:
    """(mIoU, mean IoU of the `held_out` class names) on a folder set, the model's classes
    paired with the folder's by name."""
    import math

    from namedmask.data.datasets import FolderLabeledSet
    from namedmask.evaluation import evaluate_model

    report = evaluate_model(model, FolderLabeledSet(folder, names), names, progress=False)
    per = report.metrics.per_class_iou
    held = [per[names.index(n)] for n in held_out]
    held = [v for v in held if v is not None and not math.isnan(v)]
    return report.metrics.miou, (sum(held) / len(held) if held_out and held else None)


def _train(out: Path, archive: Path, masks: Path, root: Path, iterations: int, *extra) -> tuple[Path, float]:
    """A segmenter with the toy run.yaml's training settings (+ overrides); (run, seconds)."""
    import yaml

    from namedmask.config import TrainConfig, load_config
    from namedmask.training import train

    base = yaml.safe_load((root / "run.yaml").read_text())["train"]
    base.update(iterations=iterations, checkpoint_every=iterations, log_every=50, archive=str(archive),
                masks=str(masks), out=str(out))
    if os.environ.get("NAMEDMASK_OPENVOCAB_TRAIN_SEED"):   # training seed on the same world
        base["seed"] = int(os.environ["NAMEDMASK_OPENVOCAB_TRAIN_SEED"])
    t0 = time.perf_counter()
    train(load_config(TrainConfig, overrides=list(extra), **base), progress=False)
    return out, time.perf_counter() - t0


class _AllBackground:
    """The trivial segmenter: background everywhere (label 0)."""
    training = False

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, x):
        import torch

        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        out[:, 0] = 1
        return out


def _names_file(path: Path, lines: list) -> str:
    from namedmask import io

    io.write_text(path, "".join(lines))
    return str(path)


def _one_stage_seconds(seg, images: list) -> float:
    import torch

    from namedmask.data.augment import eval_input

    t0 = time.perf_counter()
    with torch.no_grad():
        for image in images:
            seg(eval_input(image)).argmax(1)
    return (time.perf_counter() - t0) / len(images)


def _two_stage_seconds(seg, clip, text, images: list) -> float:
    """Seconds per image of a two-stage open-vocabulary method: the segmenter proposes regions
    (its predicted labels), then CLIP's image encoder classifies each region (its pixels on a
    grey canvas, cropped to its box, resized to CLIP's input)."""
    import torch
    import torch.nn.functional as F

    from namedmask.data.augment import eval_input

    t0 = time.perf_counter()
    with torch.no_grad():
        for image in images:
            label = seg(eval_input(image)).argmax(1)[0]
            crops = []
            for c in label.unique().tolist():
                if c == 0:
                    continue
                mask = label == c
                ys, xs = torch.nonzero(mask, as_tuple=True)
                crop = torch.where(mask[..., None], image, torch.full_like(image, 128))
                crop = crop[ys.min():ys.max() + 1, xs.min():xs.max() + 1].permute(2, 0, 1)[None].float()
                crops.append(F.interpolate(crop, size=(clip.image_size,) * 2, mode="bilinear").round().to(torch.uint8))
            if crops:
                (clip.encode_images(torch.cat(crops)) @ text.T).argmax(1)
    return (time.perf_counter() - t0) / len(images)


def _maskclip_rows(root: Path, clip_file: str, dev: Path, dev_classes: list, multi: Path, named: list) -> list:
    """The zero-shot presets beside the default, on the pool dev split and eval/multi."""
    from namedmask.models.maskclip import PRESETS
    from namedmask.models.openvocab import zero_shot_segmenter

    preset = PRESETS["maskclip"]
    refine = {k: preset[k] for k in ("key_smoothing", "prompt_denoising")}
    variants = {"default (value, CLIP's size)": {},
                "recipe maskclip (CLIP's size)": {"recipe": "maskclip"},
                "--preset maskclip (short side 512)": dict(preset),
                "--preset maskclip at CLIP's size": {**preset, "short_side": None},
                "value + key smoothing + prompt denoising (CLIP's size)": refine}
    rows = []
    for variant, kw in variants.items():
        for split, folder, classes in (("pool dev (200, 10 names)", dev, dev_classes), ("eval/multi", multi, named)):
            seg, seg_names = zero_shot_segmenter(classes, "nm-toy", clip_file, **kw)
            t0 = time.perf_counter()
            miou = _score(seg, seg_names, folder)[0]
            rows.append(_row("zero-shot mIoU (presets)", variant, split, miou, time.perf_counter() - t0))
    return rows


def run() -> list:
    from namedmask.toy import world as tw
    from namedmask.data.decode import load_image
    from namedmask.models.clip import load_clip
    from namedmask.models.deeplab import load_segmenter
    from namedmask.models.maskclip import ensemble_text_embeddings
    from namedmask.models.prompts import get_templates
    from namedmask.models.openvocab import open_vocab_segmenter, zero_shot_segmenter

    from namedmask.runtime import configure_threads

    # the CLI's rule ($NAMEDMASK_THREADS, $OMP_NUM_THREADS, else the cores available; tiny trainings
    # then on one thread), not a fixed 2: two benches side by side on 2 cores ran 4 threads
    configure_threads()
    root = _toy_root()
    world, clip_file = root / "world", str(root / "clip" / "nm-toy.pt")
    out = Path(os.environ.get("NAMEDMASK_OPENVOCAB_OUT", root / "openvocab"))   # a read-only world: elsewhere
    data = Path(os.environ.get("NAMEDMASK_OPENVOCAB_DATA", out / "data"))
    iterations = int(os.environ.get("NAMEDMASK_OPENVOCAB_ITERS", "400"))
    parts = set(os.environ.get("NAMEDMASK_OPENVOCAB_PARTS", "zero,maskclip,train,held,speed").split(","))
    multi = world / "eval" / "multi"
    named = [(c.name, (c.name,)) for c in tw.NAMED]
    names = ["background"] + [c.name for c in tw.NAMED]
    everything = [(c.name, (c.name,)) for c in tw.CATEGORIES]
    rows = []
    background = _score(_AllBackground(len(names)), names, multi)[0]
    rows.append(_row("mIoU", "all-background", "eval/multi", background))

    # ---- 1. zero-shot dense CLIP (a fixed grid, all reported). The default recipe was chosen on
    # the pool (200 images, their generated masks, all ten names), never on eval/*.
    if "zero" in parts:
        dev = _pool_dev_split(root / "world", out / "pool_dev")
        dev_background = _score(_AllBackground(len(tw.CATEGORIES) + 1), ["background"] + [c.name for c in tw.CATEGORIES],
                                dev)[0]
        rows.append(_row("mIoU", "all-background", "pool dev (200, 10 names)", dev_background))
        dino = _toy_dino(root)
        grid = [(w, p, r, "none") for w, p in (("tiny CLIP", clip_file), ("random-weight CLIP", "random"))
                for r in ("value", "maskclip")] + [("tiny CLIP", clip_file, r, "dino") for r in ("value", "maskclip")]
        for weights, pretrained, recipe, refine in grid:
            for bg_name, kw in (("bg prompt", {}), ("threshold 0.5", {"background": (), "threshold": 0.5})):
                extra = {"smooth": "dino", "dino": dino} if refine == "dino" else {}
                variant = f"{weights}, {recipe}, {bg_name}" + (", DINO-key smoothing" if refine == "dino" else "")
                for split, folder, classes, ref in (("pool dev (200, 10 names)", dev, everything, dev_background),
                                                    ("eval/multi", multi, named, background)):
                    seg, seg_names = zero_shot_segmenter(classes, "nm-toy", pretrained, recipe=recipe, **kw, **extra)
                    t0 = time.perf_counter()
                    miou = _score(seg, seg_names, folder)[0]
                    rows.append(_row("zero-shot mIoU", variant, split, miou, time.perf_counter() - t0,
                                     all_background=ref))

    if "maskclip" in parts:
        rows += _maskclip_rows(root, clip_file, _pool_dev_split(root / "world", out / "pool_dev"), everything, multi,
                               named)

    # ---- 2. closed set vs text head: training names, unseen synonyms, diversification off
    runs = {}
    if parts & {"train", "held", "speed"}:
        archive, masks = _archive_and_masks(root, data)
        div = _names_file(out / "names_div.txt", [f"{c.name} | {c.synonyms[0]}\n" for c in tw.NAMED])
        single = _names_file(out / "names_single.txt", [f"{c.name}\n" for c in tw.NAMED])
        text = ["head=text", "text.templates=namedmask"]
        variants = {"closed set": (),
                    "text head, diversified": (*text, f"text.names={div}"),
                    "text head, one name": (*text, f"text.names={single}", "text.diversify=none"),
                    "text head, diversified + distillation": (*text, f"text.names={div}", "text.distill_weight=1.0"),
                    "text head, diversified + distillation 0.25": (*text, f"text.names={div}", "text.distill_weight=0.25"),
                    "text head, diversified + distillation, maskclip teacher": (
                        *text, f"text.names={div}", "text.distill_weight=1.0", "text.teacher_recipe=maskclip"),
                    "text head, GKC": (*text, f"text.names={div}", "text.recipe=gkc")}
        wanted = os.environ.get("NAMEDMASK_OPENVOCAB_VARIANTS")
        if wanted:
            variants = {n: v for n, v in variants.items() if n in wanted.split("|")}
        for name, extra in variants.items():
            folder = out / "runs" / name.replace(", ", "_").replace(" + ", "_").replace(" ", "-")
            runs[name], seconds = _train(folder, archive, masks, root, iterations, *extra)
            rows.append(_row("train", name, f"{iterations} it", 0.0, seconds))
    if "train" in parts:
        closed = float("nan")
        if "closed set" in runs:
            closed = _score(load_segmenter(runs["closed set"])[0], names, multi)[0]
            rows.append(_row("mIoU", "closed set (NamedMask)", "eval/multi", closed))
        unseen_names = [(c.name, (c.synonyms[1],)) for c in tw.NAMED]
        for name in [n for n in runs if n != "closed set"]:
            own = _score(*open_vocab_segmenter(runs[name]), multi)[0]   # its training names' ensemble, no CLIP
            seen = _score(*open_vocab_segmenter(runs[name], named), multi)[0]
            unseen = _score(*open_vocab_segmenter(runs[name], unseen_names), multi)[0]
            rows.append(_row("mIoU", name, "eval/multi, all its training names (checkpoint's text)", own,
                             closed_set=closed, target=f">= {closed - 0.02:.3f}"))
            rows.append(_row("mIoU", name, "eval/multi, training names", seen, closed_set=closed,
                             target=f">= {closed - 0.02:.3f}"))
            rows.append(_row("mIoU", name, "eval/multi, unseen synonyms", unseen,
                             ratio_to_training_names=unseen / seen if seen else float("nan"), target=">= 0.9"))

    # ---- 3. held-out categories: all ten names on a generated split of all ten categories
    if "held" in parts:
        split = _write_open_split(out / "open_split")
        for recipe in ("value", "maskclip"):
            zs, zs_names = zero_shot_segmenter(everything, "nm-toy", clip_file, recipe=recipe)
            miou, held = _score(zs, zs_names, split, tw.HELD_OUT)
            rows.append(_row("held-out mIoU", f"zero-shot dense CLIP ({recipe}, bg prompt)", "open split, 10 names",
                             miou, held_out_iou=held))
        for name in [n for n in runs if n != "closed set"]:
            miou, held = _score(*open_vocab_segmenter(runs[name], everything), split, tw.HELD_OUT)
            rows.append(_row("held-out mIoU", name, "open split, 10 names", miou, held_out_iou=held))

    # ---- 4. speed: one-stage open segmenter vs two-stage (CLIP's image encoder per region)
    if "speed" in parts:
        images = [load_image(p) for p in sorted((multi / "images").iterdir())[:32]]
        seg, _ = open_vocab_segmenter(runs["text head, diversified"], named)
        clip = load_clip("nm-toy", clip_file)
        text = ensemble_text_embeddings(clip, [w for _, w in named], get_templates("namedmask"))
        one, two = _one_stage_seconds(seg, images), _two_stage_seconds(seg, clip, text, images)
        rows.append(_row("speed s/img", "open segmenter (one stage)", "96 px, 32 imgs", one, one))
        rows.append(_row("speed s/img", "two-stage: segmenter + CLIP per region", "96 px, 32 imgs", two, two,
                         ratio_two_stage_over_one_stage=two / one))
    return rows
