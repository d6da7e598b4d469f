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
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from namedmask import io
from namedmask.config import TwoStageConfig
from namedmask.data.augment import eval_input
from namedmask.data.categories import get_category_set, voc_palette
from namedmask.data.classmap import ClassMap
from namedmask.data.image_outputs import ImageOutputs, claim_image_outputs
from namedmask.errors import BadInputError
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
from namedmask.models.openvocab import build_segmenter, open_vocab_segmenter, text_classes
from namedmask.models.provenance import WorldCheck

log = logging.getLogger(__name__)


class PredictError(BadInputError):
    """No images to predict, or an input that cannot be read; the message names it."""


PROPOSALS = ("discover", "segmenter")


def check_two_stage(config: TwoStageConfig, run_dir) -> None:
    """What TwoStageConfig cannot check alone (its values are checked when it is built)."""
    if config.proposals == "segmenter" and run_dir is None:
        raise PredictError("--proposals segmenter takes its regions from a trained segmenter: give --checkpoint RUN")
    if config.proposals == "discover" and run_dir is not None:
        raise PredictError("--proposals discover takes no --checkpoint (--proposals segmenter uses its masks)")
    if config.mask_prompts and not Path(config.mask_prompts).is_file():
        raise PredictError(f"--mask-prompts {config.mask_prompts}: no such file (make one with `namedmask adapt-clip`)")


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
    check_two_stage(config, run_dir)
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
            proposals: TwoStageConfig | None = None, categories=None) -> list:
    """Writes <out>/labels/<name>.png and <out>/overlays/<name>.png; returns the label paths.
    Names are the images' paths relative to their input folders without the suffix (with it
    where stems collide: photo.jpg, photo.png), see namedmask.data.image_outputs; unreadable
    images are one error at the end listing them, or with `skip_bad` skipped and listed. Label ids
    are the model's, or with `classes` (a category set or names file) that set's ids, the
    model's classes paired with them by name (namedmask.data.classmap). With `text` ("dog,
    cat|kitten": ids 1.. in that order) a text-head run, or dense CLIP (`zero_shot`: keyword
    arguments of models.openvocab.zero_shot_segmenter), labels those names; with `proposals`
    (and `text`) region proposals named by CLIP do (two-stage, see the module's notes). `run_dir`
    may also be an official NamedMask final_model.pt, with `categories` (its training classes).
    A toy or random-weight model warns once when it labels images from outside its world."""
    out_dir = Path(out_dir)
    # taken (refused, locked) and the images found before the model loads, held for the whole run
    with claim_image_outputs(out_dir, "predict", inputs, OUTPUTS, skip_bad=skip_bad) as outs:
        dev = resolve_device(device)
        if proposals is not None:
            if not text:
                raise PredictError("--proposals names regions among classes: give them with --text \"a, b|synonym\"")
            labeller, names = two_stage(proposals, text_classes(text), run_dir, dev)

            def label_of(image, path=None):
                return labeller(image)
        else:
            model, names, meta = build_segmenter(run_dir, categories=categories, zero_shot=zero_shot, text=text,
                                                 device=dev)
            world = WorldCheck(meta, str(run_dir), log)

            def label_of(image, path=None):
                world(path)
                return predict_label(model, image, dev, amp=dev.type == "cuda")
        cmap = None
        if classes:
            target_set = get_category_set(classes)
            cmap = ClassMap(names, target_set.names, ignore_unmapped=ignore_unmapped,
                            dataset_words={n: target_set.prompt_words(n) for n in target_set.names})
            names = list(target_set.names)
            log.info("label ids of %s: %s", classes, cmap.describe()["model_to_dataset"])
        return _predict(label_of, names, cmap, outs, overlays, progress)


OUTPUTS = {"labels": "labels/{}.png", "overlays": "overlays/{}.png"}


def _predict(label_of, names, cmap, outs: ImageOutputs, overlays: bool, progress: bool) -> list:
    """The body of predict, inside its locked output folder."""
    written = []
    for item in tqdm(outs.items, desc="predict", unit="img", disable=not progress):
        image = outs.load(item)
        if image is None:
            continue
        label = label_of(image, item.path)
        if cmap is not None:
            label = cmap.map_prediction(label)
        target = outs.path("labels", item)
        if len(names) <= 256:
            io.save_png(target, label.to(torch.uint8).numpy(), palette=voc_palette())
        else:  # more classes than a palette holds (ImageNet-S 919): 16-bit grayscale
            io.save_png(target, label.numpy().astype(np.uint16))
        if overlays:
            save_overlay(outs.path("overlays", item), image, label, names)
        outs.record(item)
        written.append(target)
    log.info("wrote %d label maps to %s", len(written), outs.out / "labels")
    outs.finish(len(written))
    return written
