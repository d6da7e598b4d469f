"""Dataclass configs, one per stage, and RunConfig made of them: defaults (NamedMask's recipe,
DESIGN.md §2) ⊕ a YAML file (or a built-in config by name) ⊕ `--set key=value` overrides ⊕
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

from namedmask.errors import NamedMaskError


log = logging.getLogger(__name__)


class ConfigError(NamedMaskError, ValueError):
    """An unknown key, a value of the wrong type or an unreadable config file."""


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
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
            raise ConfigError(f"{key} must be {span}, got {value}")


def _check_choice(cfg, key: str, choices: tuple) -> None:
    if getattr(cfg, key) not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {getattr(cfg, key)!r}")


def _check_range_pair(cfg, key: str, lo: float, hi: float) -> None:
    pair = getattr(cfg, key)
    if pair is None:
        return
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair) \
            or not lo <= pair[0] <= pair[1] <= hi:
        raise ConfigError(f"{key} must be two numbers lo <= hi in [{lo}, {hi}], got {pair}")


@dataclass
class ArchiveConfig:
    """Stage (A), `namedmask build-archive`."""
    pool: str | None = None                 # image folder (searched recursively) or a list file
    categories: str | None = None           # a category set name (voc) or file
    out: str | None = None
    model: str = "ViT-L-14-336"             # open_clip name (models.clip.DEFAULT_MODEL)
    pretrained: str | None = None           # tag, checkpoint file, "random"; None = the model's default
    k: int = 500
    batch_size: int = 64
    templates: str = "namedmask"            # namedmask (85) | simple | FILE
    synonyms: str | None = None             # file: "name | synonym, synonym" lines
    device: str = "auto"                    # auto | cpu | cuda (cuda:LOCAL_RANK under torchrun) | cuda:N
    shard_size: int = 4096
    report: bool = False

    def __post_init__(self):
        _check(self, k=(1, None), batch_size=(1, None), shard_size=(1, None))


@dataclass
class SaliencyConfig:
    """Stage (B), `namedmask saliency`."""
    archive: str | None = None
    out: str | None = None
    method: str = "tokencut"
    refine: str = "bilateral-solver"
    short_side: int = 512
    batch_size: int = 8
    dino: str | None = None            # timm name of the DINO ViT; None = the method's default
    dino_weights: str | None = None    # local DINO checkpoint (official or timm layout), TokenCut
    checkpoint: str | None = None      # SelfMask checkpoint
    random_weights: bool = False       # smoke runs only: meaningless masks
    tau: float = 0.2
    eigen_solver: str = "arpack"      # or "dense"; same eigenvector
    corner_rule: bool = False          # TokenCut: MaskCut's corner prior for frame-filling objects (not TokenCut's rule)
    device: str = "auto"
    report: bool = False
    report_per_category: int = 4
    vit_kwargs: dict = field(default_factory=dict)  # extra timm kwargs (tiny test ViTs)
    manifest_every_s: float = 30.0     # manifest rewrite interval while running

    def __post_init__(self):
        _check(self, short_side=(16, MAX_SHORT_SIDE), batch_size=(1, None), manifest_every_s=(0, None),
               report_per_category=(0, None))
        if not (math.isfinite(self.tau) and 0 < self.tau <= 1):
            raise ConfigError(f"tau must be a finite number in (0, 1], got {self.tau}")


@dataclass
class RefineConfig:
    """`namedmask refine`: the fast bilateral solver over a folder of masks (sigma/lam None =
    the preset's value)."""
    images: str | None = None
    masks: str | None = None
    out: str | None = None
    preset: str = "namedmask"           # namedmask | tokencut | tuned
    sigma_spatial: float | None = None
    sigma_luma: float | None = None
    sigma_chroma: float | None = None
    lam: float | None = None
    threshold: float = 0.5
    backend: str = "auto"
    device: str = "cpu"
    batch_size: int = 8
    overwrite: bool = False
    skip_bad: bool = False

    def __post_init__(self):
        _check(self, threshold=(0.0, 1.0), batch_size=(1, None), sigma_spatial=(1e-6, None),
               sigma_luma=(1e-6, None), sigma_chroma=(1e-6, None), lam=(0.0, None))


@dataclass
class ModelConfig:
    backbone: str = "resnet50"          # torchvision resnet50/101/152 (DINO-RN50 key layout) or any timm ResNet
    backbone_args: dict = field(default_factory=dict)  # extra timm arguments, e.g. channels for a tiny test net
    output_stride: int = 8              # 8: layer3 dilation 2, layer4 dilation 4
    pretrained: str | None = None       # local backbone file in torchvision key layout (dino_resnet50_pretrain.pth)
    aspp_rates: tuple = (12, 24, 36)
    aspp_channels: int = 256
    low_level_channels: int = 48
    bn_momentum: float = 0.01           # backbone BNs only; the head's keep 0.1 (as the official code)
    dropout: float = 0.1                # after the ASPP projection
    decoder_convs: int = 1              # separable 3x3 convs after the concat: 1 = official, 2 = extra capacity

    def __post_init__(self):
        _check_choice(self, "output_stride", (8, 16, 32))
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
    """train.head: text (open-vocabulary NamedMask, stages/openvocab.py). None = the archive's."""
    clip_model: str | None = None       # CLIP whose text space the head projects into
    clip_pretrained: str | None = None
    templates: str | None = None        # namedmask | simple | FILE
    names: str | None = None            # "name | synonym, ..." file, or a built-in set (voc: + its synonym sets)
    diversify: str = "sample"           # sample (one name per category per iteration) | mix | none
    distill_weight: float = 0.0         # text-guided distillation from dense CLIP (0 = off)
    distill_vocabulary: str | None = None  # file, one word a line, added to the training names for the projection
    distill_pixels: str = "all"         # all | foreground (the pseudo-mask's objects; worse on the toy world)
    teacher_recipe: str = "value"       # value | maskclip (models/maskclip.py; value is the better teacher on the toy world)
    teacher_short_side: int | None = None  # the teacher's input short side (None: CLIP's image size)

    def __post_init__(self):
        _check(self, distill_weight=(0.0, None), teacher_short_side=(16, MAX_SHORT_SIDE))
        _check_choice(self, "diversify", ("sample", "mix", "none"))
        _check_choice(self, "distill_pixels", ("foreground", "all"))
        _check_choice(self, "teacher_recipe", ("value", "maskclip"))


@dataclass
class TrainConfig:
    archive: str | None = None          # archive.json (or its folder)
    masks: str | None = None            # pseudo-mask folder (manifest.json)
    out: str | None = None              # run directory
    iterations: int = 20000
    batch_size: int = 16                # global batch, split evenly over DDP ranks
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    amp: str = "auto"                   # auto (bf16 on CUDA) | bf16 | off
    log_every: int = 50
    checkpoint_every: int = 1000
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    copy_paste: CopyPasteConfig = field(default_factory=CopyPasteConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValConfig = field(default_factory=ValConfig)
    head: str = "linear"                # linear (closed set, NamedMask) | text (open vocabulary)
    text: TextHeadConfig = field(default_factory=TextHeadConfig)

    def __post_init__(self):
        _check(self, iterations=(1, None), batch_size=(1, None), num_workers=(0, None), log_every=(1, None),
               checkpoint_every=(1, None))
        _check_choice(self, "amp", ("auto", "bf16", "off"))


def expert_train_defaults() -> TrainConfig:
    """An expert (stage C): a binary segmenter, 5k iterations, batch 8, no copy-paste."""
    return TrainConfig(iterations=5000, batch_size=8, copy_paste=CopyPasteConfig(p=0.0))


@dataclass
class ExpertsConfig:
    groups: int | None = None           # None: one expert per category; N: k-means over text embeddings
    embeddings: str | None = None       # safetensors/.pt file {category name: text embedding} for grouping
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
class EvalConfig:
    """`namedmask eval --checkpoint`, and stage (E) inside `namedmask run` (there the dataset,
    root and split are RunConfig.eval_*)."""
    device: str = "auto"
    max_images: int | None = None
    backend: str = "auto"               # kernel backend of the confusion matrix
    num_overlays: int = 4
    ignore_unmapped: bool = False       # leave ground-truth ids no model class maps to unscored

    def __post_init__(self):
        _check(self, max_images=(1, None), num_overlays=(0, None))


@dataclass
class PredictConfig:
    """`namedmask predict`, and inside `namedmask run` (there the images are
    RunConfig.predict_images)."""
    device: str = "auto"
    overlays: bool = True
    classes: str | None = None          # write the label ids of this category set or names file
    ignore_unmapped: bool = False       # with classes: model classes the set lacks become background
    skip_bad: bool = False              # log, list and skip unreadable images


@dataclass
class DiscoverConfig:
    """`namedmask discover`: zero-guidance segmentation (stages/discover.py)."""
    vocabulary: str = "builtin"             # builtin | FILE ('name | synonym, ...' lines)
    templates: str = "namedmask"            # namedmask (85) | simple | FILE
    model: str = "ViT-L-14-336"             # the naming CLIP (open_clip name)
    pretrained: str | None = None
    dino: str = "vit_small_patch16_224.dino"
    dino_weights: str | None = None
    random_weights: bool = False            # random DINO (smoke runs only)
    vit_kwargs: dict | None = None          # timm construction arguments of the DINO ViT (toy models)
    size: int = 512                         # short side for DINO and the solver
    k: int = 8                              # most segments before merging (labels are a palette PNG)
    min_area: float = 0.01
    refine: bool = True
    embed: str = "attention"                # attention | crop | whole (models.zero_guidance.EMBED_MODES)
    context: float = 0.1                    # factor on the class token's attention to each outside patch
    mask_layers: int = 3
    mask_prompts: str | None = None         # tokens from `namedmask adapt-clip` (embed crop)
    min_score: float = 0.2                  # cosine below which a segment has no name
    merge_threshold: float = 0.9            # cosine of segment embeddings that merges touching segments
    merge: bool = True                      # off: the over-segmentation is kept as it is (ablations)
    top: int = 3                            # runner-up names kept per segment
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        _check_choice(self, "embed", ("attention", "crop", "whole"))
        _check(self, size=(16, MAX_SHORT_SIDE), k=(1, 255), min_area=(0.0, 1.0), context=(0.0, 1.0),
               mask_layers=(1, None), merge_threshold=(-1.0, 1.0), top=(1, None))
        if self.mask_prompts and self.embed != "crop":
            raise ConfigError("mask_prompts work on masked crops: set embed crop (--embed crop)")


@dataclass
class AdaptConfig:
    """`namedmask adapt-clip`: mask prompt tuning on the archive's masked regions
    (stages/adapt_clip.py)."""
    model: str = "ViT-L-14-336"
    pretrained: str | None = None
    templates: str = "namedmask"
    depth: int = 1                          # blocks whose blank-patch inputs are prompt tokens
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    val_fraction: float = 0.2               # share of regions held out for the accuracy report
    finetune: bool = False                  # also train CLIP's image tower (off: CLIP frozen)
    finetune_lr: float = 1e-5
    # A vocabulary ("builtin" or a names file, as discover's --vocabulary; "none": off) whose
    # entries that share no word with the categories are trained on as negatives: classes no
    # region belongs to. Without them the prompts learn a closed choice among the categories and
    # may name worse among many nouns (toy world, 280 nouns, seed 0: 0.814 plain -> 0.705 with
    # such prompts, 0.878 with negatives; README). For a short closed list of names ("none")
    # closed-set prompts can be better (seed 2: 0.961 against 0.893).
    negatives: str | None = "builtin"
    seed: int = 0
    device: str = "auto"
    # OVSeg's training (`--preset ovseg`, models/mask_prompts.py OVSEG_TRAINING): loss
    # "contrastive" = open_clip's symmetric in-batch loss against each region's plain noun (its
    # logit scale learned too); "ce" = cross-entropy over the categories' prompt ensembles (+ negatives).
    loss: str = "ce"                        # ce | contrastive
    warmup: int = 0                         # linear lr warm-up steps, then `schedule`
    schedule: str = "constant"              # constant | cosine (to 0 at the last step)
    beta2: float = 0.999                    # AdamW's second-moment decay
    eps: float = 1e-8                       # AdamW's epsilon

    def __post_init__(self):
        _check(self, depth=(1, None), steps=(1, None), batch_size=(1, None), lr=(0.0, None),
               val_fraction=(0.0, 0.9), finetune_lr=(0.0, None), warmup=(0, None), beta2=(0.0, 1.0),
               eps=(0.0, None))
        _check_choice(self, "loss", ("ce", "contrastive"))
        _check_choice(self, "schedule", ("constant", "cosine"))
        if isinstance(self.negatives, str) and self.negatives.lower() in ("none", ""):
            self.negatives = None
        if self.loss == "contrastive" and self.negatives is not None:
            raise ConfigError("negatives belong to loss ce; the contrastive loss's negatives are the other "
                              "regions' nouns in the batch (set negatives: none)")
        if self.loss == "contrastive" and self.batch_size < 2:
            raise ConfigError("loss contrastive needs batch_size >= 2 (in-batch negatives)")


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
        raise ConfigError(f"config key {where}{exc}") from None


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
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def builtin_configs() -> list:
    """Names of the run configs shipped in namedmask/configs/ (demo, voc, ...)."""
    return sorted(p.name[:-5] for p in resources.files("namedmask.configs").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> tuple[dict, str]:
    """(mapping, where) of a YAML file, or of a built-in config given by name."""
    if not Path(path).exists() and str(path) in builtin_configs():
        text = resources.files("namedmask.configs").joinpath(f"{path}.yaml").read_text()
        where = f"built-in config {str(path)!r}"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
        where = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a YAML mapping at top level")
    return expand_env(data, where), where


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


def _migrate_run(data: dict, where: str) -> dict:
    """Run configs before stage C was named `experts`: `refine: {method: experts|none, ...}`
    and the stage name `refine` still load, with a warning."""
    data = dict(data)
    if "refine" in data:
        log.warning("%s: the run config section 'refine:' is deprecated; write 'experts:' with "
                    "'enabled: true' instead of 'method: experts'", where)
        old = dict(data.pop("refine") or {})
        method = old.pop("method", "none")
        if method not in ("none", "experts"):
            raise ConfigError(f"{where}: refine.method must be 'none' or 'experts', got {method!r}")
        data["experts"] = _merge({**old, "enabled": method == "experts"}, data.get("experts") or {})
    if isinstance(data.get("stages"), list) and "refine" in data["stages"]:
        log.warning("%s: stage 'refine' is now called 'experts'", where)
        data["stages"] = ["experts" if s == "refine" else s for s in data["stages"]]
    return data


def load_config(cls=TrainConfig, path: str | Path | None = None, overrides=(), **values):
    """defaults ⊕ YAML file (or built-in config name) ⊕ `overrides` (key=value strings, or a
    nested dict) ⊕ `values` (non-None keyword values), merged deeply; unknown keys and wrong
    types are ConfigErrors naming the key."""
    data, where = read_yaml(path) if path is not None else ({}, "config")
    data = _merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    data = _merge(data, {k: v for k, v in values.items() if v is not None})
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
