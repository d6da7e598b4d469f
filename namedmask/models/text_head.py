"""Open-vocabulary NamedMask: what trains the text head (TextDeepLabV3Plus in deeplab.py).

Text diversification: each category is trained against a set of names (its prompt name and
synonyms), each embedded with the prompt ensemble. Per iteration `TextBank.sample` draws one
name per category ("sample") or a random convex mix of its names ("mix"), so the learnt pixel
space does not collapse onto one word; "none" always uses the names' ensemble (no YAML-boolean
word such as "off", which YAML reads as false).

Text-guided distillation: the segmenter's pixel embeddings and the frozen CLIP's dense
(MaskCLIP) embeddings of the same image are both projected on a vocabulary of text embeddings
(cosines x CLIP's logit scale -> softmax over the vocabulary); the loss is the KL divergence
of the student's distribution from the teacher's. Only the directions the text spans are
matched, which is what classification by text later reads."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from namedmask.data.augment import IGNORE
from namedmask.errors import InputError
from namedmask.models.clip import Clip
from namedmask.models.maskclip import dense_features, ensemble_text_embeddings, stride_of, to_clip_input

DIVERSIFY = ("sample", "mix", "none")


class TextBank:
    """Per-name text embeddings of the training categories: names[c] are category c's names
    (c = 0 is the first foreground category)."""

    def __init__(self, embeddings: torch.Tensor, category_of_name: torch.Tensor, mode: str = "sample"):
        if mode not in DIVERSIFY:
            raise InputError(f"text diversification {mode!r}: expected one of {DIVERSIFY}")
        self.embeddings = F.normalize(embeddings.float(), dim=1)
        self.category = category_of_name.long()
        self.num_categories = int(self.category.max()) + 1
        self.mode = mode
        if torch.bincount(self.category, minlength=self.num_categories).min() == 0:
            raise InputError("every category needs at least one name")

    @classmethod
    def from_words(cls, clip: Clip, words: list, templates: tuple, mode: str = "sample") -> "TextBank":
        """words[c]: the names of category c; each name embedded with the template ensemble."""
        flat = [(c, w) for c, ws in enumerate(words) for w in ws]
        emb = ensemble_text_embeddings(clip, [(w,) for _, w in flat], templates)
        return cls(emb, torch.tensor([c for c, _ in flat]), mode)

    def ensemble(self) -> torch.Tensor:
        """[C, D]: each category's names averaged (and L2-normalised): the closed-set classifier."""
        out = torch.zeros(self.num_categories, self.embeddings.shape[1]).index_add_(0, self.category, self.embeddings)
        return F.normalize(out, dim=1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """[C, D] for one iteration, by the bank's mode."""
        if self.mode == "none":
            return self.ensemble()
        r = torch.rand(len(self.category), generator=generator)
        if self.mode == "mix":   # Dirichlet(1) weights per category: -log U normalised per category
            w = -torch.log(r.clamp_min(1e-12))
            out = torch.zeros(self.num_categories, self.embeddings.shape[1]).index_add_(
                0, self.category, self.embeddings * w[:, None])
            return F.normalize(out, dim=1)
        # one name per category: the name with the largest random key in its category
        best = torch.full((self.num_categories,), -1.0).scatter_reduce(0, self.category, r, "amax")
        pick = torch.zeros(self.num_categories, dtype=torch.long)
        chosen = r == best[self.category]
        pick[self.category[chosen]] = torch.nonzero(chosen).flatten()
        return self.embeddings[pick]


def text_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, vocabulary: torch.Tensor,
                           scale: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the softmax over `vocabulary` [V, D] of scale x cosine, per
    pixel, averaged over (valid) pixels. student: L2-normalised [B, D, h, w]; teacher: [B, D,
    h', w'] (resized bilinearly to h x w and renormalised); valid: bool [B, h, w] or None."""
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
    teacher = F.normalize(teacher.float(), dim=1)
    vocab = F.normalize(vocabulary.to(student.device, torch.float32), dim=1)
    log_p_s = (torch.einsum("bdhw,vd->bhwv", student.float(), vocab) * scale).log_softmax(-1)
    log_p_t = (torch.einsum("bdhw,vd->bhwv", teacher, vocab) * scale).log_softmax(-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if valid is not None:
        return kl[valid].mean() if valid.any() else kl.sum() * 0.0
    return kl.mean()


def foreground_pixels(labels: torch.Tensor, size: tuple) -> torch.Tensor:
    """Where distillation applies with `distill_pixels: foreground`: the pseudo-mask's object
    pixels (labels > 0, not IGNORE), nearest-resized from [B, H, W] to the embeddings' size ->
    bool [B, h, w]. The idea: dense CLIP names background pixels too (on the toy world its
    best-class probability is as high there as on objects, 0.79 vs 0.80). Measured on the toy
    world it does worse than distilling every pixel (README), so `all` is the default."""
    small = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return (small > 0) & (small != IGNORE)


class DenseTeacher:
    """The frozen CLIP image tower's dense embeddings of ImageNet-normalised training crops
    (computed on the augmented crop, so geometry always matches the student's)."""

    def __init__(self, clip: Clip, short_side: int | None = None, recipe: str = "value"):
        self.clip, self.recipe = clip, recipe
        self.visual = clip.model.visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.stride = stride_of(self.visual)
        self.short_side = short_side or clip.image_size
        self.scale = float(clip.model.logit_scale.exp().item())

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = to_clip_input(x, self.clip.mean, self.clip.std, self.short_side, self.stride)
        return dense_features(self.visual, y, self.recipe)
