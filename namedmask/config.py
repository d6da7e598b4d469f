"""Dataclass configs: defaults (NamedMask's recipe, DESIGN.md §2) ⊕ a YAML file ⊕ CLI overrides
("optim.lr_head=1e-3"). The resolved config is written into every run directory, so a run can
be reproduced and resumed from its folder alone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type or an unreadable config file."""


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


@dataclass
class CopyPasteConfig:
    p: float = 0.5                      # probability a sample receives pasted objects (0 = off)
    max_objects: int = 1
    scale: tuple | None = None          # beyond NamedMask: scale jitter of pasted objects
    hflip: bool = False


@dataclass
class OptimConfig:
    lr_head: float = 5e-4
    lr_backbone: float = 5e-5
    weight_decay: float = 2e-4
    betas: tuple = (0.9, 0.999)
    poly_power: float = 0.9
    min_lr: float = 1e-6


@dataclass
class ValConfig:
    dataset: str | None = None          # voc | coco-object | coca | cityscapes-object | imagenet-s
    root: str | None = None
    split: str = "val"
    every: int = 0                      # validate every N iterations (0 = only at the end)
    max_images: int | None = None


@dataclass
class TextHeadConfig:
    """train.head: text (open-vocabulary NamedMask, stages/openvocab.py). None = the archive's."""
    clip_model: str | None = None       # CLIP whose text space the head projects into
    clip_pretrained: str | None = None
    templates: str | None = None        # namedmask | simple | FILE
    names: str | None = None            # "name | synonym, ..." file, or a built-in set (voc: + its synonym sets)
    diversify: str = "sample"           # sample (one name per category per iteration) | mix | off
    distill_weight: float = 0.0         # text-guided distillation from dense CLIP (0 = off)
    distill_vocabulary: str | None = None  # file, one word a line, added to the training names for the projection
    teacher_recipe: str = "maskclip"    # maskclip | value (models/maskclip.py)
    teacher_short_side: int | None = None  # the teacher's input short side (None: CLIP's image size)


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


def expert_train_defaults() -> TrainConfig:
    """An expert (stage C): a binary segmenter, 5k iterations, batch 8, no copy-paste."""
    return TrainConfig(iterations=5000, batch_size=8, copy_paste=CopyPasteConfig(p=0.0))


@dataclass
class ExpertsConfig:
    groups: int | None = None           # None: one expert per category; N: k-means over text embeddings
    embeddings: str | None = None       # safetensors/.pt file {category name: text embedding} for grouping
    predict_batch_size: int = 1
    train: TrainConfig = field(default_factory=expert_train_defaults)


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
        if isinstance(value, list):
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
    return dataclasses.replace(defaults, **kwargs)


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


def load_config(cls=TrainConfig, path: str | Path | None = None, overrides=(), **values):
    """defaults ⊕ YAML file ⊕ `overrides` (key=value strings) ⊕ `values` (non-None keyword values)."""
    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at top level")
        data = loaded
    data = _merge(data, parse_overrides(overrides))
    data = _merge(data, {k: v for k, v in values.items() if v is not None})
    return from_dict(cls, data)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
