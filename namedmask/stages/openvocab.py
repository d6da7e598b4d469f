"""Open vocabulary: the segmenters that answer any text.

- `zero_shot_segmenter`: dense CLIP (MaskCLIP, models/maskclip.py), no training.
- `TextObjective`: what `train.head: text` adds to training (stages/train.py): the
  TextDeepLabV3Plus model, per-iteration text diversification, and the optional text-guided
  distillation from the frozen dense CLIP (computed on the augmented crop each iteration).
- `open_vocab_segmenter`: a trained text-head run bound to new names (its CLIP's text tower
  embeds them; no CLIP image encoder runs).

Both segmenters are nn.Modules taking ImageNet-normalised images, so eval and predict score
and write them exactly like a closed-set checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from namedmask.config import TextHeadConfig
from namedmask.data.archive import load_archive
from namedmask.data.augment import IGNORE
from namedmask.data.categories import get_category_set
from namedmask.data.classmap import category_words
from namedmask.errors import NamedMaskError
from namedmask.models.clip import load_clip
from namedmask.models.deeplab import (OpenVocabSegmenter, TextDeepLabV3Plus, load_backbone_weights,
                                      load_segmenter)
from namedmask.models.dino import create_dino
from namedmask.models.maskclip import MaskClipSegmenter, class_text, ensemble_text_embeddings, parse_text_classes
from namedmask.models.prompts import get_templates
from namedmask.models.text_head import DenseTeacher, TextBank, foreground_pixels, text_distillation_loss
from namedmask.runtime import resolve_device
from namedmask.stages.evaluate import evaluate_model, open_eval_set

BACKGROUND_WORDS = ("background",)


class OpenVocabError(NamedMaskError, ValueError):
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
                        short_side: int | None = None, refine: str | None = None, recipe: str = "value",
                        dino=None, dino_weights: str | None = None, device="cpu",
                        key_smoothing: float | None = None,
                        prompt_denoising: float | None = None) -> tuple[MaskClipSegmenter, list]:
    """(segmenter, class names with 'background' first). `classes`: (name, words) pairs.
    refine "dino": `dino` is a DINO ViT module, or a timm name loaded with `dino_weights`.
    key_smoothing / prompt_denoising: MaskCLIP's thresholds (models.maskclip; None = off)."""
    if refine == "dino":
        if dino is None:
            raise OpenVocabError("--refine dino needs --dino (a timm DINO name) and --dino-weights (its file)")
        if isinstance(dino, str):
            dino = create_dino(dino, dino_weights).to(device)
    elif dino is not None or dino_weights is not None:
        raise OpenVocabError("--dino/--dino-weights are only used by --refine dino")
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
                             f"new names need a run trained with train.head: text, or zero-shot dense CLIP "
                             f"(--zero-shot --model M --pretrained P)")
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
        self.bank = TextBank.from_words(self.clip, self.words, self.templates, cfg.diversify)
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

    @staticmethod
    def _words(cfg: TextHeadConfig, archive, class_names: list) -> list:
        if cfg.names:
            cats = get_category_set(cfg.names, synonyms=True)   # a built-in set brings its synonym sets
            missing = [n for n in class_names[1:] if n not in cats.names]
            if missing:
                raise OpenVocabError(f"train.text.names {cfg.names}: no entry for categories {missing}")
            return [tuple(cats.prompt_words(n)) for n in class_names[1:]]
        recorded, synonyms = archive.meta.get("prompt_words", {}), archive.meta.get("synonyms", {})
        return [tuple(recorded.get(n) or (n, *synonyms.get(n, ()))) for n in class_names[1:]]

    def build_model(self, model_cfg, num_classes: int) -> TextDeepLabV3Plus:
        model = TextDeepLabV3Plus(num_classes, model_cfg, self.clip.embed_dim)
        if model_cfg.pretrained:
            load_backbone_weights(model.backbone, model_cfg.pretrained)
        with torch.no_grad():
            model.text.copy_(self.bank.ensemble())
        model.text_meta = self.meta   # written into model.json by save_segmenter
        return model

    def loss(self, net, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy against this iteration's names (+ weight x distillation)."""
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


def _read_words(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise OpenVocabError(f"train.text.distill_vocabulary {path}: no such file (one word a line)")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip() and not w.startswith("#")]
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


def evaluate_open(dataset: str, root, *, run_dir=None, zero_shot: dict | None = None, text: str | None = None,
                  class_set: str | None = None, split: str = "val", device: str = "auto",
                  max_images: int | None = None, overlays_dir=None, backend: str = "auto", progress: bool = True,
                  ignore_unmapped: bool = False):
    """`namedmask eval --dataset D --root R` with --zero-shot, or with --checkpoint of a text-head
    run and new text. Classes: --text, a category set / names file (`class_set`), or
    class_set="dataset" (and by default with --zero-shot) the dataset's own classes. Scored
    exactly as evaluate_checkpoint scores a closed-set run."""
    dev = resolve_device(device)
    labeled_set = open_eval_set(dataset, root, split)
    if text or (class_set and class_set != "dataset"):
        classes = text_classes(text, None if class_set == "dataset" else class_set)
    elif zero_shot is not None or class_set == "dataset":
        classes = dataset_classes(labeled_set)
    else:
        classes = None
    model, names = open_segmenter(run_dir=run_dir, zero_shot=zero_shot, classes=classes, device=dev)
    return evaluate_model(model, labeled_set, names, device=dev, amp=False, max_images=max_images, progress=progress,
                          backend=backend, overlays_dir=overlays_dir, ignore_unmapped=ignore_unmapped)
