"""GKC (Han et al., "Global Knowledge Calibration for Fast Open-Vocabulary Segmentation", ICCV
2023; official code yongliu20/GKC, read for its equations) as the text head's training recipe
(`train.text.recipe: gkc`, models/openvocab.py). An "instance" is one archive image's
pseudo-mask foreground (one segment); after copy-paste an image may hold several.

Text diversification (`syn_CLIP_sim.py` + the dataset mapper's `thresRand`):
- once per instance, CLIP scores each of its category's names on the instance's box crop of
  the original image: p = softmax over the names of logit_scale x cos(image, "a photo of
  <name>"), CLIP's own preprocessing (short side resize, centre crop); names with p > 0.1 are
  kept (the official `random.choice` would fail on an empty list; here the most probable name
  is kept then, which only happens with more than ten names);
- per instance and per iteration one kept name is drawn uniformly; per image the classifier
  holds every category's first name, the category's slot renamed by its first instance's draw;
  a later instance of the same category with another draw gets an extra class of that name
  (exactly the mapper's rule, so the other name is a negative for it).

Distillation (`loss_text_kd` with TEXT_KD_WEIGHT < 0, i.e. one mean, KD_WEIGHT 10): per region
r (an instance present in a training image) the student s_r is the head's dense embedding
mask-pooled over the region, L2-normalised; the teacher t_r CLIP's image embedding of the
instance's masked crop (outside the mask grey (128, 128, 128), cropped to the mask's box,
resized to CLIP's square input; the attention-pool output for a ResNet CLIP, as the paper's RN50
teacher), L2-normalised; tau_r the text embedding of the region's drawn name. Terms:
  ||s_r - t_r||^2 for each region, and (sigma^2 tau_a.tau_b - s_a.t_b)^2 for each ordered pair
  (a, b) of regions of one image (a = b included), sigma a learnt scalar starting at 1;
loss = 10 x the mean over all those terms together.

Differences from the official code, on purpose: the teacher's crop keeps the box's last row and
column (the official PIL crop drops them); the teacher sees the un-augmented instance (as
there) and is computed once per archive image and cached in the run (there: every iteration);
the student is the text head's own embedding (the official `kd_stu_source: direct`; its
default `prior` adds a learnt linear map from the query features); the classification loss is
the segmenter's per-pixel cross-entropy (GKC's Mask2Former classifies mask proposals)."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from namedmask import io
from namedmask.data.decode import Resize, load_image, resize_crop
from namedmask.data.training import _mask_array, _seed
from namedmask.models.clip import Clip

log = logging.getLogger(__name__)

FILTER_TEMPLATE = "a photo of {}"   # syn_CLIP_sim.py: "a photo of " + name
GREY = (128, 128, 128)              # the mapper's fill outside the mask
CACHE_SCHEMA = "namedmask-gkc-cache/1"


# ------------------------------------------------------------------ per instance, once

def box_of(mask: np.ndarray) -> tuple | None:
    """Inclusive (y0, x0, y1, x1) of the foreground (value 1) of a pseudo-mask, None if empty."""
    ys, xs = np.nonzero(mask == 1)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def filter_crop(image: np.ndarray, box: tuple, size: int) -> torch.Tensor:
    """The synonym filter's input: the box crop of the image, CLIP's preprocessing -> uint8 [3, S, S]."""
    y0, x0, y1, x1 = box
    return resize_crop(np.ascontiguousarray(image[y0:y1 + 1, x0:x1 + 1]), Resize(size, size, "bicubic"))


def teacher_crop(image: np.ndarray, mask: np.ndarray, box: tuple, size: int) -> torch.Tensor:
    """The teacher's input: grey outside the mask, cropped to its box, resized to S x S (bicubic,
    aspect not kept, as the mapper's Resize((224, 224))) -> uint8 [3, S, S]."""
    y0, x0, y1, x1 = box
    filled = np.where((mask == 1)[..., None], image, np.array(GREY, np.uint8))[y0:y1 + 1, x0:x1 + 1]
    pil = Image.fromarray(np.ascontiguousarray(filled)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def synonym_probabilities(image_emb: torch.Tensor, name_emb: torch.Tensor, name_category: torch.Tensor,
                          item_category: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's probability of each of its category's names per instance: image_emb [N, D] and
    name_emb [M, D] (L2-normalised), name_category [M], item_category [N] -> [N, M], a softmax
    of logit_scale x cosine over the names of the instance's category, 0 elsewhere."""
    logits = logit_scale * image_emb.float() @ name_emb.float().T
    own = item_category[:, None] == name_category[None, :]
    return logits.masked_fill(~own, float("-inf")).softmax(1).nan_to_num(0.0)


def keep_names(probs: torch.Tensor, name_category: torch.Tensor, item_category: torch.Tensor,
               threshold: float = 0.1) -> torch.Tensor:
    """bool [N, M]: the names an instance may be called (p > threshold; its most probable name
    where none passes)."""
    own = item_category[:, None] == name_category[None, :]
    kept = (probs > threshold) & own
    empty = ~kept.any(1)
    if bool(empty.any()):
        best = probs.masked_fill(~own, -1.0).argmax(1)
        kept[empty, best[empty]] = True
    return kept


def draw_names(kept: torch.Tensor, items, iteration: int, seed: int) -> torch.Tensor:
    """For each instance (archive item) the name of this iteration: uniform among its kept
    names, a pure function of (seed, iteration, item), so the same instance pasted into another
    image, on another rank or after a resume gets the same name. -> long [len(items)]."""
    out = []
    for item in (int(i) for i in items):
        names = torch.nonzero(kept[item]).flatten()
        out.append(int(names[_seed(seed, iteration, item, 4) % len(names)]))
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def instance_embeddings(clip: Clip, images: list, masks: list, batch_size: int = 64) -> tuple:
    """(filter image embeddings [N, D], teacher embeddings [N, D], has_foreground bool [N]) of the
    instances given as uint8 [H, W, 3] images and [H, W] pseudo-masks (1 = object)."""
    size = clip.image_size
    filt, teach, has = [], [], []
    for image, mask in zip(images, masks):
        box = box_of(mask)
        has.append(box is not None)
        if box is None:  # nothing to see: never a region in training
            box, mask = (0, 0, image.shape[0] - 1, image.shape[1] - 1), np.ones(mask.shape, np.uint8)
        filt.append(filter_crop(image, box, size))
        teach.append(teacher_crop(image, mask, box, size))
    out = []
    for crops in (filt, teach):
        emb = [clip.encode_images(torch.stack(crops[i:i + batch_size])).cpu() for i in range(0, len(crops), batch_size)]
        out.append(torch.cat(emb) if emb else torch.zeros(0, clip.embed_dim))
    return out[0], out[1], torch.tensor(has, dtype=torch.bool)


def name_embeddings(clip: Clip, words: list) -> torch.Tensor:
    """The filter's text side: "a photo of <name>" per name, L2-normalised -> [M, D]."""
    return clip.encode_texts([FILTER_TEMPLATE.format(w) for w in words]).cpu()


class InstanceCache:
    """What GKC needs per archive instance, computed once per run (run_dir/gkc.safetensors):
    the kept names (bool [N, M]), their probabilities and the teacher embeddings [N, D]."""

    def __init__(self, probs: torch.Tensor, kept: torch.Tensor, teacher: torch.Tensor):
        self.probs, self.kept, self.teacher = probs, kept, teacher

    @classmethod
    def build(cls, clip: Clip, items: list, words: list, name_category: torch.Tensor, threshold: float,
              path=None, write: bool = True, progress_every: int = 256) -> "InstanceCache":
        """items: (image path, mask path, category index) per archive instance; words[m] the
        name of bank row m, name_category[m] its category. Read from `path` when it was made
        for the same CLIP, names, threshold and files; else computed (and written if `write`)."""
        from pathlib import Path

        from safetensors import safe_open

        stat = [(str(i), str(m), *_stamp(i), *_stamp(m), int(c)) for i, m, c in items]
        key = io.fingerprint({"schema": CACHE_SCHEMA, "clip": clip.describe(), "words": list(words),
                              "name_category": name_category.tolist(), "threshold": threshold, "items": stat})
        if path is not None and Path(path).is_file():
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") == key:
                    return cls(f.get_tensor("probs"), f.get_tensor("kept").bool(), f.get_tensor("teacher"))
        log.info("GKC: scoring %d names on %d instances with CLIP %s (once per run)", len(words), len(items), clip.name)
        item_category = torch.tensor([int(c) for _, _, c in items], dtype=torch.long)
        filt, teach = [], []
        for start in range(0, len(items), progress_every):
            chunk = items[start:start + progress_every]
            f_emb, t_emb, _ = instance_embeddings(clip, [load_image(i).numpy() for i, _, _ in chunk],
                                                  [_mask_array(Path(m)) for _, m, _ in chunk])
            filt.append(f_emb)
            teach.append(t_emb)
        filt, teacher = torch.cat(filt), torch.cat(teach).float()
        scale = float(clip.model.logit_scale.exp().item())
        probs = synonym_probabilities(filt, name_embeddings(clip, words), name_category, item_category, scale)
        kept = keep_names(probs, name_category, item_category, threshold)
        if path is not None and write:
            with io.atomic_path(path) as tmp:
                io.save_safetensors({"probs": probs.contiguous(), "kept": kept.to(torch.uint8).contiguous(),
                                     "teacher": teacher.contiguous()}, tmp,
                                    metadata={"fingerprint": key, "schema": CACHE_SCHEMA})
        single = int((kept.sum(1) == 1).sum())
        log.info("GKC: %.2f names kept per instance on average (%d of %d instances keep one name)",
                 float(kept.sum(1).float().mean()), single, len(items))
        return cls(probs, kept, teacher)


def _stamp(path) -> tuple:
    import os

    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------ per batch

def image_classes(region_image: list, region_category: list, region_word: list, base_words: list) -> tuple:
    """The mapper's per-image classifier. Regions in order (image index, category index, drawn
    word); base_words[c] is category c's first name. -> (words per image: the C category slots
    then extra classes, slot index per region)."""
    num = len(base_words)
    words, changed, slot = {}, {}, []
    for b, c, w in zip(region_image, region_category, region_word):
        names = words.setdefault(b, list(base_words))
        done = changed.setdefault(b, [False] * num)
        if names[c] == w:
            done[c] = True
            slot.append(c)
        elif not done[c]:
            names[c] = w
            done[c] = True
            slot.append(c)
        else:
            extra = [k for k in range(num, len(names)) if names[k] == w]
            if extra:
                slot.append(extra[-1])
            else:
                names.append(w)
                slot.append(len(names) - 1)
    return words, slot


def region_embeddings(emb: torch.Tensor, masks: torch.Tensor, region_image: torch.Tensor) -> torch.Tensor:
    """Mask pooling: pixel embeddings emb [B, D, h, w], region masks [R, H, W] (bool, the
    training image's resolution), region_image [R] -> L2-normalised [R, D], each the mean of
    the embeddings weighted by the region's share of each embedding cell."""
    weights = F.adaptive_avg_pool2d(masks[:, None].float(), emb.shape[-2:])[:, 0]   # [R, h, w]
    pooled = torch.einsum("rdhw,rhw->rd", emb[region_image].float(), weights)
    return F.normalize(pooled / weights.sum((1, 2)).clamp_min(1e-12)[:, None], dim=1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, region_image: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """GKC's loss_text_kd (one mean over both kinds of terms, unweighted). student, teacher,
    text: L2-normalised [R, D]; region_image [R]: the training image of each region; scale:
    the learnt sigma (text scaled by it on both sides of the pair product)."""
    terms = [((student - teacher) ** 2).sum(1)]
    scaled = text * scale
    for b in torch.unique(region_image).tolist():
        idx = torch.nonzero(region_image == b).flatten()
        v = student[idx] @ teacher[idx].T
        t = scaled[idx] @ scaled[idx].T
        terms.append(((t - v) ** 2).flatten())
    return torch.cat(terms).mean()
