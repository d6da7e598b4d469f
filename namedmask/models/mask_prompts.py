"""Mask prompt tuning (OVSeg, Liang et al. 2023): CLIP sees a masked region as an image whose
blanked patches are a flat grey; learnable prompt tokens take the place of those patches'
tokens in the first `depth` blocks, CLIP's weights stay frozen. The tokens are one per patch
position and block, [depth, L, D], stored as a small safetensors file:

  tokens: float32 [depth, L, D]
  metadata: schema "namedmask-mask-prompts/1", model (open_clip name), grid "gh,gw", width D
"""
from __future__ import annotations

from pathlib import Path

import torch

from namedmask import io
from namedmask.errors import BadInputError
from namedmask.models.clip import Clip
from namedmask.models.zero_guidance import _visual, clip_depth, clip_forward, clip_grid, patch_fractions

SCHEMA = "namedmask-mask-prompts/1"


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
