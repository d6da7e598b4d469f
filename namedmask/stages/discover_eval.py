"""`namedmask eval --discover DIR`: the zero-guidance paper's evaluation of discovered, freely
named segments (nessessence/ZeroGuidanceSeg, eval_openvocab.py, as run_eval.sh runs it).

Per image, each segment is matched to a ground-truth class of the dataset by its name or its
embedding; then per class (every class of the image, and every class some segment matched) the
IoU of the matching segments with the class's pixels, and recall over IoU thresholds:
- matching, mode "t-t": cosine between the segment's name and each class name, both embedded by
  a sentence-embedding model (`--sentence-model`, the official all-mpnet-base-v2) or else by
  CLIP's text tower (no prompt); the best class, kept when the cosine >= text_threshold (0.5);
- mode "i-t": cosine between the segment's CLIP image embedding and each class's CLIP text
  embedding of "Image of a {class}."; kept when >= clip_threshold (0.1);
- per class, "union": all segments matched to it; "argmax": the one with the highest similarity
  to it (ties: the larger segment);
- pixels: predictions are nearest-resized to the ground truth; ignored pixels (ignore_index, and
  the background when the class is not in the image) are taken out of the prediction;
  IoU = |P & G| / |P | G| (undefined when both are empty: left out of the means, a miss for recall);
  a class of the image with no matching segment has IoU 0;
- recall at threshold t: the share of the scored classes with IoU >= t; the image's recall is
  its mean over t in numpy.arange(0, 1.01, 0.01) (101 thresholds, the official grid, floats
  included); "allseg" recall takes per class the best single matched segment (none: a miss at
  every threshold, even 0);
- the dataset's numbers: means over images (NaN-skipping) of the per-image class-mean IoU and
  of the per-image recalls; images where no segment has a name are skipped (as the official).
One deliberate difference: the official "argmax" recall pools its counts with "union"'s (one
counter for both representations); ours counts each representation on its own.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from namedmask.errors import InputError

log = logging.getLogger(__name__)

IOU_THRESHOLDS = np.arange(0.0, 1.0 + 0.01, 0.01)   # the official grid: min 0.0, max 1.00, step 0.01
MODES = ("t-t", "i-t")
REPRESENTATIONS = ("union", "argmax")


def binary_iou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """|P & G| / |P | G| of two bool maps; NaN when both are empty (mmseg's IoU of class 1)."""
    inter = int((pred & gt).sum())
    union = int((pred | gt).sum())
    return inter / union if union else float("nan")


def recall_over_thresholds(ious: list) -> float:
    """Mean over IOU_THRESHOLDS of the share of `ious` at or above the threshold (NaN counts as
    a miss, as the official comparison does)."""
    if not ious:
        return float("nan")
    a = np.asarray(ious, dtype=np.float64)
    return float(np.mean([np.mean(a >= t) for t in IOU_THRESHOLDS]))


@dataclass
class ImageScores:
    iou: dict = field(default_factory=dict)       # representation -> class-mean IoU (NaN-skipping)
    recall: dict = field(default_factory=dict)    # representation (and "allseg") -> recall over thresholds
    classes: dict = field(default_factory=dict)   # representation -> {class id: IoU}


def score_image(pred: torch.Tensor, gt: torch.Tensor, similarity: torch.Tensor, threshold: float, *,
                class_ids: list, background: int | None = 0, ignore_index: int | None = 255) -> ImageScores:
    """One image. pred int64 [h, w]: segment ids 0..S-1 (-1: no segment); gt int64 [H, W] class
    ids; similarity [S, C]: each segment's similarity to each candidate class (`class_ids[c]` is
    its id in gt; NaN rows: segments without a name, never matched); threshold: the least
    similarity of a match."""
    pred = F.interpolate(pred[None, None].float(), size=tuple(gt.shape), mode="nearest")[0, 0].long()
    present = set(torch.unique(gt).tolist())
    unscored = {background, ignore_index} - {None}
    gt_classes = [c for c in class_ids if c in present and c not in unscored]
    areas = torch.bincount(pred[pred >= 0].flatten(), minlength=similarity.shape[0])
    matched = {}                                   # class id -> [segment]
    sim = torch.nan_to_num(similarity.float(), nan=-float("inf"))
    for s in range(sim.shape[0]):
        if not torch.isfinite(sim[s]).any():
            continue
        c = int(sim[s].argmax())
        if float(sim[s, c]) >= threshold:
            matched.setdefault(class_ids[c], []).append(s)
    col = {cid: i for i, cid in enumerate(class_ids)}
    chosen = {"union": dict(matched), "argmax": {}}
    for cid, segs in matched.items():
        scores = sim[segs, col[cid]]
        best = scores.max()
        ties = [s for s, v in zip(segs, scores.tolist()) if v == float(best)]
        chosen["argmax"][cid] = [max(ties, key=lambda s: (int(areas[s]), -segs.index(s)))]
    out = ImageScores()
    for rep in REPRESENTATIONS:
        ious = {}
        for cid in sorted(set(gt_classes) | set(chosen[rep])):
            g = gt == cid
            ignore = (gt == ignore_index) if ignore_index is not None else torch.zeros_like(g)
            if cid not in gt_classes and background is not None:
                ignore = ignore | (gt == background)
            segs = chosen[rep].get(cid, [])
            p = torch.isin(pred, torch.tensor(segs, dtype=torch.long)) if segs else torch.zeros_like(g)
            ious[cid] = binary_iou(p & ~ignore, g)
        out.classes[rep] = ious
        vals = [v for v in ious.values() if v == v]
        out.iou[rep] = float(np.mean(vals)) if vals else float("nan")
        out.recall[rep] = recall_over_thresholds(list(ious.values()))
    best = []
    for cid in sorted(set(gt_classes) | set(matched)):
        g = gt == cid
        ignore = (gt == ignore_index) if ignore_index is not None else torch.zeros_like(g)
        if cid not in gt_classes and background is not None:
            ignore = ignore | (gt == background)
        segs = matched.get(cid, [])
        best.append(max(binary_iou((pred == s) & ~ignore, g) for s in segs) if segs else -1.0)
    out.recall["allseg"] = recall_over_thresholds(best)
    return out


def aggregate(images: list) -> dict:
    """Dataset means (NaN-skipping) of per-image ImageScores."""
    out = {}
    for rep in REPRESENTATIONS:
        out[f"iou_{rep}"] = _nanmean([s.iou[rep] for s in images])
        out[f"recall_{rep}"] = _nanmean([s.recall[rep] for s in images])
    out["recall_allseg"] = _nanmean([s.recall["allseg"] for s in images])
    out["images"] = len(images)
    return out


def _nanmean(values: list) -> float:
    v = [x for x in values if x == x]
    return round(float(np.mean(v)), 6) if v else float("nan")


# ------------------------------------------------------------------------------ encoders

class SentenceEncoder:
    """A sentence-embedding model in the sentence-transformers layout (e.g. all-mpnet-base-v2) run
    with plain transformers: token embeddings pooled as its 1_Pooling/config.json says (mean by
    default; cls; max), L2-normalised."""

    def __init__(self, path: str, device="cpu"):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise InputError("--sentence-model needs transformers: pip install transformers") from exc
        local = Path(path).is_dir()
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
            self.model = AutoModel.from_pretrained(path, local_files_only=local).to(device).eval()
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise InputError(f"--sentence-model {path}: cannot load ({type(exc).__name__}: {first}); give a local "
                             f"folder (config, weights, tokenizer) or a reachable Hugging Face name") from exc
        self.pooling = "mean"
        pool = Path(path) / "1_Pooling" / "config.json"
        if pool.is_file():
            cfg = json.loads(pool.read_text())
            self.pooling = "cls" if cfg.get("pooling_mode_cls_token") else "max" if cfg.get(
                "pooling_mode_max_tokens") else "mean"
        self.device = device

    @torch.no_grad()
    def encode(self, texts: list) -> torch.Tensor:
        batch = self.tok(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        if self.pooling == "cls":
            emb = hidden[:, 0]
        elif self.pooling == "max":
            emb = hidden.masked_fill(mask == 0, -1e9).amax(1)
        else:
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(emb.float(), dim=-1).cpu()


# ------------------------------------------------------------------------------ the command

def evaluate_discovered(discover_dir: str | Path, labeled_set, *, class_names: list | None = None, mode: str = "t-t",
                        sentence_model: str | None = None, text_threshold: float = 0.5, clip_threshold: float = 0.1,
                        clip=None, prompt: str = "Image of a {}.", max_images: int | None = None) -> dict:
    """Scores a `namedmask discover` output folder against a LabeledSet (datasets.open_dataset:
    voc, folder, ...): items matched to discover's files by stem. class_names: the words of the
    dataset's ids (default: the set's own names; id 0 = background is never a candidate).
    clip: the CLIP the segments were embedded with (default: discover.json's)."""
    from namedmask.io import read_json
    from namedmask.models.clip import load_clip

    if mode not in MODES:
        raise InputError(f"--discover-mode must be one of {MODES}, got {mode!r}")
    root = Path(discover_dir)
    settings = read_json(root / "discover.json", InputError, f"{root}: not a `namedmask discover` output folder "
                                                             f"(no discover.json)")
    names = list(class_names or labeled_set.class_names or [])
    if not names:
        raise InputError("eval --discover needs class names: --class-names (a category set or names file)")
    class_ids = list(range(1, len(names)))
    words = names[1:]
    if clip is None:
        clip = load_clip(settings["model"], settings.get("pretrained"))
    if mode == "i-t":
        class_emb = clip.encode_texts([prompt.format(w) for w in words]).cpu()
        encoder = None
    else:
        encoder = SentenceEncoder(sentence_model) if sentence_model else None
        class_emb = encoder.encode(words) if encoder else clip.encode_texts(words).cpu()
    threshold = text_threshold if mode == "t-t" else clip_threshold
    from safetensors.torch import load_file

    from namedmask.data.labelmaps import read_label_map

    scores, missing = [], []
    items = list(labeled_set)[:max_images] if max_images else list(labeled_set)
    for item in items:
        stem = Path(item.id).name
        seg_file, lab_file = root / "segments" / f"{stem}.json", root / "labels" / f"{stem}.png"
        if item.label is None or not seg_file.is_file() or not lab_file.is_file():
            missing.append(stem)
            continue
        segments = json.loads(seg_file.read_text())["segments"]
        named = [s["name"] for s in segments]
        if not any(n for n in named):
            continue
        pred = torch.from_numpy(read_label_map(lab_file).astype(np.int64)) - 1
        gt = torch.from_numpy(labeled_set.read_label(item).astype(np.int64))
        if mode == "i-t":
            emb_file = root / "embeddings" / f"{stem}.safetensors"
            if not emb_file.is_file():
                raise InputError(f"{emb_file}: missing (made by an older discover?); use --discover-mode t-t")
            sim = F.normalize(load_file(str(emb_file))["image"].float(), dim=-1) @ class_emb.T
        else:
            idx = [i for i, n in enumerate(named) if n]
            feats = encoder.encode([named[i] for i in idx]) if encoder else clip.encode_texts([named[i] for i in idx]).cpu()
            sim = torch.full((len(named), len(words)), float("nan"))
            sim[idx] = feats @ class_emb.T
        scores.append(score_image(pred, gt, sim, threshold, class_ids=class_ids,
                                  background=getattr(labeled_set, "background", 0),
                                  ignore_index=getattr(labeled_set, "ignore_index", 255)))
    if missing:
        log.warning("eval --discover: %d images without discover results or labels (first: %s)", len(missing),
                    missing[0])
    result = aggregate(scores)
    result.update({"mode": mode, "threshold": threshold, "matching": "sentence model" if encoder else
                   ("CLIP text-text" if mode == "t-t" else "CLIP image-text"), "missing": len(missing),
                   "classes": len(words)})
    return result
