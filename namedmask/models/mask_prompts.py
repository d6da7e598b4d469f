"""Mask prompt tuning (OVSeg, Liang et al. 2023): CLIP sees a masked region as an image whose
blanked patches are a flat grey; learnable prompt tokens take the place of those patches'
tokens in the first `depth` blocks, CLIP's weights stay frozen. The tokens are one per patch
position and block, [depth, L, D], stored as a small safetensors file:

  tokens: float32 [depth, L, D]
  metadata: schema "namedmask-mask-prompts/1", model (open_clip name), grid "gh,gw", width D

OVSeg's released recipe (facebookresearch/ov-seg), the `ovseg` presets:
- training (open_clip_training: scripts/coco_proposal_1cap_mask_prompt_tuning_VitL.sh,
  training/main_mask_prompt_tuning.py, open_clip/loss.py ClipLoss, training/scheduler.py
  cosine_lr): prompt depth 3; open_clip's symmetric in-batch contrastive loss between each
  region and its plain noun (the caption tokenised as is, no template; another region of the
  same noun in the batch is a negative), its logit scale learned too (clamped to at most 100
  after every step); AdamW lr 0.05, betas (0.9, 0.98), eps 1e-6 (open_clip's ViT defaults), no
  weight decay on the prompts; lr warm-up (step + 1) / 100 for 100 steps, then cosine to 0.
- inference (open_vocab_seg/ovseg_model.py semantic_inference, configs CLIP_ENSEMBLE_WEIGHT,
  TEXT_TEMPLATES): ViLD's 14 templates; per region the segmenter's class probabilities (softmax
  over the classes and its learned no-object embedding, no-object then dropped) and CLIP's
  (softmax over the classes of 100 x cosine; the no-object column is dropped before it) are
  combined as p_seg^(1 - 0.7) x p_clip^0.7; the region takes the argmax class.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from namedmask import io
from namedmask.errors import BadInputError
from namedmask.models.clip import Clip
from namedmask.models.zero_guidance import _visual, clip_depth, clip_forward, clip_grid, patch_fractions

SCHEMA = "namedmask-mask-prompts/1"
# `adapt-clip --preset ovseg`: AdaptConfig values (see the module's notes).
OVSEG_TRAINING = {"depth": 3, "loss": "contrastive", "lr": 0.05, "warmup": 100, "schedule": "cosine",
                  "beta2": 0.98, "eps": 1e-6, "templates": "vild", "negatives": "none"}
# `predict --proposals segmenter --preset ovseg`: TwoStageConfig values.
OVSEG_INFERENCE = {"templates": "vild", "ensemble": 0.7}
OVSEG_SCALE = 100.0   # the CLIP adapter's fixed temperature at inference (get_sim_logits)


class MaskPromptsError(BadInputError):
    """A mask-prompt file that is missing, of another schema or made for another CLIP."""


class MaskPrompts(torch.nn.Module):
    def __init__(self, clip: Clip, depth: int = 1, seed: int = 0, tokens: torch.Tensor | None = None):
        super().__init__()
        width = _visual(clip).class_embedding.shape[-1]
        gh, gw = clip_grid(clip)
        if not 1 <= depth <= clip_depth(clip):
            raise MaskPromptsError(f"mask-prompt depth must be in 1..{clip_depth(clip)} for {clip.name}, got {depth}")
        if tokens is None:
            g = torch.Generator().manual_seed(seed)
            tokens = 0.02 * torch.randn(depth, gh * gw, width, generator=g)
        self.tokens = torch.nn.Parameter(tokens.float().to(clip.device))
        self.model_name = clip.name
        self.grid = (gh, gw)

    @property
    def depth(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def blank_patches(clip: Clip, masks: torch.Tensor) -> torch.Tensor:
        """Bool masks [B, S, S] at CLIP's input size -> bool [B, L]: patches the mask does not touch."""
        return patch_fractions(masks, clip_grid(clip)).to(clip.device) <= 1e-6

    def forward(self, clip: Clip, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Normalised masked images x [B, 3, S, S] and their masks [B, S, S] -> embeddings [B, E]."""
        return clip_forward(clip, x, prompts=self.tokens, blank=self.blank_patches(clip, masks))

    def save(self, path: str | Path) -> None:
        """Atomic and byte-identical for equal tokens (io.save_safetensors sorts the metadata)."""
        gh, gw = self.grid
        io.save_safetensors({"tokens": self.tokens.detach().float().cpu().contiguous()}, path,
                            metadata={"schema": SCHEMA, "model": self.model_name, "grid": f"{gh},{gw}",
                                      "width": str(self.tokens.shape[2])})


def load_mask_prompts(path: str | Path, clip: Clip) -> MaskPrompts:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MaskPromptsError(f"--mask-prompts {path}: no such file (make one with `namedmask adapt-clip`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tokens = f.get_tensor("tokens")
    except Exception as exc:  # safetensors raises several types for a bad file
        raise MaskPromptsError(f"--mask-prompts {path}: not a mask-prompt file ({exc})") from exc
    if meta.get("schema") != SCHEMA:
        raise MaskPromptsError(f"--mask-prompts {path}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    gh, gw = clip_grid(clip)
    width = _visual(clip).class_embedding.shape[-1]
    if tokens.ndim != 3 or tokens.shape[1:] != (gh * gw, width) or tokens.shape[0] > clip_depth(clip):
        raise MaskPromptsError(f"--mask-prompts {path}: tokens {tuple(tokens.shape)} were made for CLIP "
                               f"{meta.get('model')!r}, they do not fit {clip.name} (grid {gh}x{gw}, width {width})")
    return MaskPrompts(clip, depth=tokens.shape[0], tokens=tokens)


# ---------------------------------------------------------------- OVSeg's training and inference rules

def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """open_clip's ClipLoss on one process: L2-normalised image [B, E] and text [B, E] rows, row i
    of each a pair -> (CE(s I T^T, i) + CE(s T I^T, i)) / 2, s = logit_scale (already exp'd)."""
    labels = torch.arange(len(image), device=image.device)
    per_image = logit_scale * image @ text.T
    per_text = logit_scale * text @ image.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def lr_factor(step: int, steps: int, warmup: int = 0, schedule: str = "constant") -> float:
    """The learning rate of step `step` (0-based) of `steps`, as a factor of the base rate:
    (step + 1) / warmup during the warm-up, then 1 (constant) or open_clip's cosine_lr,
    0.5 (1 + cos(pi e / (steps - warmup))), e = step - warmup."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
    return 1.0


def region_class_scores(probs: torch.Tensor, masks: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A segmenter's per-pixel class probabilities [K, H, W] (softmax over its labels, background
    0 among them) and bool region masks [R, H, W] -> [R, len(columns)]: per region the mean
    probability of the labels `columns` (the named classes; background and other labels dropped
    after the softmax, as OVSeg drops no-object)."""
    m = masks.flatten(1).to(probs.dtype)
    mean = (m @ probs.flatten(1).T) / m.sum(1, keepdim=True).clamp_min(1)
    return mean[:, columns]


def ovseg_ensemble(seg_scores: torch.Tensor, clip_embeddings: torch.Tensor, text: torch.Tensor,
                   weight: float = 0.7, scale: float = OVSEG_SCALE) -> torch.Tensor:
    """OVSeg's geometric ensemble: segmenter class probabilities [R, C], L2-normalised region
    embeddings [R, E] and class text [C, E] -> p_seg^(1 - weight) x p_clip^weight [R, C], p_clip =
    softmax over the classes of scale x cosine."""
    p_clip = (scale * clip_embeddings.float() @ text.float().T).softmax(1)
    return seg_scores.float().pow(1 - weight) * p_clip.pow(weight)
