"""Dataclass configs, one per stage, and RunConfig made of them: defaults (NamedMask's recipe,
docs/differences.md and the paper) ⊕ a YAML file (or a built-in config by name) ⊕ `--set key=value` overrides ⊕
command-line options, merged deeply by the one `load_config`. The resolved config is written
into every run directory, so a run can be reproduced and resumed from its folder alone."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from namedmask.errors import BadInputError
from namedmask.io import read_user_text


log = logging.getLogger(__name__)


class ConfigError(BadInputError):
    """An unknown key, a value of the wrong type or an unreadable config file. `key`: the
    (dotted) key whose value is wrong, where one is (the CLI names its option)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# Every config is checked when it is built (defaults, YAML, --set and command-line options
# alike), so a bad value fails at parse time, not hours later or silently.
MAX_CLASSES = 65536
MAX_SHORT_SIDE = 4096   # 512 is the recipe; 100000 asks for tens of GB


def _check(cfg, **rules) -> None:
    """rules: key=(lo, hi) closed bounds (None = open), for optional values too (None skipped).
    A float must also be finite."""
    for key, (lo, hi) in rules.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # a None default takes any YAML type
            raise ConfigError(f"{key} must be a number, got {value!r}", key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}", key)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
            raise ConfigError(f"{key} must be {span}, got {value}", key)


def _check_choice(cfg, key: str, choices: tuple) -> None:
    if getattr(cfg, key) not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {getattr(cfg, key)!r}", key)


def opt(default=None, help: str | None = None, *, choices: tuple | None = None, flag: str | None = None,
        flag_value=None, path: str | None = None, shown: str | None = None, factory=None,
        kw_only=dataclasses.MISSING):
    """A config field. With `help` it is also a command-line option of every command whose config
    holds it (cli.config_options builds the option from the field: its name, type, default and
    help, so a setting is written once, here). `choices`: allowed values, checked in
    __post_init__ however the value is given (flag, --set, YAML). `flag`: the option's spelling
    when it is not --<key> (e.g. --no-overlays), `flag_value`: the value such a flag sets.
    `path`: file | dir | exists (click checks it). `shown`: the default as help shows it, where
    the field's default is a placeholder (None: "the model's own")."""
    metadata = {k: v for k, v in {"help": help, "choices": choices, "flag": flag, "flag_value": flag_value,
                                  "path": path, "shown": shown}.items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, kw_only=kw_only)
    return field(default=default, metadata=metadata, kw_only=kw_only)


def choice(default, *values, help: str | None = None, **kw):
    """A field whose value must be one of `values` (the default first): checked by
    _check_choices in __post_init__ whether it comes from a flag, --set or YAML; the CLI's
    option offers the same values (it is built from this field)."""
    return opt(default, help, choices=(default, *(v for v in values if v != default)), **kw)


def like(part, key: str, default, *, shown: str | None = None):
    """`part`'s field `key` (its help, choices, spelling) with another default: one setting that
    a command defaults differently (predict's regions are masked crops, discover's attention)."""
    meta = dict({f.name: f for f in dataclasses.fields(part)}[key].metadata)
    if shown is not None:
        meta["shown"] = shown
    return field(default=default, metadata=meta, kw_only=True)


class OptionError(ConfigError):
    """Options that do not go together (the CLI shows it as a usage error, exit code 2)."""


def _check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        allowed = f.metadata.get("choices")
        if allowed is not None:
            _check_choice(cfg, f.name, allowed)


def _check_numbers(cfg, key: str, length: int | None, lo: float, hi: float, integer: bool = False) -> None:
    """A tuple of `length` (None: at least one) finite numbers in [lo, hi] (integers if asked)."""
    values = getattr(cfg, key)
    kind = "integers" if integer else "numbers"
    ok = isinstance(values, (tuple, list)) and (len(values) == length if length else len(values) >= 1) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        and (not integer or float(v).is_integer()) for v in values)
    if not ok:
        raise ConfigError(f"{key} must be {length or 'one or more'} {kind} in [{lo}, {hi}], got {values}")


def _check_range_pair(cfg, key: str, lo: float, hi: float) -> None:
    pair = getattr(cfg, key)
    if pair is None:
        return
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair) \
            or not lo <= pair[0] <= pair[1] <= hi:
        raise ConfigError(f"{key} must be two numbers lo <= hi in [{lo}, {hi}], got {pair}")


DEFAULT_CLIP = "ViT-L-14-336"               # models.clip.DEFAULT_MODEL (config imports no model code)
DEFAULT_DINO = "vit_small_patch16_224.dino"
DEVICE_HELP = "auto, cpu, cuda (cuda:LOCAL_RANK under torchrun), cuda:N."


# Parts several commands share. Their keys stay flat in each config (discover's `model`, not
# `clip.model`), so config files and recorded runs read as before; each key is declared once here.

@dataclass(kw_only=True)
class ClipPart:
    """The CLIP that retrieves, embeds or names."""
    model: str | None = opt(DEFAULT_CLIP, "open_clip model name (nm-tiny: a tiny test model).")
    pretrained: str | None = opt(None, "open_clip tag, local checkpoint file, or 'random'.",
                                 shown="the model's own: openai; random for nm-tiny")
    templates: str = opt("namedmask", "Prompt templates: namedmask (85) | vild (14) | simple | FILE.")


@dataclass(kw_only=True)
class DinoPart:
    """The DINO ViT whose keys over-segment an image."""
    dino: str | None = opt(DEFAULT_DINO, "timm name of the DINO ViT.")
    dino_weights: str | None = opt(None, "Local DINO weights (official or timm layout); else the timm hub.",
                                   path="file")
    vit_kwargs: dict | None = None          # timm construction arguments of the DINO ViT (toy models)


@dataclass(kw_only=True)
class RegionPart:
    """How an image is cut into regions by DINO keys."""
    size: int = opt(512, "Short side (px) for DINO and the solver.")
    k: int = opt(8, "Most segments per image before merging.")
    min_area: float = 0.01


@dataclass(kw_only=True)
class EmbedPart:
    """How CLIP embeds one region of an image."""
    embed: str = choice("attention", "crop", "whole", "zero-guidance",  # models.zero_guidance.EMBED_MODES
                        help="Region embedding: class-row attention mask in CLIP's last layers, masked crop, the whole "
                             "image (baseline), or zero-guidance (the paper's: every query row masked by the "
                             "segment's soft area, global subtraction).")
    context: float = opt(0.1, "Factor (0..1) on the class token's attention to each patch outside the region: 0 = "
                              "the region only, 1 = no mask (per patch, not a total share).")
    mask_layers: int | None = opt(3, "Last CLIP blocks that get the attention mask.")
    mask_prompts: str | None = opt(None, "Mask-prompt tokens from `namedmask adapt-clip` (with embed crop).",
                                   path="file")


@dataclass(kw_only=True)
class BackgroundPart:
    """When CLIP calls a pixel or region background."""
    threshold: float | None = opt(None, "Pixels (regions) whose best class probability is below this are "
                                        "background.", flag="--background-threshold")
    background: tuple = opt(("background",), "No 'background' prompt (needs a threshold).",
                            flag="--no-background-prompt", flag_value=())


@dataclass
class ArchiveConfig(ClipPart):
    """Stage (A), `namedmask build-archive`."""
    pool: str | None = opt(None, "Image folder (searched recursively) or a list file of paths relative to its folder.",
                           path="exists")
    categories: str | None = opt(None, "Category set (voc) or names file ('name | synonym, ...' lines).")
    out: str | None = opt(None, "Output folder: archive.json, embedding shards, caches; re-run with the same "
                                "arguments to resume.", path="dir")
    k: int = opt(500, "Images per category archive.")
    batch_size: int = opt(64, "Images per forward pass.")
    synonyms: str | None = opt(None, "File of 'name | synonym, synonym' lines; all names of a category are averaged.",
                               path="file")
    device: str = opt("auto", DEVICE_HELP)
    shard_size: int = opt(4096, "Images per embedding shard (the unit of resumption).")
    report: bool = opt(False, "Also write a contact sheet PNG per category to OUT/report.")

    def __post_init__(self):
        _check(self, k=(1, None), batch_size=(1, None), shard_size=(1, None))


@dataclass
class SaliencyConfig(DinoPart):
    """Stage (B), `namedmask saliency`."""
    archive: str | None = opt(None, "archive.json (or its folder).")
    out: str | None = opt(None, "Pseudo-mask folder (manifest.json + masks/); rerunning resumes it.", path="dir")
    method: str = choice("tokencut", "selfmask", help="tokencut: training-free, DINO only; selfmask: needs "
                                                      "--checkpoint.")
    refine: str = choice("bilateral-solver", "none", help="Refinement of each mask (NamedMask's bilateral-solver "
                                                          "parameters, threshold 0.5).")
    short_side: int = opt(512, "Images are resized to this short side for the model.")
    batch_size: int = opt(8, "Images decoded per step; equal sizes share a forward pass.")
    dino: str | None = like(DinoPart, "dino", None, shown="vit_small_patch16_224.dino for tokencut, "
                                                       "vit_small_patch8_224.dino for a random selfmask")
    checkpoint: str | None = opt(None, "SelfMask checkpoint (official selfmask_nq20.pt layout).", path="file")
    random_weights: bool = opt(False, "Random model weights: smoke runs only, masks are meaningless.")
    tau: float = opt(0.2, "TokenCut affinity threshold.")
    eigen_solver: str = choice("arpack", "dense")  # same eigenvector
    corner_rule: bool = False          # TokenCut: MaskCut's corner prior for frame-filling objects (not TokenCut's rule)
    device: str = opt("auto", DEVICE_HELP)
    report: bool = opt(False, "Also write report/<id>_<category>.png overlays of a few masks each.")
    report_per_category: int = 4
    vit_kwargs: dict = field(default_factory=dict, kw_only=True)  # extra timm kwargs (tiny test ViTs)
    manifest_every_s: float = 30.0     # manifest rewrite interval while running

    def __post_init__(self):
        _check_choices(self)
        _check(self, short_side=(16, MAX_SHORT_SIDE), batch_size=(1, None), manifest_every_s=(0, None),
               report_per_category=(0, None))
        if not (math.isfinite(self.tau) and 0 < self.tau <= 1):
            raise ConfigError(f"tau must be a finite number in (0, 1], got {self.tau}")


@dataclass
class RefineConfig:
    """`namedmask refine`: the fast bilateral solver over a folder of masks (sigma/lam None =
    the preset's value)."""
    images: str | None = opt(None, "Folder of images (the guides), e.g. the archive's pool root.", path="dir")
    masks: str | None = opt(None, "Folder of mask PNGs (non-zero = foreground), matched to --images by relative path "
                                  "and stem; a pseudo-mask folder (or its masks/) makes --out one too (manifest.json, "
                                  "for train --masks).", path="dir")
    out: str | None = opt(None, "Output folder: <stem>.png, 0 = background, 1 = foreground.", path="dir")
    method: str = choice("bilateral-solver", help="The refinement (the one method; `namedmask experts` is stage C).")
    preset: str = choice("namedmask", "tokencut", "tuned",  # namedmask.ops.bilateral.PRESETS
                         help="Solver parameters: namedmask 16/16/8 lam 256, tokencut 24/4/4 lam 256, tuned "
                              "(docs/stages.md).")
    sigma_spatial: float | None = opt(None, "Override the preset's spatial sigma (pixels).")
    sigma_luma: float | None = opt(None, "Override the preset's luma sigma.")
    sigma_chroma: float | None = opt(None, "Override the preset's chroma sigma.")
    lam: float | None = opt(None, "Override the preset's smoothness weight lambda.")
    threshold: float = opt(0.5, "Foreground where the soft output exceeds this.")
    backend: str = opt("auto", "Kernel backend of the solver.")
    device: str = opt("cpu", "cpu or cuda.")
    batch_size: int = 8
    overwrite: bool = opt(False, "Redo masks already in --out.")
    skip_bad: bool = opt(False, "Log and skip bad or missing pairs instead of failing at the end.")

    def __post_init__(self):
        _check_choices(self)
        _check(self, threshold=(0.0, 1.0), batch_size=(1, None), sigma_spatial=(1e-6, None),
               sigma_luma=(1e-6, None), sigma_chroma=(1e-6, None), lam=(0.0, None))


@dataclass
class ModelConfig:
    backbone: str = "resnet50"          # torchvision resnet50/101/152 (DINO-RN50 key layout) or any timm ResNet
    backbone_args: dict = field(default_factory=dict)  # extra timm arguments, e.g. channels for a tiny test net
    output_stride: int = choice(8, 16, 32)  # 8: layer3 dilation 2, layer4 dilation 4
    pretrained: str | None = None       # local backbone file in torchvision key layout (dino_resnet50_pretrain.pth)
    aspp_rates: tuple = (12, 24, 36)
    aspp_channels: int = 256
    low_level_channels: int = 48
    bn_momentum: float = 0.01           # backbone BNs only; the head's keep 0.1 (as the official code)
    dropout: float = 0.1                # after the ASPP projection
    decoder_convs: int = 1              # separable 3x3 convs after the concat: 1 = official, 2 = extra capacity

    def __post_init__(self):
        _check_choices(self)
        _check_numbers(self, "aspp_rates", None, 1, 1024, integer=True)
        _check(self, aspp_channels=(1, None), low_level_channels=(1, None), bn_momentum=(0.0, 1.0),
               dropout=(0.0, 0.999), decoder_convs=(1, None))


@dataclass
class AugmentConfig:
    crop_size: int = 384
    scale: tuple = (0.1, 1.0)           # random scale of the original size, U(lo, hi)
    hflip_p: float = 0.5
    jitter: tuple = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1   # kernel size ~ this fraction of the crop side

    def __post_init__(self):
        _check(self, crop_size=(1, None), hflip_p=(0.0, 1.0), jitter_p=(0.0, 1.0), grayscale_p=(0.0, 1.0),
               blur_p=(0.0, 1.0), blur_kernel_fraction=(0.0, 1.0))
        _check_numbers(self, "jitter", 4, 0.0, 1e6)
        if self.jitter[3] > 0.5:
            raise ConfigError(f"jitter's hue (the 4th value) must be <= 0.5, got {self.jitter[3]}")
        _check_range_pair(self, "scale", 1e-6, 1e6)
        _check_range_pair(self, "blur_sigma", 0.0, 1e6)


@dataclass
class CopyPasteConfig:
    p: float = 0.5                      # probability a sample receives pasted objects (0 = off)
    max_objects: int = 1
    scale: tuple | None = None          # beyond NamedMask: scale jitter of pasted objects
    hflip: bool = False

    def __post_init__(self):
        _check(self, p=(0.0, 1.0), max_objects=(1, None))
        _check_range_pair(self, "scale", 1e-6, 1e6)


@dataclass
class OptimConfig:
    lr_head: float = 5e-4
    lr_backbone: float = 5e-5
    weight_decay: float = 2e-4
    betas: tuple = (0.9, 0.999)
    poly_power: float = 0.9
    min_lr: float = 1e-6

    def __post_init__(self):
        _check(self, lr_head=(0.0, None), lr_backbone=(0.0, None), weight_decay=(0.0, None),
               poly_power=(0.0, None), min_lr=(0.0, None))
        _check_range_pair(self, "betas", 0.0, 0.999999)


@dataclass
class ValConfig:
    dataset: str | None = None          # voc | coco-object | coca | cityscapes-object | imagenet-s
    root: str | None = None
    split: str = "val"
    every: int = 0                      # validate every N iterations (0 = only at the end)
    max_images: int | None = None

    def __post_init__(self):
        _check(self, every=(0, None), max_images=(1, None))


@dataclass
class TextHeadConfig:
    """train.head: text (open-vocabulary NamedMask, models/openvocab.py). None = the archive's."""
    clip_model: str | None = None       # CLIP whose text space the head projects into
    clip_pretrained: str | None = None
    templates: str | None = None        # namedmask | simple | FILE
    names: str | None = None            # "name | synonym, ..." file, or a built-in set (voc: + its synonym sets)
    diversify: str = choice("sample", "mix", "none")  # sample: one name per category per iteration
    distill_weight: float = 0.0         # text-guided distillation from dense CLIP (0 = off)
    distill_vocabulary: str | None = None  # file, one word a line, added to the training names for the projection
    distill_pixels: str = choice("all", "foreground")  # foreground: the pseudo-mask's objects (worse on the toy world)
    teacher_recipe: str = choice("value", "maskclip")  # models/maskclip.py; value is the better teacher on the toy world
    teacher_short_side: int | None = None  # the teacher's input short side (None: CLIP's image size)
    # default: the options above; gkc: GKC (Han et al., ICCV 2023, models/gkc.py): per instance and
    # iteration one of the names CLIP finds on its box crop (p > gkc_threshold), and region-level
    # distillation from CLIP's embedding of the grey-filled masked crop (weight gkc_weight)
    recipe: str = choice("default", "gkc")
    gkc_threshold: float = 0.1
    gkc_weight: float = 10.0
    gkc_max_regions: int = 200          # regions distilled per batch at most (official MAX_LIST_LEN)

    def __post_init__(self):
        _check_choices(self)
        _check(self, distill_weight=(0.0, None), teacher_short_side=(16, MAX_SHORT_SIDE),
               gkc_threshold=(0.0, 1.0), gkc_weight=(0.0, None), gkc_max_regions=(1, None))
        if self.recipe == "gkc" and (self.distill_weight > 0 or self.diversify != "sample"):
            raise ConfigError("recipe gkc draws names per instance and distils regions itself: leave "
                              "diversify (sample) and distill_weight (0) at their defaults, or use recipe default")


@dataclass
class TrainConfig:
    archive: str | None = opt(None, "archive.json (or its folder).")
    masks: str | None = opt(None, "Pseudo-mask folder (manifest.json).")
    out: str | None = opt(None, "Run directory (resumed if it holds a checkpoint).")
    iterations: int = opt(20000, "Training iterations (optimizer steps).")
    batch_size: int = opt(16, "Global batch, split evenly over DDP ranks.")
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    amp: str = choice("auto", "bf16", "off")  # auto: bf16 on CUDA
    log_every: int = 50
    checkpoint_every: int = 1000
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    copy_paste: CopyPasteConfig = field(default_factory=CopyPasteConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValConfig = field(default_factory=ValConfig)
    head: str = choice("linear", "text")  # linear (closed set, NamedMask) | text (open vocabulary)
    text: TextHeadConfig = field(default_factory=TextHeadConfig)

    def __post_init__(self):
        _check_choices(self)
        _check(self, iterations=(1, None), batch_size=(1, None), num_workers=(0, None), log_every=(1, None),
               checkpoint_every=(1, None), seed=(0, None))


def expert_train_defaults() -> TrainConfig:
    """An expert (stage C): a binary segmenter, 5k iterations, batch 8, no copy-paste."""
    return TrainConfig(iterations=5000, batch_size=8, copy_paste=CopyPasteConfig(p=0.0))


@dataclass
class ExpertsConfig:
    groups: int | None = opt(None, "Number of experts (k-means over text embeddings).", shown="one per category")
    embeddings: str | None = opt(None, "File {category: text embedding} for --groups.",
                                 shown="the archive folder's text_embeddings.safetensors")
    predict_batch_size: int = 1
    # An expert whose re-predicted masks cover less than this share of the foreground of the masks
    # it learnt from has collapsed (towards background); its images then keep their input masks,
    # with a warning. 0 = off, the official behaviour (the demo sets 0.5).
    collapse_ratio: float = 0.0
    train: TrainConfig = field(default_factory=expert_train_defaults)

    def __post_init__(self):
        _check(self, groups=(1, MAX_CLASSES), predict_batch_size=(1, None), collapse_ratio=(0.0, 1.0))


@dataclass
class RunExpertsConfig(ExpertsConfig):
    """The experts stage inside `namedmask run`: off unless enabled."""
    enabled: bool = False


@dataclass
class ExpertsCommandConfig(ExpertsConfig):
    """`namedmask experts`: the stage's settings and its folders."""
    archive: str | None = opt(None, "archive.json (or its folder).", kw_only=True)
    masks: str | None = opt(None, "Saliency pseudo-mask folder to refine.", kw_only=True)
    out: str | None = opt(None, "Folder for the refined masks (same schema) and the experts.", kw_only=True)


@dataclass
class EvalConfig:
    """`namedmask eval --checkpoint`, and stage (E) inside `namedmask run` (there the dataset,
    root and split are RunConfig.eval_*)."""
    device: str = opt("auto", "With --checkpoint: auto | cpu | cuda.")
    max_images: int | None = opt(None, "With --checkpoint: score only the first N images.")
    backend: str = opt("auto", "Kernel backend for the confusion matrix.")
    num_overlays: int = 4
    ignore_unmapped: bool = opt(False, "Leave ground-truth ids no predicted class maps to unscored (counted in the "
                                       "report) instead of failing; model classes the dataset lacks score as "
                                       "background.")

    def __post_init__(self):
        _check(self, max_images=(1, None), num_overlays=(0, None))


DATASETS = "voc | coco-object | coca | cityscapes-object | imagenet-s | folder"
TEXT_HELP = ('Class names, e.g. "dog, cat|kitten, traffic light" (| = synonyms): a text-head --checkpoint or '
             'zero-shot dense CLIP labels them.')
ZERO_SHOT_PRESETS = ("maskclip: zero-shot dense CLIP as MaskCLIP's released code (recipe maskclip, short side 512, "
                     "key smoothing 1.0, prompt denoising 0.5; options given win)")


@dataclass
class EvalCommandConfig(EvalConfig):
    """`namedmask eval`: label maps against ground truth, a trained model or zero-shot CLIP on a
    dataset, or a discover folder scored as the zero-guidance paper does."""
    pred: str | None = opt(None, "Folder of predicted index PNGs (matched to --gt by file stem).", path="dir")
    gt: str | None = opt(None, "Folder of ground-truth index PNGs (palette or grayscale).", path="dir")
    checkpoint: str | None = opt(None, "Evaluate a trained model (its run folder, checkpoint.pt or model.safetensors) "
                                       "instead of prediction files.")
    dataset: str | None = opt(None, f"With --checkpoint: {DATASETS}.")
    root: str | None = opt(None, "With --checkpoint: dataset root.")
    split: str = opt("val", "With --checkpoint: dataset split.")
    overlays: str | None = opt(None, "With --checkpoint: write colour overlays of a few images here.", path="dir")
    num_classes: int | None = opt(None, "Number of classes including background.")
    ignore_index: int = opt(255, "Ground-truth value that is not scored.")
    class_names: str | None = opt(None, "Category set (e.g. voc) or names file: the classes of --pred.")
    gt_classes: str | None = opt(None, "Category set or names file of the --gt ids when they differ from "
                                       "--class-names; classes are paired by name (synonyms count).")
    out: str | None = opt(None, "Write metrics JSON here.")
    skip_bad: bool = opt(False, "Log, count and skip bad or missing pairs instead of failing.")
    zero_shot: bool = opt(False, "Score zero-shot dense CLIP (--model/--pretrained) on --dataset.")
    text_classes: str | None = opt(None, "With a text-head --checkpoint or --zero-shot: classify with these names (a "
                                         "category set or names file; alone: the dataset's own class names).",
                                   flag_value="dataset")
    text: str | None = opt(None, TEXT_HELP)
    preset: str | None = choice(None, "maskclip", help=ZERO_SHOT_PRESETS + ".")
    discover: str | None = opt(None, "Score a `namedmask discover` folder (free names) on --dataset/--root as the "
                                     "zero-guidance paper does: names matched to classes, IoU and recall over IoU "
                                     "thresholds 0-1 (docs/discover.md).", path="dir")
    discover_mode: str = choice("t-t", "i-t", help="--discover matching: t-t names to class names (sentence model, "
                                                   "else CLIP text); i-t segment image embeddings to CLIP class prompts.")
    sentence_model: str | None = opt(None, "--discover t-t: a sentence-embedding model (sentence-transformers layout, "
                                           "e.g. all-mpnet-base-v2).")
    text_threshold: float = opt(0.5, "--discover t-t: least cosine.")
    clip_threshold: float = opt(0.1, "--discover i-t: least cosine.")

    def __post_init__(self):
        super().__post_init__()
        _check_choices(self)
        _check(self, num_classes=(1, MAX_CLASSES), ignore_index=(0, MAX_CLASSES - 1), text_threshold=(-1.0, 1.0),
               clip_threshold=(-1.0, 1.0))


@dataclass
class PredictConfig:
    """`namedmask predict`, and inside `namedmask run` (there the images are
    RunConfig.predict_images)."""
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    overlays: bool = opt(True, "Only label PNGs.", flag="--no-overlays", flag_value=False)
    classes: str | None = opt(None, "Write label ids of this category set (e.g. voc) or names file, classes paired "
                                    "by name.")
    ignore_unmapped: bool = opt(False, "With --classes: model classes the set lacks become background.")
    skip_bad: bool = opt(False, "Log, list and skip unreadable images instead of failing.")


@dataclass
class PredictCommandConfig(PredictConfig):
    """`namedmask predict`: which model labels the images, and where the labels go."""
    checkpoint: str | None = opt(None, "A trained model: its run folder, checkpoint.pt or model.safetensors (or, for "
                                       "zero-shot dense CLIP, --model/--pretrained with --text).")
    out: str | None = opt(None, "Output folder: labels/<name>.png (class ids) and overlays/<name>.png.", path="dir")
    categories: str | None = opt(None, "With an official NamedMask final_model.pt as --checkpoint: the classes it "
                                       "was trained on, in order (voc, a names file, or \"a, b|synonym\").")
    text: str | None = opt(None, TEXT_HELP)
    proposals: str | None = choice(None, "discover", "segmenter",
                                   help="Two-stage open vocabulary: regions from discover's DINO over-segmentation or "
                                        "from the --checkpoint segmenter's masks, each named among --text by CLIP "
                                        "(--model/--pretrained).")
    preset: str | None = choice(None, "maskclip", "ovseg",
                                help=ZERO_SHOT_PRESETS + "; ovseg: --proposals segmenter as OVSeg's inference (14 "
                                     "ViLD templates, each region's class = argmax of segmenter^0.3 x CLIP^0.7 "
                                     "probabilities; use with --mask-prompts from `adapt-clip --preset ovseg`).")

    def __post_init__(self):
        _check_choices(self)


@dataclass
class ZeroShotConfig(ClipPart, BackgroundPart):
    """Zero-shot dense CLIP (`predict`/`eval --model M --text ...`, models.openvocab
    .zero_shot_segmenter's keyword arguments)."""
    model: str | None = like(ClipPart, "model", None, shown="none: no zero-shot")
    recipe: str = choice("value", "maskclip",
                         help="Zero-shot dense path of the last ViT block: value = the value path alone, without the "
                              "block's residual and MLP (dropping them is ClearCLIP's finding; not ClearCLIP itself); "
                              "maskclip = MaskCLIP's released code (value path + residual + MLP).")
    short_side: int | None = opt(None, "Zero-shot: CLIP input short side.", shown="CLIP's input size")
    refine: str | None = choice("none", "bilateral", None,
                                help="Zero-shot: refine the labels along image edges with the bilateral solver.")
    smooth: str = choice("none", "dino", help="Zero-shot: average each patch's scores over its DINO-key neighbours "
                                              "(needs --dino/--dino-weights).")
    dino: str | None = like(DinoPart, "dino", None, shown="vit_small_patch16_224.dino for --proposals discover")
    dino_weights: str | None = like(DinoPart, "dino_weights", None)
    key_smoothing: float | None = None      # MaskCLIP's key smoothing threshold (None: off; --preset maskclip 1.0)
    prompt_denoising: float | None = None   # MaskCLIP's prompt denoising threshold (None: off; --preset maskclip 0.5)

    def __post_init__(self):
        _check_choices(self)
        _check(self, threshold=(0.0, 1.0), short_side=(16, MAX_SHORT_SIDE), key_smoothing=(0.0, 1.0),
               prompt_denoising=(0.0, 1.0))
        if self.threshold is None and not self.background:
            raise ConfigError("no background prompt and no --background-threshold: give one")
        if self.smooth == "dino" and self.refine not in (None, "none"):
            raise ConfigError("--smooth dino and --refine bilateral are two ways to clean the scores: choose one")


@dataclass
class TwoStageConfig(ClipPart, DinoPart, RegionPart, EmbedPart, BackgroundPart):
    """`predict --proposals`: where regions come from and how CLIP names them (stages/predict.py)."""
    proposals: str = choice("discover", "segmenter")
    model: str | None = like(ClipPart, "model", None)
    embed: str = like(EmbedPart, "embed", "crop")
    random_dino: bool = opt(False, "--proposals discover: random DINO weights (smoke runs only).")
    seed: int = 0
    ensemble: float | None = None           # OVSeg: CLIP's weight in the geometric ensemble with the segmenter (0.7)

    def __post_init__(self):
        _check_choices(self)
        _check(self, threshold=(0.0, 1.0), context=(0.0, 1.0), mask_layers=(1, None), size=(16, MAX_SHORT_SIDE),
               k=(1, 255), min_area=(0.0, 1.0), seed=(0, None))
        if self.threshold is None and not self.background:
            raise ConfigError("no background prompt and no --background-threshold: give one")
        if self.mask_prompts and self.embed != "crop":
            raise ConfigError("mask_prompts work on masked crops: use embed crop (--embed crop)")
        if self.ensemble is not None and (self.proposals != "segmenter" or not 0 <= self.ensemble <= 1
                                          or self.threshold is not None):
            raise ConfigError(f"ensemble: the OVSeg ensemble (weight {self.ensemble}) needs proposals segmenter, a "
                              f"weight in [0, 1] and no --background-threshold")


@dataclass
class DiscoverConfig(ClipPart, DinoPart, RegionPart, EmbedPart):
    """`namedmask discover`: zero-guidance segmentation (stages/discover.py)."""
    vocabulary: str = opt("builtin", "'builtin' (~5,800 ImageNet-1k/21k, COCO, COCO-Stuff nouns) or a file: one name a "
                                     "line, synonyms after '|'.")
    random_weights: bool = opt(False, "Random DINO weights: smoke runs only.")
    refine: bool = opt(True, "No refinement of the segments.", flag="--no-refine", flag_value=False)
    min_score: float = opt(0.2, "Cosine below which a segment gets no name.")
    merge_threshold: float = opt(0.9, "Touching segments whose embeddings have at least this cosine are merged.")
    merge: bool = True                      # off: the over-segmentation is kept as it is (ablations)
    top: int = 3                            # runner-up names kept per segment
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    seed: int = 0
    skip_bad: bool = opt(False, "Log, list and skip unreadable images instead of failing at the end.")
    # The zero-guidance paper's pieces (issue 24; `--preset paper` sets them all, DISCOVER_PRESETS).
    cluster: str = choice("kmeans", "tree", help="Over-segmentation: cosine k-means (--k), or the paper's cut Ward tree "
                                                 "of DINO keys.")
    tree_leaves: int = 20                   # cluster tree: leaves of the top of the Ward tree
    tree_cut: float = 0.95                  # cluster tree: a node is split while its children's centroid cosine < this
    dino_stride: int | None = None          # overlapping DINO patches this many px apart (None: the patch size)
    refine_method: str = choice("bilateral", "densecrf",
                                help="Refinement of the segments: the bilateral solver, or the dense CRF (needs "
                                     "pydensecrf2: pip install \"namedmask[densecrf]\").")
    subtraction_sd: float | None = 5.0      # embed zero-guidance: global subtraction sd (None: none)
    merge_rule: str = choice("adjacent", "tree")  # adjacent (touching, same name or close) | tree (the paper's bottom-up merge)
    merge_weight: float = 0.5               # merge_rule tree: weight of the image cosine (1 - it: the names' text cosine)
    namer: str = choice("vocabulary", "caption", help="Names: the nearest --vocabulary entry (fast), or a caption "
                                                      "decoded by --captioner guided by CLIP (the paper's; slow).")
    captioner: str | None = opt(None, "--namer caption: a Hugging Face causal language model (gpt2, gpt2-medium) or "
                                      "a local folder.")
    caption_prompt: str = "Image of a"
    caption_beam: int = 5
    caption_length: int = 15                # most generated tokens

    def __post_init__(self):
        _check_choices(self)
        _check(self, size=(16, MAX_SHORT_SIDE), k=(1, 255), min_area=(0.0, 1.0), context=(0.0, 1.0),
               mask_layers=(1, None), min_score=(-1.0, 1.0), merge_threshold=(-1.0, 1.0), top=(1, None),
               seed=(0, None), tree_leaves=(2, 255), tree_cut=(-1.0, 2.0), dino_stride=(1, None),
               subtraction_sd=(0.0, None), merge_weight=(0.0, 1.0), caption_beam=(1, None), caption_length=(1, None))
        if self.mask_prompts and self.embed != "crop":
            raise ConfigError("mask_prompts work on masked crops: set embed crop (--embed crop)")
        if self.mask_layers is None and self.embed != "zero-guidance":
            raise ConfigError("mask_layers may be left empty (scaled to CLIP's depth) only with embed zero-guidance")
        if self.merge_rule == "tree" and self.cluster != "tree":
            raise ConfigError("merge_rule tree merges along the cluster tree: set cluster tree (or merge_rule adjacent)")
        if self.namer == "caption" and not self.captioner:
            raise ConfigError("namer caption needs a language model: --captioner gpt2 (a Hugging Face name or a "
                              "local folder)")


@dataclass
class DiscoverCommandConfig(DiscoverConfig):
    """`namedmask discover`: the settings, where the results go, and a preset under them."""
    out: str | None = opt(None, "Output folder: labels/, segments/, overlays/, segments.json (resumable).",
                          path="dir", kw_only=True)
    preset: str = choice("default", "paper", kw_only=True,
                         help="paper: the zero-guidance paper's method as its official code runs it (DINO ViT-S/8 "
                              "keys, Ward tree cut and image+text tree merge, dense CRF, soft-area attention masking "
                              "with global subtraction, GPT-2 caption naming; see docs/discover.md). Lower precedence "
                              "than --config, --set and the options.")


# `discover --preset NAME`: settings under the config file, --set and the command line.
# paper: nessessence/ZeroGuidanceSeg as released (run_dino_clustering.sh, run_zeroguidance.sh):
# DINO ViT-S/8 last-layer keys at 224 px, stride 2; a Ward tree of 20 leaves cut at 0.95 (the
# threshold the merge script reads); dense CRF; soft-area attention masking of every query row
# in the last 4 of 24 CLIP blocks (scaled to the depth) with global subtraction sd 5; captions
# by CLIP-guided GPT-2 decoding ("Image of a", beam 5); the bottom-up tree merge at
# 0.5 image + 0.5 text cosine >= 0.8; every segment named (no score floor).
DISCOVER_PRESETS = {
    "default": {},
    "paper": {"dino": "vit_small_patch8_224.dino", "size": 224, "dino_stride": 2, "cluster": "tree",
              "tree_leaves": 20, "tree_cut": 0.95, "refine": True, "refine_method": "densecrf",
              "embed": "zero-guidance", "mask_layers": None, "subtraction_sd": 5.0, "merge": True,
              "merge_rule": "tree", "merge_threshold": 0.8, "merge_weight": 0.5, "min_score": -1.0,
              "namer": "caption", "captioner": "gpt2-medium", "caption_prompt": "Image of a", "caption_beam": 5,
              "caption_length": 15, "model": "ViT-L-14-336"},
}


@dataclass
class AdaptConfig(ClipPart):
    """`namedmask adapt-clip`: mask prompt tuning on the archive's masked regions
    (stages/adapt_clip.py)."""
    depth: int = opt(1, "CLIP blocks whose blank-patch tokens are learned prompts.")
    steps: int = opt(300, "Training steps.")
    batch_size: int = opt(32, "Masked regions per training step.")
    lr: float = opt(2e-3, "Learning rate of the prompt tokens.")
    val_fraction: float = opt(0.2, "Share of regions held out for the accuracy report.")
    finetune: bool = opt(False, "Also fine-tune CLIP's image tower (off: CLIP stays frozen).")
    finetune_lr: float = 1e-5
    # A vocabulary ("builtin" or a names file, as discover's --vocabulary; "none": off) whose
    # entries that share no word with the categories are trained on as negatives: classes no
    # region belongs to. Without them the prompts learn a closed choice among the categories and
    # may name worse among many nouns (toy world, 280 nouns, seed 0: 0.814 plain -> 0.705 with
    # such prompts, 0.878 with negatives; README). For a short closed list of names ("none")
    # closed-set prompts can be better (seed 2: 0.961 against 0.893).
    negatives: str | None = opt("builtin", "Train against this vocabulary's other nouns as negatives (builtin | FILE "
                                           "| none): give the vocabulary discover will name with; none: a closed "
                                           "choice among the categories only.")
    seed: int = 0
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    # OVSeg's training (`--preset ovseg`, models/mask_prompts.py OVSEG_TRAINING): loss
    # "contrastive" = open_clip's symmetric in-batch loss against each region's plain noun (its
    # logit scale learned too); "ce" = cross-entropy over the categories' prompt ensembles (+ negatives).
    loss: str = choice("ce", "contrastive")
    warmup: int = 0                         # linear lr warm-up steps, then `schedule`
    schedule: str = choice("constant", "cosine")  # cosine: to 0 at the last step
    beta2: float = 0.999                    # AdamW's second-moment decay
    eps: float = 1e-8                       # AdamW's epsilon

    def __post_init__(self):
        _check(self, depth=(1, None), steps=(1, None), batch_size=(1, None), lr=(0.0, None),
               val_fraction=(0.0, 0.9), finetune_lr=(0.0, None), seed=(0, None), warmup=(0, None),
               beta2=(0.0, 1.0), eps=(0.0, None))
        _check_choices(self)
        if isinstance(self.negatives, str) and self.negatives.lower() in ("none", ""):
            self.negatives = None
        if self.loss == "contrastive" and self.negatives is not None:
            raise ConfigError("negatives belong to loss ce; the contrastive loss's negatives are the other "
                              "regions' nouns in the batch (set negatives: none)")
        if self.loss == "contrastive" and self.batch_size < 2:
            raise ConfigError("loss contrastive needs batch_size >= 2 (in-batch negatives)")


@dataclass
class AdaptCommandConfig(AdaptConfig):
    """`namedmask adapt-clip`: the settings, the archive and masks it learns from, a preset under them."""
    archive: str | None = opt(None, "RUN/archive (or its archive.json).", kw_only=True)
    masks: str | None = opt(None, "The archive's refined pseudo-mask folder (manifest.json + masks/).", path="dir",
                            kw_only=True)
    out: str | None = opt(None, "Output folder: mask_prompts.safetensors and adapt.json.", path="dir", kw_only=True)
    preset: str | None = choice(None, "ovseg", kw_only=True,
                                help="ovseg: OVSeg's released training (depth 3; open_clip's symmetric in-batch "
                                     "contrastive loss against plain nouns, logit scale learned; AdamW lr 0.05, betas "
                                     "0.9/0.98, eps 1e-6, 100 warm-up steps then cosine; ViLD templates for the "
                                     "accuracy report; no negatives). --config, --set and the options win over it.")


STAGES = ("archive", "saliency", "experts", "train", "eval", "predict")


@dataclass
class RunConfig:
    """`namedmask run`: every stage in one run directory."""
    out: str = "runs/demo"
    demo: bool = False                 # generate the built-in textured-shapes dataset into <out>/data
    pool: str | None = None            # unlabelled images to retrieve from (folder, list file, ImageNet root)
    categories: str = "voc"            # category set name or names file
    eval_dataset: str | None = None    # folder | voc | coco-object | coca | cityscapes-object | imagenet-s
    eval_root: str | None = None
    eval_split: str = "val"
    predict_images: list = field(default_factory=list)  # files or folders
    stages: list = field(default_factory=lambda: list(STAGES))
    archive: ArchiveConfig = field(default_factory=lambda: ArchiveConfig(report=True))
    saliency: SaliencyConfig = field(default_factory=lambda: SaliencyConfig(report=True))
    experts: RunExpertsConfig = field(default_factory=RunExpertsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # torch threads of every stage: auto (or null: the cores this process may use) or N. Training
    # results depend on it (docs/reproducibility.md); --threads / $NAMEDMASK_THREADS win over it.
    threads: int | str | None = None

    def __post_init__(self):
        t = self.threads
        if not (t is None or t == "auto" or (isinstance(t, int) and not isinstance(t, bool) and t >= 1)):
            raise ConfigError(f"threads: expected auto or a positive integer, got {t!r}")


@dataclass
class ToyWorldConfig:
    """`namedmask toy-world` (namedmask.toy): the generated world and the tiny CLIP and DINO trained
    on it. clip/dino: the toy trainers' settings (toy.clip.ClipTrainConfig, toy.dino.DinoTrainConfig)."""
    out: str | None = opt(None, "Folder for the world and the models (cached per seed in OUT/seed-N).", path="dir")
    seed: int = opt(0, "World and training seed.")
    size: str = choice("full", "ci", help="ci: a reduced world for tests.")
    clip: dict = field(default_factory=dict)   # ClipTrainConfig fields, e.g. --set clip.steps=50
    dino: dict = field(default_factory=dict)   # DinoTrainConfig fields (steps 0: no DINO)
    # torch threads of the two trainings: fixed (not the machine's cores) so that a seed gives the same
    # models everywhere; --threads / $NAMEDMASK_THREADS win over it (recorded in clip|dino/train.json)
    threads: int = 2

    def __post_init__(self):
        _check_choices(self)
        _check(self, seed=(0, 2 ** 32 - 1), threads=(1, None))
        for model, lowest, what in (("clip", 1, "an untrained CLIP is no model"), ("dino", 0, "0 = no DINO")):
            steps = getattr(self, model).get("steps")
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < lowest):
                raise ConfigError(f"{model} steps must be an integer >= {lowest} ({what}), got {steps!r}")

    @property
    def trains_dino(self) -> bool:
        return self.dino.get("steps", 1) > 0


@dataclass
class PrepareCocoConfig:
    """`namedmask prepare coco-object`."""
    root: str | None = opt(None, "COCO root holding <split>2017/ and annotations/instances_<split>2017.json.",
                           path="dir")
    split: str = opt("val", "COCO split (val, train).")
    out: str | None = opt(None, "Where to write the label PNGs.", path="dir",
                          shown="<root>/annotations/coco_object_<split>2017")
    overwrite: bool = opt(False, "Rebuild masks that already exist.")


@dataclass
class CheckDatasetConfig:
    """`namedmask prepare check`."""
    dataset: str | None = opt(None, DATASETS + ".")
    root: str | None = opt(None, "The dataset's root folder.")
    split: str = opt("val", "Split to check.")


def project(cfg, cls):
    """The `cls` part of a command's config (a subclass of cls): what the stage records and resumes by."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def changed_settings(old: dict, new: dict, defaults: dict, ignore=()) -> list:
    """The keys of `new` (dotted inside nested sections) whose value differs from what `old`
    recorded. A key `old` lacks, a setting added after it was written, counts as its value in
    `defaults` (the behaviour the older version had), so folders of older versions stay
    resumable while every real change is named. Used by every stage that resumes a folder."""
    changed = []
    for key, value in new.items():
        if key in ignore:
            continue
        was = old.get(key, defaults.get(key))
        if isinstance(value, dict) and isinstance(was, dict):
            changed += [f"{key}.{sub}" for sub in changed_settings(was, value, defaults.get(key) or {})]
        elif was != value:
            changed.append(key)
    return changed


def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists) fit for YAML/JSON."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def from_dict(cls, data: dict):
    """Builds dataclass `cls` from a (partial) dict; unknown keys and wrong types are errors."""
    return _update(cls(), data, "")


def _update(defaults, data: dict, where: str):
    """`defaults` with the keys of `data` replaced; nested dataclasses keep the defaults of
    their own nesting (ExpertsConfig.train keeps 5k iterations when only its batch is given)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(defaults)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{where}{key}'; valid keys: {sorted(names)}")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _update(default, value or {}, f"{where}{key}.")
            continue
        if isinstance(value, list) and not isinstance(default, list):
            value = tuple(value)
        if isinstance(default, float) and isinstance(value, str):
            try:  # YAML 1.1 reads "5e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if default is not None and value is not None:
            ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
            if not ok or (isinstance(value, bool) and not isinstance(default, bool)):
                raise ConfigError(f"config key {where}{key}: expected {type(default).__name__}, got {value!r}")
            if isinstance(default, float):
                value = float(value)
        kwargs[key] = value
    try:
        return dataclasses.replace(defaults, **kwargs)
    except ConfigError as exc:  # a value out of range (__post_init__): name its full key
        raise ConfigError(f"config key {where}{exc}", exc.key and where + exc.key) from None


def _without(base: dict, extra: dict) -> dict:
    """`base` less the keys `extra` replaces outright (nested mappings are pruned key by key)."""
    out = {}
    for key, value in base.items():
        if key in extra and isinstance(value, dict) and isinstance(extra[key], dict):
            out[key] = _without(value, extra[key])
        elif key not in extra:
            out[key] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(overrides) -> dict:
    """["optim.lr_head=1e-3", "augment.scale=[0.5,1]"] -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr_head=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: not a valid YAML value ({_yaml_problem(exc)})") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: its problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def builtin_configs() -> list:
    """Names of the run configs shipped in namedmask/configs/ (demo, voc, ...)."""
    return sorted(p.name[:-5] for p in resources.files("namedmask.configs").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path, expand: bool = True) -> tuple[dict, str]:
    """(mapping, where) of a YAML file, or of a built-in config given by name; `$VAR`s expanded
    unless `expand` is False."""
    if not Path(path).exists() and str(path) in builtin_configs():
        text = resources.files("namedmask.configs").joinpath(f"{path}.yaml").read_text()
        where = f"built-in config {str(path)!r}"
    else:
        if not Path(path).is_file():
            hint = f"; built-in configs: {', '.join(builtin_configs())}" if "/" not in str(path) else ""
            raise ConfigError(f"{path}: no such config file{hint}")
        text = read_user_text(path, ConfigError)  # like every user file: encoding errors name it
        where = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a YAML mapping at top level")
    return (expand_env(data, where) if expand else data), where


def expand_env(value, where: str):
    """`$VAR` / `${VAR}` in string values from the environment; an unset variable is an error."""
    if isinstance(value, dict):
        return {k: expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, where) for v in value]
    if isinstance(value, str) and "$" in value:
        expanded = os.path.expandvars(value)
        missing = re.findall(r"\$\{?(\w+)", expanded)
        if missing:
            raise ConfigError(f"{where}: environment variable {missing[0]} is not set (used in {value!r})")
        return expanded
    return value


# Run configs written before stage C was named `experts` (2026-12-01) still load, with a warning,
# until this date; "refine" is the bilateral step everywhere else.
OLD_RUN_CONFIGS_UNTIL = "2027-06-01"


def _migrate_run(data: dict, where: str) -> dict:
    """Run configs before stage C was named `experts`: `refine: {method: experts|none, ...}`
    and the stage name `refine` still load, with a dated warning."""
    data = dict(data)
    if "refine" in data:
        log.warning("%s: the run config section 'refine:' is deprecated and read only until %s; write 'experts:' "
                    "with 'enabled: true' instead of 'method: experts'", where, OLD_RUN_CONFIGS_UNTIL)
        old = dict(data.pop("refine") or {})
        method = old.pop("method", "none")
        if method not in ("none", "experts"):
            raise ConfigError(f"{where}: refine.method must be 'none' or 'experts', got {method!r}")
        data["experts"] = _merge({**old, "enabled": method == "experts"}, data.get("experts") or {})
    if isinstance(data.get("stages"), list) and "refine" in data["stages"]:
        log.warning("%s: stage 'refine' is now called 'experts' (the old name is read until %s)", where,
                    OLD_RUN_CONFIGS_UNTIL)
        data["stages"] = ["experts" if s == "refine" else s for s in data["stages"]]
    return data


def under_preset(preset: dict, path, overrides) -> dict:
    """A preset's settings with a config file and --set overrides on top (defaults < preset <
    --config < --set), as load_config's overrides."""
    data = dict(preset)
    if path is not None:
        data = _merge(data, read_yaml(path)[0])
    return _merge(data, parse_overrides(overrides))


def load_config(cls=TrainConfig, path: str | Path | None = None, overrides=(), **values):
    """defaults ⊕ YAML file (or built-in config name) ⊕ `overrides` (key=value strings, or a
    nested dict) ⊕ `values` (non-None keyword values), merged deeply; unknown keys and wrong
    types are ConfigErrors naming the key."""
    data, where = read_yaml(path, expand=False) if path is not None else ({}, "config")
    extra = _merge(overrides if isinstance(overrides, dict) else parse_overrides(overrides),
                   {k: v for k, v in values.items() if v is not None})
    # a `$VAR` of the file is needed only where no override replaces its key (`run --config voc
    # --pool photos/` does not need IMAGENET_TRAIN)
    data = _merge(expand_env(_without(data, extra), where), extra)
    if cls is RunConfig:
        data = _migrate_run(data, where)
        cfg = from_dict(cls, data)
        bad = [s for s in cfg.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"{where}: unknown stage(s) {bad}; stages are {list(STAGES)}")
        return cfg
    return from_dict(cls, data)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
