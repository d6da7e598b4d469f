"""Zero-shot dense CLIP (MaskCLIP, Zhou et al. 2022): per-patch embeddings in CLIP's joint
space, classified by cosine to prompt-ensembled text embeddings. No training.

ViT (open_clip VisionTransformer): every block but the last runs as usual; in the last block
each token takes the attention's value path instead of attention, then ln_post and proj per
patch. Recipe "value" (default) drops the block's residual and MLP — ClearCLIP's finding
(Lan et al. 2024), not ClearCLIP itself, which also swaps in query-query attention; "maskclip"
keeps them as MaskCLIP's released code does (mmseg/models/backbones/vit.py, return_qkv: v =
out_proj(v_proj(ln_1(x))) + x; v = v + mlp(ln_2(v))).
Position embeddings are resized bicubically when the patch grid differs from the training one.

ResNet (open_clip ModifiedResNet): the attention pool's value and output projections applied
per location of the last stage, c_proj(v_proj(x)), without the pool's position embedding (as
MaskCLIP's head does).

MaskCLIP's refinement (the released head, mmseg/models/decode_heads/maskclip_head.py,
refine_output; both off unless asked for, the `maskclip` preset turns both on):
- prompt denoising (threshold t_pd, released configs 0.5): P = softmax(100 x cosine) over the
  prompts per location; a prompt whose highest probability anywhere in the image is below t_pd
  gets cosine -100 everywhere (it is taken to be absent);
- key smoothing (threshold t_ks, released configs 1.0): K = the last block's keys per patch
  (ViT: out_proj(k_proj(ln_1(x))), as the released backbone applies the attention's output
  projection to q, k and v alike; ResNet: the attention pool's k_proj per location), each key
  *channel* L2-normalised over the patches (the released code's F.normalize(k, p=2) on [B, N, C]
  normalises along its default dim=1, the patches — kept as released); every location whose
  highest probability is below t_ks takes (K K^T P) instead of P.
Then, as mmseg's inference, the (smoothed) scores are resized bilinearly to the image.

`MaskClipSegmenter` is an nn.Module taking ImageNet-normalised images (what eval_input makes)
and returning per-label scores at the input size, so it is scored exactly like a trained
segmenter."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from namedmask import io
from namedmask.data.augment import IMAGENET_MEAN, IMAGENET_STD  # the segmenters' input normalisation
from namedmask.errors import BadInputError
from namedmask.models.clip import Clip
from namedmask.models.dino import last_layer_keys, patch_size
from namedmask.ops import bilateral_solve



RECIPES = ("value", "maskclip")   # the first is the default (see value_path)
REFINES = ("none", "bilateral", "dino")
REFINE_SCALE = 100.0   # the released head's softmax(100 x cosine), whatever the CLIP's logit scale
# Zero-shot presets (`--preset`): the settings a paper's released code used.
# maskclip: chongzhou96/MaskCLIP — residual + MLP kept in the last block, short side 512
# (test pipeline img_scale (2048, 512), keep_ratio), key smoothing 1.0 and prompt denoising 0.5
# (the values of its configs, e.g. maskclip_plus_kspd_*; maskclip_head.refine_output).
PRESETS = {"maskclip": {"recipe": "maskclip", "short_side": 512, "key_smoothing": 1.0, "prompt_denoising": 0.5}}


class MaskClipError(BadInputError):
    """A CLIP image tower or option the dense path cannot use; the message says why."""


# ---------------------------------------------------------------- dense image features

def _resized_pos_embed(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[1 + N, D] (class token first, square grid) -> [1 + h*w, D]."""
    n = pos.shape[0] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise MaskClipError(f"position embedding of {n} patches is not a square grid")
    if (h, w) == (g, g):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)])


def value_path(block: nn.Module, x: torch.Tensor, recipe: str = "value") -> torch.Tensor:
    """The last block on tokens [B, L, D] with the value path instead of attention.
    "value" (default): out_proj(v_proj(ln_1(x))) alone, no residual, no MLP (ClearCLIP's
    finding that the residual carries the noise of dense CLIP); "maskclip": out_proj(v_proj(
    ln_1(x))) + x, then the MLP with its residual (MaskCLIP's released code, paper-faithful;
    layer scales included when the block has them). On the toy world's CLIP, 200 pool images
    scored against their generated masks (not an evaluation set): value 0.159 mIoU, maskclip
    0.112, the residual without the MLP 0.080, value + MLP 0.123 (README, open vocabulary)."""
    if recipe not in RECIPES:
        raise MaskClipError(f"dense recipe {recipe!r}: expected one of {RECIPES}")
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not hasattr(block, "ln_1"):
        raise MaskClipError(f"{type(block).__name__}: the dense path needs open_clip's ResidualAttentionBlock "
                            f"(ln_1 + nn.MultiheadAttention)")
    d = x.shape[-1]
    bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * d:], bias)
    if recipe == "value":
        return attn.out_proj(v)
    v = x + block.ls_1(attn.out_proj(v))
    return v + block.ls_2(block.mlp(block.ln_2(v)))


def block_keys(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The keys of a block on tokens [B, L, D] as MaskCLIP's released backbone returns them for
    key smoothing: out_proj(k_proj(ln_1(x))) (its return_qkv applies the output projection to
    q, k and v alike) -> [B, L, D]."""
    attn = block.attn
    d = x.shape[-1]
    bias = attn.in_proj_bias[d:2 * d] if attn.in_proj_bias is not None else None
    return attn.out_proj(F.linear(block.ln_1(x), attn.in_proj_weight[d:2 * d], bias))


def vit_dense(visual: nn.Module, x: torch.Tensor, recipe: str = "value", keys: bool = False):
    """open_clip VisionTransformer, CLIP-normalised images [B, 3, H, W] (H, W multiples of the
    patch size) -> dense embeddings [B, D, H/p, W/p] (not normalised); with `keys`, also the
    last block's keys of the patches [B, N, D] (block_keys, class token dropped)."""
    if getattr(visual, "attn_pool", None) is not None:
        raise MaskClipError("CLIP towers with an attentional pooler (CoCa) have no per-patch value path")
    t = visual.conv1(x)
    b, _, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(b, -1, -1)
    t = torch.cat([cls, t], dim=1) + _resized_pos_embed(visual.positional_embedding, h, w).to(t.dtype)
    t = visual.ln_pre(t)   # patch dropout is the identity in eval mode
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    t = t if batch_first else t.transpose(0, 1)
    for block in blocks[:-1]:
        t = block(t)
    t = t if batch_first else t.transpose(0, 1)
    out = visual.ln_post(value_path(blocks[-1], t, recipe)[:, 1:])
    if visual.proj is not None:
        out = out @ visual.proj
    out = out.transpose(1, 2).reshape(b, -1, h, w)
    return (out, block_keys(blocks[-1], t)[:, 1:]) if keys else out


def resnet_dense(visual: nn.Module, x: torch.Tensor, keys: bool = False):
    """open_clip ModifiedResNet -> [B, D, H/32, W/32]: c_proj(v_proj(.)) per location; with
    `keys`, also the attention pool's k_proj per location [B, N, C] (MaskCLIP's key smoothing)."""
    x = x.to(visual.conv1.weight.dtype)
    x = visual.stem(x)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    y = pool.c_proj(pool.v_proj(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    return (y, pool.k_proj(x.flatten(2).transpose(1, 2))) if keys else y


def dense_features(visual: nn.Module, x: torch.Tensor, recipe: str = "value", keys: bool = False):
    """CLIP image tower + CLIP-normalised images -> L2-normalised dense embeddings [B, D, h, w].
    recipe (ViT only): "value" or "maskclip" (see value_path). With `keys`: (embeddings, the
    last attention's keys per location, float32 [B, h*w, C], not normalised)."""
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        out = vit_dense(visual, x, recipe, keys)
    elif hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        out = resnet_dense(visual, x, keys)
    else:
        raise MaskClipError(f"{type(visual).__name__}: dense CLIP supports open_clip's VisionTransformer and "
                            f"ModifiedResNet image towers (timm towers have no CLIP projection per patch)")
    if keys:
        return F.normalize(out[0].float(), dim=1), out[1].float()
    return F.normalize(out.float(), dim=1)


def prompt_denoise(cosine: torch.Tensor, threshold: float, scale: float = REFINE_SCALE) -> torch.Tensor:
    """MaskCLIP's prompt denoising: cosines [B, P, h, w] -> the same, with every prompt whose
    highest probability (softmax over prompts of scale x cosine) anywhere in its image is below
    `threshold` set to -100 (absent from that image)."""
    probs = (scale * cosine).softmax(1)
    absent = probs.flatten(2).amax(2) < threshold                         # [B, P]
    return cosine.masked_fill(absent[:, :, None, None], -100.0)


def key_smooth(cosine: torch.Tensor, keys: torch.Tensor, threshold: float, scale: float = REFINE_SCALE) -> torch.Tensor:
    """MaskCLIP's key smoothing: cosines [B, P, h, w] and keys [B, h*w, C] -> scores [B, P, h, w].
    P = softmax over prompts of scale x cosine; each key channel is L2-normalised over the
    locations (the released code's normalisation, see the module's notes), W = K K^T [B, N, N];
    locations whose highest probability is below `threshold` take W P, the others keep P."""
    b, p, h, w = cosine.shape
    probs = (scale * cosine).softmax(1).flatten(2).transpose(1, 2)        # [B, N, P]
    k = F.normalize(keys.float(), dim=1)
    smoothed = (k @ k.transpose(1, 2)) @ probs
    low = probs.amax(2, keepdim=True) < threshold
    return torch.where(low, smoothed, probs).transpose(1, 2).reshape(b, p, h, w)


def apply_preset(settings: dict, preset: str | None) -> dict:
    """Zero-shot settings (zero_shot_segmenter's keywords) with a preset's values filled in where
    `settings` leaves them None; preset None returns them unchanged."""
    if preset is None:
        return settings
    if preset not in PRESETS:
        raise MaskClipError(f"--preset {preset!r}: the zero-shot presets are {', '.join(PRESETS)}")
    return {**settings, **{k: v for k, v in PRESETS[preset].items() if settings.get(k) is None}}


def stride_of(visual: nn.Module) -> int:
    """Input pixels per output location (patch size, or 32 for ResNets)."""
    if hasattr(visual, "transformer"):
        k = visual.conv1.kernel_size
        return int(k[0] if isinstance(k, tuple) else k)
    return 32


def to_clip_input(x: torch.Tensor, mean: tuple, std: tuple, short_side: int, stride: int):
    """ImageNet-normalised [B, 3, H, W] -> (CLIP-normalised images resized so the short side is
    ~short_side and both sides are multiples of `stride`, RGB in [0, 1] at the input size)."""
    dev = x.device
    rgb = x.float() * torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) + \
        torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    h, w = x.shape[-2:]
    s = short_side / min(h, w)
    size = [max(stride, round(v * s / stride) * stride) for v in (h, w)]
    y = F.interpolate(rgb, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    y = (y - torch.tensor(mean, device=dev).view(1, 3, 1, 1)) / torch.tensor(std, device=dev).view(1, 3, 1, 1)
    return y, rgb


# ---------------------------------------------------------------- text side

def ensemble_text_embeddings(clip: Clip, words: list, templates: tuple, cache: Path | None = None) -> torch.Tensor:
    """words[i]: the names of class i (a name and its synonyms). Every template x every name
    encoded, L2-normalised, averaged and L2-normalised again (NamedMask's prompt ensemble) ->
    float32 [len(words), D]. With `cache` (a safetensors file), the result is read from there when
    it was made for the same model, words and templates, and written there otherwise: a large
    vocabulary (the builtin one with the 80 templates: ~600 k prompts) is encoded once."""
    from safetensors import safe_open

    key = io.fingerprint({"model": clip.describe(), "words": words, "templates": templates})
    if cache is not None and cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == key:
                return f.get_tensor("embeddings")
    prompts = [[t.format(w) for w in ws for t in templates] for ws in words]
    if any(not p for p in prompts):
        raise MaskClipError("every class needs at least one name")
    encoded = clip.encode_texts([p for ps in prompts for p in ps]).cpu()
    out, start = [], 0
    for ps in prompts:
        out.append(F.normalize(encoded[start:start + len(ps)].mean(0), dim=0))
        start += len(ps)
    text = torch.stack(out)
    if cache is not None:
        io.save_safetensors({"embeddings": text}, cache, metadata={"fingerprint": key})
    return text


def class_text(clip: Clip, classes: list, background: tuple | list, templates: tuple) -> tuple:
    """The prompt-ensembled text of (name, words) `classes`, and of the background words (one
    embedding each; None without any) -> (float32 [C, D], float32 [B, D] or None)."""
    text = ensemble_text_embeddings(clip, [words for _, words in classes], templates)
    bg = ensemble_text_embeddings(clip, [(w,) for w in background], templates) if background else None
    return text, bg


def parse_text_classes(text: str) -> list:
    """'dog, cat|kitten, traffic light' -> [("dog",), ("cat", "kitten"), ("traffic light",)]:
    classes separated by commas, a class's synonyms by '|'."""
    classes = []
    for item in text.split(","):
        words = tuple(w.strip() for w in item.split("|") if w.strip())
        if words:
            classes.append(words)
    if not classes:
        raise MaskClipError(f"--text {text!r}: no class names; write e.g. \"dog, cat|kitten, traffic light\"")
    names = [ws[0] for ws in classes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup or "background" in names:
        raise MaskClipError(f"--text {text!r}: duplicate class names {dup}" if dup else
                            f"--text {text!r}: 'background' is implicit (id 0); name only foreground classes")
    return classes


# ---------------------------------------------------------------- segmenter

class MaskClipSegmenter(nn.Module):
    """Zero-shot segmenter: ImageNet-normalised [B, 3, H, W] -> label scores [B, L, H, W]
    (label 0 = background, 1..L-1 = the classes), argmax = the prediction.

    Scores are probabilities: softmax over all prompts (classes and background prompts) of
    CLIP's logit scale x cosine, summed per label, bilinearly upsampled to the input size.
    Background: the background prompts' share, and/or (threshold) every pixel whose best class
    probability is below `threshold`. `short_side`: the image is resized so its short side has
    this many pixels (rounded to the patch grid) before the tower runs. refine: "bilateral"
    (the bilateral solver per label) or "dino" (scores averaged over DINO-key neighbours,
    `affinity_refine`; needs `dino`, a timm DINO ViT).

    prompt_denoising / key_smoothing: MaskCLIP's thresholds (prompt_denoise, key_smooth; None =
    off). With key smoothing the scores are the smoothed probabilities summed per label (their
    argmax is MaskCLIP's; they no longer sum to 1, so a background threshold cannot apply)."""

    def __init__(self, clip: Clip, class_embeddings: torch.Tensor, background_embeddings: torch.Tensor | None = None,
                 threshold: float | None = None, short_side: int | None = None, refine: str | None = None,
                 recipe: str = "value", dino: nn.Module | None = None, dino_tau: float = 0.2,
                 key_smoothing: float | None = None, prompt_denoising: float | None = None):
        super().__init__()
        if threshold is None and (background_embeddings is None or len(background_embeddings) == 0):
            raise MaskClipError("background needs a threshold and/or background prompts; give one")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise MaskClipError(f"background threshold must be in [0, 1], got {threshold}")
        for name, value in (("key smoothing", key_smoothing), ("prompt denoising", prompt_denoising)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise MaskClipError(f"{name} threshold must be in [0, 1], got {value}")
        if key_smoothing is not None and threshold is not None:
            raise MaskClipError("key smoothing's scores are not probabilities: background by a prompt, not by "
                                "--background-threshold")
        if refine not in (None, *REFINES):
            raise MaskClipError(f"refine {refine!r}: expected one of {', '.join(REFINES)}")
        if (refine == "dino") != (dino is not None):
            raise MaskClipError("refine dino needs a DINO ViT (--dino/--dino-weights), and a DINO ViT is only "
                                "used by refine dino")
        if recipe not in RECIPES:
            raise MaskClipError(f"dense recipe {recipe!r}: expected one of {RECIPES}")
        self.visual, self.recipe = clip.model.visual, recipe
        self.clip_mean, self.clip_std = clip.mean, clip.std
        self.stride = stride_of(self.visual)
        self.short_side = int(short_side or clip.image_size)
        self.threshold = threshold
        self.key_smoothing, self.prompt_denoising = key_smoothing, prompt_denoising
        self.refine = None if refine in (None, "none") else refine
        self.dino, self.dino_tau = (dino.eval() if dino is not None else None), float(dino_tau)
        bg = background_embeddings if background_embeddings is not None else class_embeddings[:0]
        self.register_buffer("text", torch.cat([bg, class_embeddings]).float(), persistent=False)
        self.register_buffer("label_of_prompt", torch.cat([torch.zeros(len(bg), dtype=torch.long),
                                                           torch.arange(1, len(class_embeddings) + 1)]),
                             persistent=False)
        self.num_labels = len(class_embeddings) + 1
        self.logit_scale = float(clip.model.logit_scale.exp().item())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, rgb = to_clip_input(x, self.clip_mean, self.clip_std, self.short_side, self.stride)
        y = y.to(next(self.visual.parameters()).dtype)
        if self.key_smoothing is not None:
            feats, keys = dense_features(self.visual, y, self.recipe, keys=True)
        else:
            feats = dense_features(self.visual, y, self.recipe)
        cosine = torch.einsum("bdhw,kd->bkhw", feats, self.text.to(feats.device))
        if self.prompt_denoising is not None:
            cosine = prompt_denoise(cosine, self.prompt_denoising)
        if self.key_smoothing is not None:
            probs = F.interpolate(key_smooth(cosine, keys, self.key_smoothing), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)
        else:
            logits = F.interpolate(cosine * self.logit_scale, size=x.shape[-2:], mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
        scores = torch.zeros(x.shape[0], self.num_labels, *x.shape[-2:], device=x.device)
        scores.index_add_(1, self.label_of_prompt.to(x.device), probs)
        if self.threshold is not None:
            low = scores[:, 1:].amax(1) < self.threshold
            scores[:, 0] = torch.where(low, scores.new_tensor(2.0), scores[:, 0])   # above any probability
        if self.refine == "bilateral":
            scores = torch.stack([refine_scores(im, sc) for im, sc in zip(rgb, scores)])
        elif self.refine == "dino":
            scores = affinity_refine(scores, dino_keys(self.dino, x), self.dino_tau)
        return scores


def refine_scores(rgb: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Bilateral-solver refinement of per-label scores: each label present in the argmax is
    solved as a soft one-hot map along the image's edges; labels absent stay at zero.
    rgb: float [3, H, W] in [0, 1]; scores: [L, H, W] -> [L, H, W]."""
    image = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()
    label = scores.argmax(0)
    out = torch.zeros_like(scores)
    for c in label.unique().tolist():
        out[c] = bilateral_solve(image, (label == c).float().cpu()).to(scores.device)
    return out


@torch.no_grad()
def dino_keys(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DINO's last-layer keys (TokenCut's features) of ImageNet-normalised images [B, 3, H, W],
    the image resized to the nearest multiple of the patch size: [B, C, h, w]."""
    p = patch_size(vit)
    size = [max(p, round(v / p) * p) for v in x.shape[-2:]]
    if list(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    keys, (h, w) = last_layer_keys(vit, x.to(next(vit.parameters()).dtype))
    return keys.float().transpose(1, 2).reshape(x.shape[0], -1, h, w)


def affinity_refine(scores: torch.Tensor, keys: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """Per-label scores [B, L, H, W] averaged over each patch's DINO-key neighbours: pooled to
    the key grid, multiplied by the affinity W_ij = cos(k_i, k_j) where above `tau` (TokenCut's
    graph, weighted; 0 elsewhere), rows normalised, upsampled bilinearly back. Dense CLIP's
    patch votes are noisy; DINO's keys say which patches belong to one object, so each patch
    takes its object's average vote. keys: [B, C, h, w]."""
    b, _, h, w = keys.shape
    k = F.normalize(keys.flatten(2), dim=1)                                   # [B, C, N]
    aff = torch.einsum("bcn,bcm->bnm", k, k)
    aff = torch.where(aff > tau, aff, torch.zeros_like(aff))                 # the diagonal (1) always stays
    aff = aff / aff.sum(-1, keepdim=True).clamp_min(1e-12)   # a zero key has no neighbours
    small = F.adaptive_avg_pool2d(scores.float(), (h, w)).flatten(2)        # [B, L, N]
    out = torch.einsum("bnm,blm->bln", aff, small).reshape(b, -1, h, w)
    return F.interpolate(out, size=scores.shape[-2:], mode="bilinear", align_corners=False)
