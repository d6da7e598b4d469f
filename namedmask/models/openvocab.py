"""Open vocabulary: the segmenters that answer any text.

- `zero_shot_segmenter`: dense CLIP (MaskCLIP, models/maskclip.py), no training.
- `TextObjective`: what `train.head: text` adds to training (namedmask/training.py): the
  TextDeepLabV3Plus model, per-iteration text diversification, and the optional text-guided
  distillation from the frozen dense CLIP (computed on the augmented crop each iteration).
- `open_vocab_segmenter`: a trained text-head run bound to new names (its CLIP's text tower
  embeds them; no CLIP image encoder runs).

Both segmenters are nn.Modules taking ImageNet-normalised images, so eval and predict score
and write them exactly like a closed-set checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from namedmask.config import TextHeadConfig, ZeroShotConfig
from namedmask.data.archive import load_archive
from namedmask.data.augment import IGNORE
from namedmask.data.categories import BUILTIN_SYNONYMS, get_category_set
from namedmask.data.classmap import category_words
from namedmask.errors import BadInputError
from namedmask.io import read_user_text
from namedmask.models.clip import load_clip
from namedmask.models.deeplab import (OpenVocabSegmenter, TextDeepLabV3Plus, load_backbone_weights,
                                      load_segmenter)
from namedmask.models.dino import create_dino
from namedmask.models.gkc import InstanceCache, distillation_loss, draw_names, image_classes, region_embeddings
from namedmask.models.maskclip import MaskClipSegmenter, class_text, ensemble_text_embeddings, parse_text_classes
from namedmask.models.prompts import get_templates
from namedmask.models.text_head import DenseTeacher, TextBank, foreground_pixels, text_distillation_loss

log = logging.getLogger(__name__)

BACKGROUND_WORDS = ("background",)
GKC_CACHE = "gkc.safetensors"   # in the run directory (models/gkc.py InstanceCache)


class OpenVocabError(BadInputError):
    """A text option, class list or run that the open-vocabulary path cannot use."""


def text_classes(text: str | None = None, categories: str | None = None) -> list:
    """Foreground classes as (display name, words to prompt): from --text ("dog, cat|kitten":
    the first word names the class) or a category set / names file (its display name; its
    prompt name and synonyms)."""
    if bool(text) == bool(categories):
        raise OpenVocabError("give the classes either as --text \"a, b|synonym\" or as a category set / names file")
    if text:
        return [(ws[0], ws) for ws in parse_text_classes(text)]
    cats = get_category_set(categories)
    return [(n, tuple(cats.prompt_words(n))) for n in cats.names[1:]]


def zero_shot_segmenter(classes: list, model: str, pretrained: str | None = None, *, templates: str = "namedmask",
                        background: tuple = BACKGROUND_WORDS, threshold: float | None = None,
                        short_side: int | None = None, refine: str | None = None, smooth: str = "none",
                        recipe: str = "value", dino=None, dino_weights: str | None = None, device="cpu",
                        key_smoothing: float | None = None,
                        prompt_denoising: float | None = None) -> tuple[MaskClipSegmenter, list]:
    """(segmenter, class names with 'background' first). `classes`: (name, words) pairs.
    refine "bilateral": the bilateral solver along image edges; smooth "dino": scores averaged
    over DINO-key neighbours, `dino` a DINO ViT module or a timm name loaded with `dino_weights`.
    key_smoothing / prompt_denoising: MaskCLIP's thresholds (models.maskclip; None = off).
    The settings are checked as config.ZeroShotConfig (short side capped like saliency's, ...)."""
    ZeroShotConfig(model=model, pretrained=pretrained, templates=templates, threshold=threshold,
                   background=tuple(background), recipe=recipe, short_side=short_side, refine=refine, smooth=smooth,
                   key_smoothing=key_smoothing, prompt_denoising=prompt_denoising)
    if smooth == "dino":
        if dino is None:
            raise OpenVocabError("--smooth dino needs --dino (a timm DINO name) and --dino-weights (its file)")
        if isinstance(dino, str):
            dino = create_dino(dino, dino_weights).to(device)
        refine = "dino"  # MaskClipSegmenter's one post-processing slot
    elif dino is not None or dino_weights is not None:
        raise OpenVocabError("--dino/--dino-weights are only used by --smooth dino")
    clip = load_clip(model, pretrained, device)
    text, bg = class_text(clip, classes, background, get_templates(templates))  # buffers: seg.to(device) moves them
    seg = MaskClipSegmenter(clip, text, bg, threshold=threshold, short_side=short_side, refine=refine, recipe=recipe,
                            dino=dino, key_smoothing=key_smoothing, prompt_denoising=prompt_denoising)
    return seg.to(device).eval(), ["background"] + [name for name, _ in classes]


def open_vocab_segmenter(run_dir, classes: list | None = None, device="cpu") -> tuple[torch.nn.Module, list]:
    """A trained text-head run; with `classes` bound to those names (embedded by the run's
    CLIP text tower and templates), else its own training classes."""
    model, meta = load_segmenter(run_dir, device)
    if meta.get("head") != "text":
        raise OpenVocabError(f"{run_dir}: a closed-set run (its classifier knows only {meta['class_names'][1:4]}...); "
                             f"new names need a run trained with train.head: text, or zero-shot dense CLIP: predict "
                             f"--text ... --model M --pretrained P without --checkpoint, eval --zero-shot --model M "
                             f"--pretrained P, Python namedmask.load(zero_shot='M/P')")
    if classes is None:
        return model, meta["class_names"]
    clip = load_clip(meta["clip"]["name"], meta["clip"]["pretrained"], device)
    text = ensemble_text_embeddings(clip, [words for _, words in classes], tuple(meta["templates"])).to(device)
    return OpenVocabSegmenter(model, text).eval(), ["background"] + [name for name, _ in classes]


class TextObjective:
    """train.head: text. Everything left None in `cfg` comes from the archive: its CLIP, its
    templates and the words each category was retrieved with."""

    def __init__(self, cfg: TextHeadConfig, archive_path, class_names: list, device):
        archive = load_archive(archive_path)
        model_meta = archive.meta.get("model", {})
        name = cfg.clip_model or model_meta.get("name")
        pretrained = cfg.clip_pretrained or model_meta.get("pretrained")
        if not name:
            raise OpenVocabError(f"{archive_path}: records no CLIP model; set train.text.clip_model")
        self.clip = load_clip(name, pretrained, device)
        self.templates = (get_templates(cfg.templates) if cfg.templates
                          else tuple(archive.meta.get("templates", {}).get("templates") or get_templates("namedmask")))
        self.words = self._words(cfg, archive, class_names)
        if all(len(w) == 1 for w in self.words) and (cfg.recipe == "gkc" or cfg.diversify != "none"):
            log.warning("train.text: every category has a single name, so text diversification does nothing; give "
                        "train.text.names a 'name | synonym, ...' file or a built-in set (%s)", ", ".join(BUILTIN_SYNONYMS))
        self.bank = TextBank.from_words(self.clip, self.words, self.templates, cfg.diversify)
        self.recipe, self.cache, self.seed = cfg.recipe, None, 0
        if self.recipe == "gkc":
            self.flat_words = [w for ws in self.words for w in ws]
            self.row_of = {}
            for m, w in enumerate(self.flat_words):
                self.row_of.setdefault(w, m)
            self.base_words = [ws[0] for ws in self.words]
            self.gkc_threshold, self.gkc_weight = float(cfg.gkc_threshold), float(cfg.gkc_weight)
            self.gkc_max_regions = int(cfg.gkc_max_regions)
        self.device = torch.device(device)
        self.weight, self.distill_pixels = float(cfg.distill_weight), cfg.distill_pixels
        self.teacher = self.vocabulary = None
        if self.weight > 0:
            self.teacher = DenseTeacher(self.clip, cfg.teacher_short_side, cfg.teacher_recipe)
            extra = _read_words(cfg.distill_vocabulary) if cfg.distill_vocabulary else []
            vocab = [self.bank.embeddings]
            if extra:
                vocab.append(ensemble_text_embeddings(self.clip, [(w,) for w in extra], self.templates))
            self.vocabulary = torch.cat(vocab).to(self.device)
        self.meta = {"clip": {"name": self.clip.name, "pretrained": self.clip.pretrained},
                     "templates": list(self.templates), "class_words": [list(w) for w in self.words],
                     "diversify": cfg.diversify, "distill_weight": self.weight,
                     "distill_pixels": cfg.distill_pixels, "teacher_recipe": cfg.teacher_recipe}
        if self.recipe == "gkc":
            self.meta.update(recipe="gkc", gkc_threshold=self.gkc_threshold, gkc_weight=self.gkc_weight)

    @property
    def per_instance(self) -> bool:
        """Whether loss() needs each pixel's instance (`sources`, `items`, `iteration`)."""
        return self.recipe == "gkc"

    def prepare(self, items: list, run_dir, seed: int, write: bool = True) -> None:
        """Recipe gkc: the per-instance synonym filter and teacher embeddings of the archive
        items (data.training.TrainItem), computed once and cached in the run directory."""
        self.seed = int(seed)
        if self.recipe != "gkc":
            return
        self.cache = InstanceCache.build(
            self.clip, [(it.image, it.mask, it.class_id - 1) for it in items], self.flat_words, self.bank.category,
            self.gkc_threshold, Path(run_dir) / GKC_CACHE, write=write)

    @staticmethod
    def _words(cfg: TextHeadConfig, archive, class_names: list) -> list:
        if cfg.names:
            cats = get_category_set(cfg.names, synonyms=True)   # a built-in set brings its synonym sets
            missing = [n for n in class_names[1:] if n not in cats.names]
            if missing:
                raise OpenVocabError(f"train.text.names {cfg.names}: no entry for categories {missing}")
            return [tuple(cats.prompt_words(n)) for n in class_names[1:]]
        recorded, synonyms = archive.meta.get("prompt_words", {}), archive.meta.get("synonyms", {})
        words = [tuple(recorded.get(n) or (n, *synonyms.get(n, ()))) for n in class_names[1:]]
        builtin = (archive.meta.get("config") or {}).get("categories")
        if builtin in BUILTIN_SYNONYMS and all(len(w) == 1 for w in words):
            # an archive of a built-in set, retrieved with the names alone: its synonym sets diversify
            cats = get_category_set(builtin, synonyms=True)
            words = [tuple(dict.fromkeys((*w, *cats.synonyms.get(n, ())))) for n, w in zip(class_names[1:], words)]
            log.info("train.text: the built-in synonyms of %s (%d of %d categories have some)", builtin,
                     sum(len(w) > 1 for w in words), len(words))
        return words

    def build_model(self, model_cfg, num_classes: int) -> TextDeepLabV3Plus:
        model = TextDeepLabV3Plus(num_classes, model_cfg, self.clip.embed_dim, kd_scale=self.recipe == "gkc")
        if model_cfg.pretrained:
            load_backbone_weights(model.backbone, model_cfg.pretrained)
        with torch.no_grad():
            model.text.copy_(self.bank.ensemble())
        model.text_meta = self.meta   # written into model.json by save_segmenter
        return model

    def loss(self, net, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
             sources: torch.Tensor | None = None, items=None, iteration: int = 0) -> torch.Tensor:
        """Cross-entropy against this iteration's names (+ weight x distillation). Recipe gkc also
        needs `sources` (long [B, H, W]: the batch position of the sample each foreground pixel
        came from, -1 elsewhere), `items` (the archive item of each batch position) and the
        iteration."""
        if self.recipe == "gkc":
            return self._gkc_loss(net, images, labels, generator, sources, items, iteration)
        text = self.bank.sample(generator).to(images.device)
        logits, emb = net(images, text=text, return_embeddings=True)
        if bool((labels != IGNORE).any()):
            loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE)
        else:
            loss = logits.float().sum() * 0.0
        if self.teacher is not None:
            teacher = self.teacher(images)
            valid = foreground_pixels(labels, emb.shape[-2:]) if self.distill_pixels == "foreground" else None
            loss = loss + self.weight * text_distillation_loss(emb, teacher, self.vocabulary, self.teacher.scale, valid)
        return loss


    def _gkc_loss(self, net, images, labels, generator, sources, items, iteration) -> torch.Tensor:
        """models/gkc.py: per-instance names and per-image classes, cross-entropy, + weight x
        GKC's region distillation."""
        if self.cache is None or sources is None or items is None:
            raise OpenVocabError("recipe gkc: call prepare() and pass sources/items (stages/train.py does)")
        model, dev, batch = getattr(net, "module", net), images.device, len(images)
        present = [torch.unique(sources[b]).tolist() for b in range(batch)]
        regions = [(b, s) for b in range(batch) for s in ([b] if b in present[b] else []) +
                   [s for s in present[b] if s >= 0 and s != b]]      # an image's own object first
        region_image = [b for b, _ in regions]
        region_item = [int(items[s]) for _, s in regions]
        names = draw_names(self.cache.kept, region_item, iteration, self.seed)
        words, slot = image_classes(region_image, self.bank.category[names].tolist(),
                                    [self.flat_words[m] for m in names.tolist()], self.base_words)
        per_image = [words.get(b, self.base_words) for b in range(batch)]
        width = max(len(w) for w in per_image)
        rows = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, 1 + width, dtype=torch.bool)
        valid[:, 0] = True
        for b, w in enumerate(per_image):
            rows[b, :len(w)] = torch.tensor([self.row_of[x] for x in w])
            valid[b, 1:1 + len(w)] = True
        text = self.bank.embeddings[rows].to(dev)
        target = labels.long().clone()
        for (b, s), k in zip(regions, slot):
            target[b][sources[b] == s] = k + 1
        logits, emb = net(images, text=text, return_embeddings=True)
        logits = logits.float().masked_fill(~valid.to(dev)[:, :, None, None], float("-inf"))
        if bool((target != IGNORE).any()):
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
        else:
            loss = logits.masked_fill(logits.isinf(), 0).sum() * 0.0
        loss = loss + model.kd_scale * 0.0   # in the graph even without regions (DDP)
        if not regions:
            return loss
        keep = torch.arange(len(regions))
        if len(regions) > self.gkc_max_regions:  # the official random subset (MAX_LIST_LEN)
            keep = torch.randperm(len(regions), generator=generator)[:self.gkc_max_regions].sort().values
        region_t = torch.tensor(region_image)[keep].to(dev)
        masks = torch.stack([sources[regions[i][0]] == regions[i][1] for i in keep.tolist()])
        teacher = F.normalize(self.cache.teacher[torch.tensor(region_item)[keep]].to(dev), dim=1)
        text_r = self.bank.embeddings[names[keep]].to(dev)
        with torch.autocast(dev.type, enabled=False):   # squared differences of cosines: in float32
            student = region_embeddings(emb.float(), masks, region_t)
            kd = distillation_loss(student, teacher, text_r, region_t, model.kd_scale.float())
        return loss + self.gkc_weight * kd


def _read_words(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise OpenVocabError(f"train.text.distill_vocabulary {path}: no such file (one word a line)")
    words = [w.strip() for w in read_user_text(path, OpenVocabError).splitlines()
             if w.strip() and not w.strip().startswith("#")]
    if not words:
        raise OpenVocabError(f"{path}: no words (one a line)")
    return words




def dataset_classes(labeled_set) -> list:
    """(name, words) of a labelled set's foreground classes: a built-in set's prompt words,
    else its class names."""
    names = list(getattr(labeled_set, "class_names", None) or [])
    if len(names) < 2:
        raise OpenVocabError("the dataset does not name its classes; give --text or --text-classes FILE")
    words = category_words(getattr(labeled_set, "name", None), names)  # ImageNet-S: lemmas, not ids
    return [(n, tuple(words.get(n) or (n,))) for n in names[1:]]


def open_segmenter(*, run_dir=None, zero_shot: dict | None = None, classes: list | None = None,
                   device="cpu") -> tuple[torch.nn.Module, list]:
    """The segmenter eval and predict use for text: a text-head run (`run_dir`; `classes`
    None = its training classes) or, with `zero_shot` (zero_shot_segmenter's keyword
    arguments: model, pretrained, threshold, ...), dense CLIP. -> (model, class names)."""
    if (run_dir is None) == (zero_shot is None):
        raise OpenVocabError("give a text-head run (--checkpoint) or --zero-shot with --model, not both")
    if zero_shot is not None:
        if not classes:
            raise OpenVocabError("zero-shot segmentation needs class names (--text or --text-classes)")
        return zero_shot_segmenter(classes, device=device, **zero_shot)
    return open_vocab_segmenter(run_dir, classes, device)



# ------------------------------------------------------------------ the one segmenter factory

def parse_zero_shot(spec) -> dict:
    """zero_shot_segmenter's keyword arguments from "ViT-B-16/openai" (open_clip name / tag or
    name / local file; "ViT-B-16" alone: its default tag) or a dict of them."""
    if isinstance(spec, dict):
        return dict(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise OpenVocabError(f"zero_shot: give \"MODEL/TAG\" (e.g. \"ViT-B-16/openai\") or a dict, got {spec!r}")
    model, _, pretrained = spec.strip().partition("/")
    return {"model": model, "pretrained": pretrained or None}


def _run_folder(path: Path) -> Path | None:
    """The trained model's folder of a run given by its folder, its train/, checkpoint.pt or
    model.safetensors; None when `path` is no run."""
    from namedmask.models.deeplab import META_FILE

    if path.is_dir():
        for folder in (path, path / "train"):
            if (folder / META_FILE).is_file():
                return folder
        return None
    if path.name in ("checkpoint.pt", "model.safetensors", META_FILE) and (path.parent / META_FILE).is_file():
        return path.parent
    return None


def _official_segmenter(path: Path, categories, device) -> tuple:
    """An official NamedMask `final_model.pt` (DeepLabv3+ ResNet-50 state dict) with the category
    list it was trained on."""
    from namedmask.config import ModelConfig
    from namedmask.models.deeplab import DeepLabV3Plus, load_official_state_dict

    if categories is None:
        raise OpenVocabError(f"{path}: an official NamedMask checkpoint names no classes; give its categories in "
                             f"training order: categories=\"voc\" (a category set, a names file, or \"a, b|synonym\")")
    if isinstance(categories, (list, tuple)):
        names = ["background", *[str(c) for c in categories]]
    elif "," in str(categories) or "|" in str(categories):
        names = ["background", *[name for name, _ in text_classes(str(categories))]]
    else:
        names = list(get_category_set(str(categories)).names)
    model = DeepLabV3Plus(len(names), ModelConfig())
    load_official_state_dict(model, path)
    meta = {"format": "official-namedmask", "class_names": names, "source": str(path)}
    return model.to(device).eval(), names, meta


def build_segmenter(source=None, *, categories=None, zero_shot=None, text: str | None = None,
                    device="cpu") -> tuple[torch.nn.Module, list, dict]:
    """The segmenter predict, eval and namedmask.load use: (module taking ImageNet-normalised
    images -> per-class scores [B, C, H, W], class names, meta). `source`: a trained run (folder,
    train/, checkpoint.pt, model.safetensors) or an official `final_model.pt` (+ `categories`);
    or `zero_shot` ("ViT-B-16/openai" or zero_shot_segmenter's options) with `text`. `text` on
    a text-head run binds it to those names."""
    from namedmask.models.deeplab import META_FILE, ModelError

    if zero_shot is not None:
        if source is not None:
            raise OpenVocabError("give a trained model or zero_shot=..., not both")
        if not text:
            raise OpenVocabError("zero-shot segmentation names the classes you give: text=\"dog, cat|kitten\"")
        model, names = zero_shot_segmenter(text_classes(text), device=device, **parse_zero_shot(zero_shot))
        return model, names, {"zero_shot": parse_zero_shot(zero_shot)}
    if source is None:
        raise OpenVocabError("give a trained model (a run folder or checkpoint) or zero_shot=\"MODEL/TAG\"")
    path = Path(source)
    run = _run_folder(path)
    if run is not None:
        if categories is not None:
            raise OpenVocabError(f"{path}: a namedmask run knows its categories; categories= is for official "
                                 f"final_model.pt files")
        if text:
            model, names = open_vocab_segmenter(run, text_classes(text), device)
            return model, names, json.loads((run / META_FILE).read_text())
        model, meta = load_segmenter(run, device)
        return model, meta["class_names"], meta
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        if text:
            raise OpenVocabError(f"{path}: an official NamedMask checkpoint is closed-set; new names need zero-shot "
                                 f"dense CLIP (namedmask.load(zero_shot='M/P', text=...))")
        return _official_segmenter(path, categories, device)
    if not path.exists():
        raise ModelError(f"{path}: not found; give a run folder written by `namedmask run`/`train`, its "
                         f"checkpoint.pt or model.safetensors, or an official final_model.pt")
    raise ModelError(f"{path}: no trained segmenter (model.json + model.safetensors); give a run folder written by "
                     f"`namedmask run`/`train`, its checkpoint.pt or model.safetensors, or an official final_model.pt")
