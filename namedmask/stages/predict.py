"""`namedmask predict --checkpoint RUN IMAGES... --out DIR`: label PNGs (palette, one class id
per pixel, at native resolution) and colour overlays with a legend of the class names.

Two-stage open vocabulary (`--text ... --proposals discover|segmenter --model CLIP`): region
proposals first — discover's DINO over-segmentation (namedmask.models.zero_guidance
.propose_segments) or the masks of a trained segmenter (--checkpoint RUN: one proposal per
predicted non-background class) — then CLIP names each region among the --text classes and
background (zero_guidance.classify_segments: the dense zero-shot segmenter's rule applied to one
embedding per region). Region embeddings: masked crop by default (optionally with mask prompts
from `namedmask adapt-clip`), or the class-row attention mask. With `ensemble` (OVSeg's
inference, `--preset ovseg`, proposals segmenter) each region takes the argmax class of the
segmenter's and CLIP's class probabilities combined geometrically
(models.mask_prompts.ovseg_ensemble; no background choice inside a proposed region)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from namedmask import io
from namedmask.data.augment import eval_input
from namedmask.data.categories import get_category_set, voc_palette
from namedmask.data.classmap import ClassMap
from namedmask.data.decode import IMAGE_SUFFIXES, ImageDecodeError, load_image
from namedmask.errors import NamedMaskError
from namedmask.models import zero_guidance as zg
from namedmask.models.clip import load_clip
from namedmask.models.deeplab import load_segmenter
from namedmask.models.dino import create_dino
from namedmask.models.mask_prompts import load_mask_prompts, ovseg_ensemble, region_class_scores
from namedmask.models.maskclip import class_text
from namedmask.models.prompts import get_templates
from namedmask.models.inference import predict_label, resolve_run_dir
from namedmask.report import save_overlay
from namedmask.runtime import resolve_device
from namedmask.stages.openvocab import open_segmenter, open_vocab_segmenter, text_classes

log = logging.getLogger(__name__)


class PredictError(NamedMaskError, ValueError):
    """No images to predict, or an input that cannot be read; the message names it."""


def collect_images(inputs) -> list:
    """Image files given directly or found (recursively) in the given folders, in order."""
    paths = []
    for p in map(Path, inputs):
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise PredictError(f"{p}: no such file or folder")
    if not paths:
        raise PredictError(f"no images found in {[str(p) for p in inputs]}")
    return paths


PROPOSALS = ("discover", "segmenter")


@dataclass
class TwoStageConfig:
    """`predict --proposals`: where regions come from and how CLIP names them."""
    proposals: str                      # discover | segmenter
    model: str                          # the naming CLIP (open_clip name)
    pretrained: str | None = None
    templates: str = "namedmask"
    background: tuple = ("background",)  # background prompts (empty: threshold only)
    threshold: float | None = None      # best class probability under which a region is background
    embed: str = "crop"                 # crop | attention | whole (zero_guidance.EMBED_MODES)
    mask_prompts: str | None = None     # tokens from `namedmask adapt-clip` (embed crop)
    context: float = 0.1                # attention embedding: factor on each outside patch
    mask_layers: int = 3
    dino: str = "vit_small_patch16_224.dino"  # discover proposals: the DINO ViT
    dino_weights: str | None = None
    random_dino: bool = False
    vit_kwargs: dict | None = None      # timm construction arguments of the DINO ViT (toy models)
    size: int = 512                     # discover proposals: short side for DINO and the solver
    k: int = 8
    min_area: float = 0.01
    seed: int = 0
    ensemble: float | None = None       # OVSeg: CLIP's weight in the geometric ensemble with the segmenter (0.7)

    def check(self, run_dir) -> None:
        if self.proposals not in PROPOSALS:
            raise PredictError(f"--proposals {self.proposals}: must be one of {', '.join(PROPOSALS)}")
        if self.proposals == "segmenter" and run_dir is None:
            raise PredictError("--proposals segmenter takes its regions from a trained segmenter: give --checkpoint RUN")
        if self.proposals == "discover" and run_dir is not None:
            raise PredictError("--proposals discover takes no --checkpoint (--proposals segmenter uses its masks)")
        if self.embed not in zg.EMBED_MODES:
            raise PredictError(f"--embed {self.embed}: must be one of {', '.join(zg.EMBED_MODES)}")
        if self.mask_prompts and self.embed != "crop":
            raise PredictError("--mask-prompts work on masked crops: use --embed crop")
        if self.mask_prompts and not Path(self.mask_prompts).is_file():
            raise PredictError(f"--mask-prompts {self.mask_prompts}: no such file (make one with `namedmask adapt-clip`)")
        if self.threshold is None and not self.background:
            raise PredictError("no background prompt and no --background-threshold: give one")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise PredictError(f"--background-threshold {self.threshold}: must be in [0, 1]")
        if not 1 <= self.k <= 255 or self.size < 16:
            raise PredictError(f"--k {self.k} / --size {self.size}: k must be in 1..255 and size at least 16")
        if self.ensemble is not None and (self.proposals != "segmenter" or not 0 <= self.ensemble <= 1
                                          or self.threshold is not None):
            raise PredictError(f"the OVSeg ensemble (weight {self.ensemble}) needs --proposals segmenter, a weight in "
                               f"[0, 1] and no --background-threshold")


class TwoStage:
    """Two-stage open-vocabulary labeller: uint8 [H, W, 3] -> int64 [H, W] (0 = background,
    i = the i-th --text class). `propose(image)` -> (uint8 [3, h, w] image the regions live on,
    disjoint bool masks [S, h, w])."""

    def __init__(self, clip, text: torch.Tensor, background: torch.Tensor | None, propose, config: TwoStageConfig,
                 prompts=None):
        self.clip, self.text, self.background, self.propose = clip, text, background, propose
        self.config, self.prompts = config, prompts
        self.logit_scale = float(clip.model.logit_scale.detach().exp().clamp(max=100))

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        c = self.config
        img, masks, *seg_scores = self.propose(image)
        out = torch.zeros(img.shape[-2:], dtype=torch.int64)
        if len(masks):
            emb = zg.segment_embeddings(self.clip, img, masks, mode=c.embed, context=c.context,
                                        mask_layers=min(c.mask_layers, zg.clip_depth(self.clip)),
                                        mask_prompts=self.prompts)
            if c.ensemble is not None:   # segment_embeddings are L2-normalised
                labels = ovseg_ensemble(seg_scores[0], emb, self.text, c.ensemble).argmax(1) + 1
            else:
                labels, _ = zg.classify_segments(emb, self.text, self.background, logit_scale=self.logit_scale,
                                                 threshold=c.threshold)
            for m, label in zip(masks, labels.tolist()):
                out[m] = label
        H, W = image.shape[:2]
        if tuple(out.shape) != (H, W):
            out = torch.nn.functional.interpolate(out[None, None].float(), size=(H, W), mode="nearest")[0, 0].long()
        return out


def two_stage(config: TwoStageConfig, classes: list, run_dir=None, device="cpu") -> tuple:
    """(TwoStage labeller, class names with 'background' first). `classes`: (name, words) pairs."""
    config.check(run_dir)
    templates = get_templates(config.templates)
    clip = load_clip(config.model, config.pretrained, device)
    text, bg = class_text(clip, classes, config.background, templates)
    prompts = load_mask_prompts(config.mask_prompts, clip) if config.mask_prompts else None
    if config.proposals == "segmenter" and config.ensemble is not None:
        segmenter, columns = _named_segmenter(resolve_run_dir(run_dir), classes, device)

        def propose(image):
            with torch.no_grad():
                probs = segmenter(eval_input(image).to(device)).float().softmax(1)[0].cpu()
            label = probs.argmax(0)
            ids = [i for i in label.unique().tolist() if i != 0]
            masks = label[None] == torch.tensor(ids, dtype=torch.int64).view(-1, 1, 1)
            return image.permute(2, 0, 1), masks, region_class_scores(probs, masks, columns)
    elif config.proposals == "segmenter":
        segmenter, _ = load_segmenter(resolve_run_dir(run_dir), device)

        def propose(image):
            label = predict_label(segmenter, image, device)
            ids = [i for i in label.unique().tolist() if i != 0]
            return image.permute(2, 0, 1), label[None] == torch.tensor(ids, dtype=torch.int64).view(-1, 1, 1)
    else:
        vit = create_dino(config.dino, config.dino_weights, random_weights=config.random_dino,
                          **(config.vit_kwargs or {})).to(device).eval()

        def propose(image):
            img, labels = zg.propose_segments(vit, image, size=config.size, k=config.k, min_area=config.min_area,
                                              seed=config.seed)
            return img, labels[None] == torch.arange(int(labels.max()) + 1).view(-1, 1, 1)
    return TwoStage(clip, text, bg, propose, config, prompts), ["background"] + [name for name, _ in classes]


def _named_segmenter(run_dir: Path, classes: list, device) -> tuple:
    """(segmenter, columns): a trained segmenter scoring the `classes` ((name, words) pairs) —
    a text-head run bound to their names, or a closed-set run whose classes include them by name
    or synonym — and, per class, the column of its output holding that class's score."""
    model, meta = load_segmenter(run_dir, device)
    if meta.get("head") == "text":   # its own CLIP embeds the names (its training templates)
        model, _ = open_vocab_segmenter(run_dir, classes, device)
        return model, torch.arange(1, len(classes) + 1)
    known = {n.lower(): i for i, n in enumerate(meta["class_names"]) if i}
    columns, missing = [], []
    for name, words in classes:
        hit = [known[w.lower()] for w in (name, *words) if w.lower() in known]
        if hit:
            columns.append(hit[0])
        else:
            missing.append(name)
    if missing:
        raise PredictError(f"--preset ovseg ensembles the segmenter's score of every --text class, and {run_dir} "
                           f"(closed set: {', '.join(meta['class_names'][1:])}) has none for {missing}; name only "
                           f"its classes, or use a text-head run (train.head: text)")
    return model, torch.tensor(columns)


def predict(run_dir, inputs, out_dir, *, device: str = "auto", overlays: bool = True,
            progress: bool = True, classes: str | None = None, ignore_unmapped: bool = False,
            skip_bad: bool = False, text: str | None = None, zero_shot: dict | None = None,
            proposals: TwoStageConfig | None = None) -> list:
    """Writes <out>/labels/<name>.png and <out>/overlays/<name>.png; returns the label paths.
    Names are the input stems; a stem seen twice gets the parent folder prefixed. Label ids
    are the model's, or with `classes` (a category set or names file) that set's ids, the
    model's classes paired with them by name (namedmask.data.classmap). With `text` ("dog,
    cat|kitten": ids 1.. in that order) a text-head run, or dense CLIP (`zero_shot`: keyword
    arguments of stages.openvocab.zero_shot_segmenter), labels those names; with `proposals`
    (and `text`) region proposals named by CLIP do (two-stage, see the module's notes)."""
    out_dir = Path(out_dir)
    # taken (refused, locked) before the model loads, held for the whole run
    with io.output_folder(out_dir, "predict"):
        dev = resolve_device(device)
        if proposals is not None:
            if not text:
                raise PredictError("--proposals names regions among classes: give them with --text \"a, b|synonym\"")
            label_of, names = two_stage(proposals, text_classes(text), run_dir, dev)
        else:
            if text or zero_shot is not None:
                model, names = open_segmenter(run_dir=None if zero_shot is not None else resolve_run_dir(run_dir),
                                              zero_shot=zero_shot, classes=text_classes(text) if text else None,
                                              device=dev)
            else:
                model, meta = load_segmenter(resolve_run_dir(run_dir), dev)
                names = meta["class_names"]

            def label_of(image):
                return predict_label(model, image, dev, amp=dev.type == "cuda")
        cmap = None
        if classes:
            target_set = get_category_set(classes)
            cmap = ClassMap(names, target_set.names, ignore_unmapped=ignore_unmapped,
                            dataset_words={n: target_set.prompt_words(n) for n in target_set.names})
            names = list(target_set.names)
            log.info("label ids of %s: %s", classes, cmap.describe()["model_to_dataset"])
        return _predict(label_of, names, cmap, inputs, out_dir, overlays, progress, skip_bad)


def _predict(label_of, names, cmap, inputs, out_dir: Path, overlays: bool, progress: bool, skip_bad: bool) -> list:
    """The body of predict, inside its locked output folder."""
    written, seen, bad = [], set(), []
    for path in tqdm(collect_images(inputs), desc="predict", unit="img", disable=not progress):
        stem = path.stem if path.stem not in seen else f"{path.parent.name}_{path.stem}"
        seen.add(stem)
        try:
            image = load_image(path)
        except ImageDecodeError as exc:
            if not skip_bad:
                raise PredictError(f"{exc} (pass --skip-bad to skip unreadable images)") from exc
            log.warning("skipped %s: %s", path, exc)
            bad.append(path)
            continue
        label = label_of(image)
        if cmap is not None:
            label = cmap.map_prediction(label)
        target = io.inside(out_dir, f"labels/{stem}.png")
        if len(names) <= 256:
            io.save_png(target, label.to(torch.uint8).numpy(), palette=voc_palette())
        else:  # more classes than a palette holds (ImageNet-S 919): 16-bit grayscale
            io.save_png(target, label.numpy().astype(np.uint16))
        if overlays:
            save_overlay(io.inside(out_dir, f"overlays/{stem}.png"), image, label, names)
        written.append(target)
    log.info("wrote %d label maps to %s", len(written), out_dir / "labels")
    if bad:
        log.warning("%d unreadable image(s) skipped: %s", len(bad), ", ".join(map(str, bad)))
    return written
