"""Zero-guidance segmentation (no query, no class list): over-segment an image with DINO
patch features, embed each segment in CLIP's space, name it against a vocabulary and merge
segments that agree.

Segment embeddings, three ways (the same CLIP, the same image):
- "attention": the whole image goes through CLIP; in the last `mask_layers` blocks the class
  token's attention row gets an additive bias: 0 on itself and the segment's patches,
  log(context) on every other patch. context=0 is purely local (the class token sees only the
  segment), context=1 is the plain global embedding; in between, each outside patch keeps that
  factor of its attention weight before the row is renormalised — a per-patch factor, not the
  total share left to the context: many outside patches can still hold most of it (measured on
  the toy CLIP, bench_discover.attention_study: context 0.1 leaves 60 % outside). Only the
  class row is biased, so each segment costs the last `mask_layers` blocks, not a whole forward.
- "crop": the segment's bounding box, pixels outside the segment set to CLIP's mean colour
  (0 after normalisation), resized to CLIP's input; optionally with mask prompts
  (namedmask.models.mask_prompts) in place of the blanked patches.
- "whole": the plain image embedding, the same for every segment (a baseline).

`clip_forward` is the one forward over open_clip's VisionTransformer used by all three; with no
bias and no prompts it equals `model.encode_image` (tested)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from namedmask.errors import InputError, UnavailableError
from namedmask.models.clip import Clip
from namedmask.models.dino import IMAGENET_MEAN, IMAGENET_STD, last_layer_keys, patch_size
from namedmask.ops.bilateral import bilateral_solve_batch

EMBED_MODES = ("attention", "crop", "whole", "zero-guidance")
PAPER_DEPTH, PAPER_MASK_LAYERS = 24, 4    # ViT-L/14: blocks 20..23 masked (official, hard-coded `nth >= 20`)


# ------------------------------------------------------------------------------ CLIP side

def _visual(clip: Clip):
    visual = clip.model.visual
    if not hasattr(visual, "transformer") or getattr(visual, "attn_pool", None) is not None \
            or getattr(visual, "pool_type", "tok") != "tok":
        raise InputError(f"CLIP {clip.name}: segment embeddings need a ViT with a class token "
                         f"(open_clip VisionTransformer, pool_type 'tok', no attentional pooler)")
    return visual


def clip_depth(clip: Clip) -> int:
    return len(_visual(clip).transformer.resblocks)


def clip_grid(clip: Clip) -> tuple:
    return tuple(int(g) for g in _visual(clip).grid_size)


def normalise(clip: Clip, images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> CLIP's normalised float input."""
    x = images.to(clip.device, torch.float32).div(255)
    mean = torch.tensor(clip.mean, device=clip.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=clip.device).view(1, 3, 1, 1)
    return (x - mean) / std


def patch_tokens(clip: Clip, x: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, S, S] -> patch embeddings [B, L, D] (before class token and
    position embedding)."""
    v = _visual(clip)
    t = v.conv1(x)
    return t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)


def paper_mask_layers(depth: int) -> int:
    """The number of last blocks the zero-guidance paper masks, scaled to a model's depth
    (4 of ViT-L/14's 24; at least 1)."""
    return max(1, round(PAPER_MASK_LAYERS * depth / PAPER_DEPTH))


def soft_area_fractions(masks: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Masks [S, H, W] -> the fraction of each CLIP patch they cover [S, gh * gw], by area
    interpolation of the mask (the official `F.interpolate(mask, size=grid, mode='area')`)."""
    return F.interpolate(masks[:, None].float(), size=tuple(grid), mode="area").flatten(1)


def _area_masked_attention(blk, x: torch.Tensor, keep: torch.Tensor, sd: float | None) -> torch.Tensor:
    """The zero-guidance paper's attention (official clip_v3_nb_mask, `_scaled_dot_product_attention`):
    x [B, T, D] (after ln_1), keep [B, T] (1 on the class token, the segment's area fraction on
    each patch). Per head: P = softmax(q k^T / sqrt(d)); every query row's weights are multiplied
    by keep and renormalised (M); with sd, "global subtraction": M - w * P[class row], w =
    exp(-(c + 1)^2 / sd), c = the cosine between M and P rows averaged over heads and rows (one c
    per image); no renormalisation after the subtraction. Returns out_proj(attention @ v)."""
    attn = blk.attn
    b, t, d = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
    logits = (q / math.sqrt(d // h)) @ k.transpose(-1, -2)                      # [B, H, T, T]
    plain = logits.softmax(-1)
    masked = torch.exp(logits - logits.amax(-1, keepdim=True)) * keep[:, None, None, :].to(logits.dtype)
    masked = masked / masked.sum(-1, keepdim=True)
    if sd is not None:
        c = F.cosine_similarity(masked, plain, dim=-1).mean((1, 2))             # [B]
        w = torch.exp(-(c + 1) ** 2 / sd)
        masked = masked - w[:, None, None, None] * plain[:, :, :1, :]
    out = (masked @ v).transpose(1, 2).reshape(b, t, d)
    return attn.out_proj(out)


def _paper_block(blk, h: torch.Tensor, keep: torch.Tensor, sd: float | None) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock (batch-first h [B, T, D]) with the paper's attention."""
    if not isinstance(blk.attn, torch.nn.MultiheadAttention) or getattr(blk.attn, "_qkv_same_embed_dim", True) is False:
        raise InputError("zero-guidance attention needs CLIP blocks with torch.nn.MultiheadAttention (open_clip ViT)")
    ls_1 = getattr(blk, "ls_1", torch.nn.Identity())
    ls_2 = getattr(blk, "ls_2", torch.nn.Identity())
    h = h + ls_1(_area_masked_attention(blk, blk.ln_1(h), keep, sd))
    return h + ls_2(blk.mlp(blk.ln_2(h)))


def clip_forward(clip: Clip, x: torch.Tensor, *, cls_bias: torch.Tensor | None = None, bias_layers: int = 0,
                 prompts: torch.Tensor | None = None, blank: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None, keep_layers: int = 0, sd: float | None = None) -> torch.Tensor:
    """CLIP image embeddings [B, E] (not normalised) of normalised images x [B, 3, S, S].

    cls_bias [B, 1 + L]: additive attention bias of the class token's row in the last
    `bias_layers` blocks; x may hold one image for many bias rows (one per segment): the
    unbiased blocks then run once and the batch expands where the bias starts. prompts [P, L, D] with blank [B, L] bool: in blocks 0..P-1 the input
    tokens of blank patches are replaced by the prompt tokens of that block (mask prompt
    tuning; block 0's prompts replace the patch embedding before the position embedding is
    added, as the blank patch's own embedding would have been). keep [B, 1 + L] with keep_layers
    and sd: the zero-guidance paper's attention (`_area_masked_attention`) in the last
    keep_layers blocks, one keep row per segment (x may hold one image for all of them)."""
    v = _visual(clip)
    t = patch_tokens(clip, x)
    b, n, d = t.shape
    if prompts is not None:
        t = torch.where(blank[..., None], prompts[0].to(t.dtype)[None].expand(b, -1, -1), t)
    cls = v.class_embedding.to(t.dtype).view(1, 1, d).expand(b, -1, -1)
    h = v.ln_pre(v.patch_dropout(torch.cat([cls, t], 1) + v.positional_embedding.to(t.dtype)))
    blocks = v.transformer.resblocks
    batch_first = getattr(v.transformer, "batch_first", True)
    first_biased = len(blocks) - bias_layers if cls_bias is not None else len(blocks)
    first_kept = len(blocks) - keep_layers if keep is not None else len(blocks)
    mask = None
    if cls_bias is not None:
        heads = blocks[-1].attn.num_heads
        nb = len(cls_bias)
        if b not in (1, nb):
            raise ValueError(f"clip_forward: {b} images for {nb} bias rows")
        mask = torch.zeros(nb, 1 + n, 1 + n, dtype=h.dtype, device=h.device)
        mask[:, 0] = cls_bias.to(h.dtype)
        mask = mask.repeat_interleave(heads, dim=0)  # [B * heads, L+1, L+1], nn.MultiheadAttention's layout
    for i, blk in enumerate(blocks):
        if prompts is not None and 0 < i < prompts.shape[0]:
            patches = torch.where(blank[..., None], prompts[i].to(h.dtype)[None].expand(b, -1, -1), h[:, 1:])
            h = torch.cat([h[:, :1], patches], 1)
        if i == first_biased and h.shape[0] != mask.shape[0] // heads:
            h = h.expand(mask.shape[0] // heads, -1, -1)
        if i >= first_kept:
            if h.shape[0] != len(keep):
                h = h.expand(len(keep), -1, -1)
            h = _paper_block(blk, h, keep.to(h.device), sd)
            continue
        kw = {"attn_mask": mask} if i >= first_biased else {}
        h = blk(h, **kw) if batch_first else blk(h.transpose(0, 1), **kw).transpose(0, 1)
    pooled = v.ln_post(h[:, 0])
    return pooled @ v.proj if v.proj is not None else pooled


def patch_fractions(masks: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Bool/float masks [S, H, W] -> the fraction of each CLIP patch they cover [S, gh * gw]."""
    m = F.interpolate(masks[:, None].float(), size=(grid[0] * 8, grid[1] * 8), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(m, grid).flatten(1)


def attention_bias(fractions: torch.Tensor, context: float) -> torch.Tensor:
    """[S, L] patch coverage -> [S, 1 + L] class-row bias: 0 on the class token and on the
    segment's patches (coverage >= 0.5, or its best-covered patch when none reaches it),
    log(context) elsewhere (-inf for context 0)."""
    if not 0 <= context <= 1:
        raise InputError(f"context share must be in [0, 1], got {context}")
    inside = fractions >= 0.5
    best = fractions.argmax(1)
    inside[torch.arange(len(fractions)), best] = True
    outside = math.log(context) if context > 0 else float("-inf")
    bias = torch.full(inside.shape, outside, dtype=torch.float32, device=fractions.device)
    bias[inside] = 0.0
    return torch.cat([torch.zeros(len(bias), 1, device=bias.device), bias], 1)


def _resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def masked_crops(image: torch.Tensor, masks: torch.Tensor, size: int, mean: tuple) -> tuple:
    """uint8 [3, H, W], bool [S, H, W] -> (uint8 crops [S, 3, size, size] with the bounding box of
    each segment resized to size x size and the outside set to CLIP's mean colour,
    bool crop masks [S, size, size])."""
    fill = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8).view(3, 1, 1)
    crops, cms = [], []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        sub = torch.where(m[y0:y1, x0:x1], image[:, y0:y1, x0:x1], fill)
        crops.append(_resize_uint8(sub, size)[0])
        cm = F.interpolate(m[None, None, y0:y1, x0:x1].float(), size=(size, size), mode="nearest")[0, 0] > 0.5
        cms.append(cm)
    return torch.stack(crops), torch.stack(cms)


@torch.no_grad()
def segment_embeddings(clip: Clip, image: torch.Tensor, masks: torch.Tensor, *, mode: str = "attention",
                       context: float = 0.1, mask_layers: int | None = 3, mask_prompts=None,
                       batch_size: int = 32, sd: float | None = 5.0) -> torch.Tensor:
    """L2-normalised CLIP embeddings [S, E] of the segments `masks` (bool [S, H, W]) of `image`
    (uint8 [3, H, W]). mode: see EMBED_MODES; mask_prompts: a MaskPrompts for mode "crop".
    mode "zero-guidance": the paper's rule (`_area_masked_attention`) in the last `mask_layers`
    blocks (None: `paper_mask_layers` of the depth), global subtraction with `sd` (None: none)."""
    if mode not in EMBED_MODES:
        raise InputError(f"embedding mode must be one of {EMBED_MODES}, got {mode!r}")
    if len(masks) == 0:
        return torch.zeros(0, clip.embed_dim)
    size = clip.image_size
    if mode == "whole":
        e = clip_forward(clip, normalise(clip, _resize_uint8(image, size)))
        return F.normalize(e.float(), dim=-1).cpu().expand(len(masks), -1).clone()
    out = []
    if mode == "zero-guidance":
        depth = clip_depth(clip)
        layers = paper_mask_layers(depth) if mask_layers is None else mask_layers
        if not 1 <= layers <= depth:
            raise InputError(f"mask_layers must be in 1..{depth} (the depth of {clip.name}), got {layers}")
        x = normalise(clip, _resize_uint8(image, size))
        frac = soft_area_fractions(masks, clip_grid(clip))
        keep = torch.cat([torch.ones(len(frac), 1), frac], 1).to(clip.device)
        for i in range(0, len(masks), batch_size):
            out.append(clip_forward(clip, x, keep=keep[i:i + batch_size], keep_layers=layers, sd=sd))
        return F.normalize(torch.cat(out).float(), dim=-1).cpu()
    if mode == "attention":
        depth = clip_depth(clip)
        if not 1 <= mask_layers <= depth:
            raise InputError(f"mask_layers must be in 1..{depth} (the depth of {clip.name}), got {mask_layers}")
        x = normalise(clip, _resize_uint8(image, size))
        bias = attention_bias(patch_fractions(masks, clip_grid(clip)), context).to(clip.device)
        for i in range(0, len(masks), batch_size):
            bb = bias[i:i + batch_size]
            out.append(clip_forward(clip, x, cls_bias=bb, bias_layers=mask_layers))
    else:
        crops, cms = masked_crops(image, masks, size, clip.mean)
        for i in range(0, len(masks), batch_size):
            x = normalise(clip, crops[i:i + batch_size])
            if mask_prompts is not None:
                out.append(mask_prompts.forward(clip, x, cms[i:i + batch_size]))
            else:
                out.append(clip_forward(clip, x))
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


# ------------------------------------------------------------------------------ DINO side

def kmeans(x: torch.Tensor, k: int, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Cosine k-means of rows of x [N, C] (deterministic k-means++ init from `seed`); returns
    labels [N] in 0..k'-1 with k' <= k: identical points never make two clusters (a
    one-colour image gives one cluster)."""
    x = F.normalize(x.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(len(x), (1,), generator=g))]]
    for _ in range(1, k):
        d = (1 - x @ torch.stack(centres).T).clamp_min(0).amin(1)
        if float(d.max()) < 1e-6:  # every point already sits on a centre
            break
        centres.append(x[int(torch.multinomial(d / d.sum(), 1, generator=g))])
    c = torch.stack(centres)
    for _ in range(iterations):
        labels = (x @ c.T).argmax(1)
        new = torch.zeros_like(c).index_add_(0, labels, x)
        empty = new.norm(dim=1) < 1e-12
        new[empty] = c[empty]
        new = F.normalize(new, dim=-1)
        if torch.allclose(new, c):
            break
        c = new
    labels = (x @ c.T).argmax(1)
    return torch.unique(labels, return_inverse=True)[1]


@dataclass
class Oversegmentation:
    labels: torch.Tensor        # int64 [H, W], 0..S-1
    patch_labels: torch.Tensor  # int64 [h, w]


def oversegment(features: torch.Tensor, grid: tuple, image: torch.Tensor, *, k: int = 8, min_area: float = 0.01,
                temperature: float = 0.05, refine: bool = True, seed: int = 0,
                refine_method: str = "bilateral") -> Oversegmentation:
    """DINO patch features [h*w, C] -> a pixel label map of `image` (uint8 [3, H, W]).

    Cosine k-means of the patch features into <= k clusters; clusters under `min_area` of the
    patches are absorbed by their nearest cluster; then each cluster's soft assignment
    (softmax of cosine / temperature over the clusters), upsampled to pixels, is refined along
    the image's edges by the bilateral solver and each pixel takes the cluster with the
    highest refined score (no refinement: the upsampled soft assignments decide).
    refine_method "densecrf": the dense CRF (`densecrf_labels`) with unary -cosine / temperature."""
    h, w = grid
    feats = F.normalize(features.float(), dim=-1)
    labels = kmeans(feats, k, seed=seed)
    counts = torch.bincount(labels)
    keep = counts >= max(1, math.ceil(min_area * len(labels)))
    if not keep.any():
        keep[counts.argmax()] = True
    centres = F.normalize(torch.zeros(len(counts), feats.shape[1]).index_add_(0, labels, feats), dim=-1)[keep]
    sim = feats @ centres.T                               # [h*w, S]
    patch_labels = sim.argmax(1).view(h, w)
    H, W = image.shape[-2:]
    if refine and refine_method == "densecrf" and sim.shape[1] > 1:
        unary = F.interpolate((-sim / temperature).T.reshape(-1, 1, h, w), size=(H, W), mode="bilinear",
                              align_corners=False)[:, 0]
        pixel = densecrf_labels(image, unary)
        return Oversegmentation(torch.unique(pixel, return_inverse=True)[1].view(H, W), patch_labels)
    soft = torch.softmax(sim / temperature, dim=1).T.reshape(-1, 1, h, w)
    soft = F.interpolate(soft, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    if refine and len(soft) > 1:
        rgb = image.permute(1, 2, 0).contiguous()
        soft = torch.stack(bilateral_solve_batch([rgb] * len(soft), list(soft.clamp(0, 1))))
    pixel = soft.argmax(0)
    return Oversegmentation(torch.unique(pixel, return_inverse=True)[1].view(H, W), patch_labels)


def working_image(image_hwc: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, h, w]: short side `size`, both sides multiples of `patch`."""
    H, W = image_hwc.shape[:2]
    s = size / min(H, W)
    h, w = max(patch, round(H * s / patch) * patch), max(patch, round(W * s / patch) * patch)
    x = image_hwc.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def propose_segments(vit, image_hwc: torch.Tensor, *, size: int = 512, k: int = 8, min_area: float = 0.01,
                     refine: bool = True, seed: int = 0, lap=None, refine_method: str = "bilateral") -> tuple:
    """An image (uint8 [H, W, 3]) -> (the working image uint8 [3, h, w] at short side `size`,
    its segments int64 [h, w] in 0..S-1): DINO (`vit`) last-layer keys, then `oversegment`.
    `lap(step)`, when given, is called after "dino" and after "oversegment" (timing)."""
    dev = next(vit.parameters()).device
    img = working_image(image_hwc, size, patch_size(vit))
    x = img[None].to(dev, torch.float32).div(255)
    x = (x - torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    keys, grid = last_layer_keys(vit, x)
    if lap:
        lap("dino")
    labels = oversegment(keys[0].cpu(), grid, img, k=k, min_area=min_area, refine=refine, seed=seed,
                         refine_method=refine_method).labels
    if lap:
        lap("oversegment")
    return img, labels


# ------------------------------------------------------------------------------ the paper's tree

@dataclass
class TreeCut:
    """The leaves of the cut tree (official run_dino_clustering_tree.py): patch labels int64 [N]
    in 0..S-1, each leaf's tree id (root = 0, children of t = 2t+1, 2t+2), centroids [S, C]
    (means of the L2-normalised features, not renormalised)."""
    labels: torch.Tensor
    tree_ids: list
    centroids: torch.Tensor


def ward_parts(features: torch.Tensor, leaves: int = 20) -> tuple:
    """The official agglomerative step (a modified sklearn AgglomerativeClustering, whose Ward
    tree is scipy.cluster.hierarchy.ward of the features): L2-normalised features [N, C] ->
    (parts bool [2 (leaves - 1), N], nodes): the tree is split top-down `leaves - 1` times, always
    the most recently merged node first (the official `_hc_cut`); split a yields parts 2a, 2a+1
    (the two children in scipy's order); nodes[a] = (split node, child 0, child 1) ids."""
    from heapq import heappush, heappushpop

    from scipy.cluster.hierarchy import ward

    x = features.detach().cpu().double().numpy()
    n = len(x)
    if n < 2:
        return np.zeros((0, n), dtype=bool), []
    leaves = max(2, min(leaves, n))
    children = ward(x)[:, :2].astype(np.int64)
    members = {}

    def leaf_set(node):
        if node < n:
            return np.array([node])
        if node not in members:
            stack, out = [node], []
            while stack:
                c = stack.pop()
                if c < n:
                    out.append(c)
                elif c in members:
                    out.extend(members[c].tolist())
                else:
                    stack.extend(children[c - n].tolist())
            members[node] = np.sort(np.array(out))
        return members[node]

    heap = [-(int(children[-1].max()) + 1)]
    parts, nodes = np.zeros((2 * (leaves - 1), n), dtype=bool), []
    for a in range(leaves - 1):
        node = -heap[0]
        c0, c1 = (int(c) for c in children[node - n])
        heappush(heap, -c0)
        heappushpop(heap, -c1)
        parts[2 * a, leaf_set(c0)] = True
        parts[2 * a + 1, leaf_set(c1)] = True
        nodes.append((node, c0, c1))
    return parts, nodes


def cut_tree(features: torch.Tensor, leaves: int = 20, threshold: float = 0.95) -> TreeCut:
    """The official cut of the Ward tree of DINO patch features [N, C]: the root is always split;
    a later split (in `ward_parts` order) is kept when its node was kept and the cosine between
    its two children's centroids is below `threshold`. The kept nodes that are not split again
    are the leaves, numbered in the order they were kept."""
    x = F.normalize(features.detach().float().cpu(), dim=-1)
    n = len(x)
    parts, nodes = ward_parts(x, leaves)
    if not nodes:
        return TreeCut(torch.zeros(n, dtype=torch.int64), [0], x.mean(0, keepdim=True))
    pm = torch.from_numpy(parts)
    cent = (pm.double() @ x.double()) / pm.sum(1, keepdim=True).double()
    cn = F.normalize(cent, dim=-1)
    sim = (cn @ cn.T).float()
    tree_id = {nodes[0][0]: 0}
    order, split = [], set()                         # kept nodes in the order they were kept; split ones
    for a, (node, c0, c1) in enumerate(nodes):
        if node not in tree_id or (a > 0 and not float(sim[2 * a, 2 * a + 1]) < threshold):
            continue
        tree_id[c0], tree_id[c1] = 2 * tree_id[node] + 1, 2 * tree_id[node] + 2
        order += [(c0, 2 * a), (c1, 2 * a + 1)]
        split.add(node)
    kept = [(c, p) for c, p in order if c not in split]
    labels = torch.full((n,), -1, dtype=torch.int64)
    for i, (_, p) in enumerate(kept):
        labels[pm[p]] = i
    centroids = torch.stack([x[labels == i].mean(0) for i in range(len(kept))])
    return TreeCut(labels, [tree_id[c] for c, _ in kept], centroids)


def centroid_energy(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The official unary of the dense CRF: per patch, the squared distance of its L2-normalised
    feature [N, C] to each centroid [S, C], minus the largest of them ([N, S], <= 0; the nearest
    centroid has the lowest energy)."""
    x = F.normalize(features.detach().float().cpu(), dim=-1).double()
    d = ((x[:, None, :] - centroids.double()[None]) ** 2).sum(-1)
    return (d - d.amax(1, keepdim=True)).float()


DENSECRF_EXTRA = "densecrf"   # pip install "namedmask[densecrf]" (pydensecrf2)


class MissingExtraError(UnavailableError, ImportError):
    """An optional dependency a chosen setting needs is not installed; the message names the extra."""


def densecrf_available() -> None:
    """Raises MissingExtraError (one line naming the extra) when pydensecrf2 is not installed."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"dense-CRF refinement needs pydensecrf2: pip install \"namedmask[{DENSECRF_EXTRA}]\" "
                                f"(or pydensecrf2), or use the bilateral solver (refine_method bilateral)") from exc


def densecrf_labels(image: torch.Tensor, energy: torch.Tensor, *, iterations: int = 10,
                    gaussian: tuple = (1, 25), bilateral: tuple = (5, 13, 100)) -> torch.Tensor:
    """The official dense-CRF refinement (pydensecrf DenseCRF2D): image uint8 [3, H, W], unary
    energy float [S, H, W]; Gaussian pairwise sxy=1 compat=25, bilateral sxy=5 srgb=13
    compat=100, diagonal kernels, symmetric normalisation, 10 mean-field iterations; argmax of Q
    -> int64 [H, W]."""
    densecrf_available()
    import pydensecrf.densecrf as dcrf

    s, h, w = energy.shape
    d = dcrf.DenseCRF2D(w, h, s)
    d.setUnaryEnergy(np.ascontiguousarray(energy.reshape(s, -1).numpy().astype(np.float32)))
    d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1], kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_SYMMETRIC)
    rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.uint8))
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=rgb, compat=bilateral[2],
                           kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    q = np.array(d.inference(iterations))
    return torch.from_numpy(q.argmax(0).reshape(h, w)).long()


@dataclass
class TreeNode:
    members: list          # leaf indices (0..S-1) under this node
    image: torch.Tensor    # its image embedding [E]
    text: torch.Tensor     # its name's text embedding [E]
    extra: object = None   # what `describe` returned beside the two embeddings (its naming)
    exclusive: bool = True


def merge_tree(tree_ids: list, describe, *, threshold: float = 0.8, weight: float = 0.5) -> dict:
    """The official bottom-up merge (run_autotext_segment_merge.py, --merge_choice mix,
    --apply_merge, --no-compute_all_nodes): leaves with tree ids `tree_ids` (segment i has
    tree_ids[i]); two siblings that are both present and unmerged-into-a-parent merge into their
    parent when weight * cos(image embeddings) + (1 - weight) * cos(text embeddings of their
    names) >= threshold; a pair that fails blocks every ancestor. describe(members) -> (image
    embedding, text embedding, extra) of a node (the leaves' and each merged parent's).
    Returns {tree id: TreeNode} of the final segments (the exclusive nodes)."""
    nodes = {}
    for i, t in enumerate(tree_ids):
        img, txt, extra = describe([i])
        nodes[int(t)] = TreeNode([i], img, txt, extra)

    def cos(a, b):
        return float(F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1))

    def climb(t):
        while t > 0:
            sib = t + 1 if t % 2 else t - 1
            if sib not in nodes or not nodes[sib].exclusive or not nodes[t].exclusive:
                return
            a, b = nodes[min(t, sib)], nodes[max(t, sib)]
            if not weight * cos(a.image, b.image) + (1 - weight) * cos(a.text, b.text) >= threshold:
                return
            members = sorted(a.members + b.members)
            img, txt, extra = describe(members)
            a.exclusive = b.exclusive = False
            t = (t - 1) // 2
            nodes[t] = TreeNode(members, img, txt, extra)

    for t in sorted(nodes):
        climb(t)
    return {t: node for t, node in sorted(nodes.items()) if node.exclusive}


REFINE_METHODS = ("bilateral", "densecrf")


def tree_segments(features: torch.Tensor, grid: tuple, image: torch.Tensor, *, leaves: int = 20,
                  threshold: float = 0.95, refine: bool = True, refine_method: str = "densecrf",
                  temperature: float = 0.05) -> tuple:
    """The paper's over-segmentation of `image` (uint8 [3, H, W]) from DINO patch features
    [h*w, C]: `cut_tree`, then every pixel's unary = `centroid_energy` of its patch (nearest
    upsampling, as the official code), refined by the dense CRF (official), or by the bilateral
    solver on softmax(-energy / temperature), or not at all (the nearest centroid). Leaves left
    with no pixel are dropped. -> (labels int64 [H, W] in 0..S-1, tree ids of the S segments)."""
    if refine and refine_method not in REFINE_METHODS:
        raise InputError(f"refine method must be one of {REFINE_METHODS}, got {refine_method!r}")
    h, w = grid
    cut = cut_tree(features, leaves, threshold)
    energy = centroid_energy(features, cut.centroids).T.reshape(-1, 1, h, w)
    H, W = image.shape[-2:]
    energy = F.interpolate(energy, size=(H, W), mode="nearest")[:, 0]
    if len(energy) == 1 or not refine:
        pixel = energy.argmin(0)
    elif refine_method == "densecrf":
        pixel = densecrf_labels(image, energy)
    else:
        soft = torch.softmax(-energy / temperature, dim=0).clamp(0, 1)
        rgb = image.permute(1, 2, 0).contiguous()
        pixel = torch.stack(bilateral_solve_batch([rgb] * len(soft), list(soft))).argmax(0)
    present, labels = torch.unique(pixel, return_inverse=True)
    return labels.view(H, W), [cut.tree_ids[int(i)] for i in present]


def propose_tree_segments(vit, image_hwc: torch.Tensor, *, size: int = 224, stride: int | None = None,
                          leaves: int = 20, threshold: float = 0.95, refine: bool = True,
                          refine_method: str = "densecrf", lap=None) -> tuple:
    """`propose_segments` with the paper's over-segmentation (`tree_segments`) of DINO's
    last-layer keys, patches `stride` apart -> (working image uint8 [3, h, w], labels int64
    [h, w], tree ids)."""
    dev = next(vit.parameters()).device
    img = working_image(image_hwc, size, patch_size(vit))
    x = img[None].to(dev, torch.float32).div(255)
    x = (x - torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    keys, grid = last_layer_keys(vit, x, stride=stride)
    if lap:
        lap("dino")
    labels, tree_ids = tree_segments(keys[0].cpu(), grid, img, leaves=leaves, threshold=threshold, refine=refine,
                                     refine_method=refine_method)
    if lap:
        lap("oversegment")
    return img, labels, tree_ids


# ------------------------------------------------------------------------------ naming

@dataclass
class Naming:
    index: torch.Tensor    # int64 [S, top]: vocabulary ids, best first
    scores: torch.Tensor   # float32 [S, top]: cosine similarities


def name_segments(embeddings: torch.Tensor, text: torch.Tensor, top: int = 3) -> Naming:
    """Cosine of each segment embedding [S, E] to each vocabulary entry [V, E]; the `top` best."""
    sim = embeddings.float() @ text.float().T
    scores, index = sim.topk(min(top, text.shape[0]), dim=1)
    return Naming(index, scores)


def classify_segments(embeddings: torch.Tensor, text: torch.Tensor, background: torch.Tensor | None = None, *,
                      logit_scale: float = 100.0, threshold: float | None = None) -> tuple:
    """Closed-set naming of segments (two-stage open-vocabulary prediction): embeddings [S, E],
    class prompts text [C, E], background prompts [B, E] (or None). As the zero-shot dense
    segmenter (maskclip.MaskClipSegmenter) scores pixels: softmax over every prompt of
    logit_scale x cosine, summed per label (0 = background, 1..C = the classes); a segment whose
    best class probability is below `threshold` is background. -> (labels int64 [S] in 0..C,
    scores float32 [S, 1 + C])."""
    if threshold is None and (background is None or len(background) == 0):
        raise InputError("segment classification needs background prompts and/or a threshold")
    bg = background.float() if background is not None else text[:0].float()
    prompts = torch.cat([bg, text.float()])
    label_of = torch.cat([torch.zeros(len(bg), dtype=torch.long), torch.arange(1, len(text) + 1)])
    probs = (logit_scale * embeddings.float() @ prompts.T).softmax(1)
    scores = torch.zeros(len(embeddings), 1 + len(text)).index_add_(1, label_of, probs)
    labels = scores.argmax(1)
    if threshold is not None:
        labels = torch.where(scores[:, 1:].amax(1) < threshold, 0, labels)
    return labels, scores


def adjacent_pairs(labels: torch.Tensor) -> set:
    """Pairs (a, b), a < b, of segment ids that touch (4-neighbourhood) in a label map."""
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        diff = a != b
        lo, hi = torch.minimum(a[diff], b[diff]), torch.maximum(a[diff], b[diff])
        pairs |= set(map(tuple, torch.unique(torch.stack([lo, hi], 1), dim=0).tolist()))
    return pairs


def merge_groups(labels: torch.Tensor, names: list, embeddings: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Union of touching segments that got the same name (not None) or whose embeddings have
    cosine >= threshold. Returns new labels 0..S'-1 (the merged map)."""
    parent = list(range(len(names)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in sorted(adjacent_pairs(labels)):
        same_name = names[a] is not None and names[a] == names[b]
        if same_name or float(embeddings[a] @ embeddings[b]) >= threshold:
            parent[root(b)] = root(a)
    roots = torch.tensor([root(i) for i in range(len(names))], dtype=torch.int64)
    return torch.unique(roots, return_inverse=True)[1][labels]
