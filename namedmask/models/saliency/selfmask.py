"""SelfMask (Shin et al. 2022) as NamedMask runs it for pseudo-masks.

Encoder: a DINO ViT-S/8 (fine-tuned), last-layer patch tokens after the final norm.
Decoder: DETR-style, 6 post-norm layers (d = 384, 6 heads, FFN 1536, ReLU, no dropout at
inference), 20 learned queries used as query positions with zero targets, memory without
position encoding, a final LayerNorm. Masks: sigmoid(query · feature) on the patch features
upsampled x2 (bilinear), i.e. at 1/4 of the input for patch 8. Objectness: a 3-layer MLP
per query. Inference: short side 512, pad right/bottom to a multiple of the patch size,
upsample the mask probabilities x4 (bilinear), crop the padding, take the query with the
largest objectness, threshold at 0.5.

Bounded cost on very elongated images: the ViT's attention costs time (and, without a fused
kernel, memory) quadratic in the patch tokens, and a 20000x512 panorama at short side 512 has
64 x 2500 = 160k tokens (hours on a CPU). So the tokens are capped at `max_tokens` (default
16384: images up to 4:1 at short side 512 are unaffected): when the short-side resize would give
more (padded grid), the short side is lowered one patch at a time until it gives at most that
(`selfmask_short_side`; 20000x512 -> short side 160, 20 x 782 = 15640 tokens), and logged.

Parameter names follow the official code, so its checkpoint (`{"model": state_dict}`,
e.g. selfmask_nq20.pt) loads strictly: encoder.* (DINO ViT layout), decoder.layers.N.
{self_attn, multihead_attn, linear1, linear2, norm1..3}, decoder.norm, query_embed, ffn.layers.N.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from namedmask.models.dino import DinoWeightsError, build_vit, forward_tokens, patch_size, read_checkpoint
from namedmask.models.saliency.common import capped_short_side, resize_short_side

log = logging.getLogger(__name__)

OFFICIAL = {"encoder": "vit_small_patch8_224.dino", "encoder_kwargs": {}, "n_queries": 20, "n_decoder_layers": 6}


class DecoderLayer(nn.Module):
    """One DETR decoder layer, post-norm; sequences are [length, batch, dim]."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.multihead_attn = nn.MultiheadAttention(dim, heads)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory, memory, need_weights=False)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class QueryDecoder(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(query_pos)
        for layer in self.layers:
            out = layer(out, memory, query_pos)
        return self.norm(out)


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, n_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class SelfMask(nn.Module):
    def __init__(self, encoder, n_queries: int = 20, n_decoder_layers: int = 6, scale_factor: int = 2):
        super().__init__()
        dim = encoder.embed_dim
        heads = encoder.blocks[0].attn.num_heads
        ffn_dim = encoder.blocks[0].mlp.fc1.out_features  # dim * mlp_ratio, as the official decoder
        self.encoder = encoder
        self.decoder = QueryDecoder(dim, heads, ffn_dim, n_decoder_layers)
        self.query_embed = nn.Parameter(torch.randn(n_queries, dim))  # N(0, 1), as nn.Embedding
        self.ffn = MLP(dim, dim, 1, n_layers=3)
        self.scale_factor = scale_factor

    def forward(self, images: torch.Tensor):
        """Normalised [B, 3, H, W], H and W multiples of the patch size -> (mask
        probabilities [B, Q, sH/p, sW/p], objectness logits [B, Q])."""
        tokens, hw = forward_tokens(self.encoder, images, pos_embed_rule="size")  # SelfMask's own rule: size=
        return self.head(tokens, hw)

    def head(self, tokens: torch.Tensor, hw: tuple):
        """Decoder, mask and objectness heads on the encoder's tokens [B, 1 + h*w, C]."""
        h, w = hw
        patches = tokens[:, self.encoder.num_prefix_tokens:]                       # B, hw, C
        b = patches.shape[0]
        queries = self.decoder(patches.transpose(0, 1), self.query_embed[:, None].expand(-1, b, -1))
        queries = queries.transpose(0, 1)                                          # B, Q, C
        features = patches.transpose(1, 2).reshape(b, -1, h, w)
        features = F.interpolate(features, scale_factor=self.scale_factor, mode="bilinear")
        masks = torch.sigmoid(torch.einsum("bqc,bchw->bqhw", queries, features))
        return masks, self.ffn(queries)[..., 0]


def select_masks(masks: torch.Tensor, objectness: torch.Tensor, padded: tuple, size: tuple,
                 threshold: float = 0.5) -> torch.Tensor:
    """NamedMask's selection: per image the query with max objectness, its probability map
    upsampled bilinearly to the padded input size `padded` (x4 for patch 8), cropped to
    `size` (h, w), > threshold -> bool [B, h, w]."""
    best = objectness.argmax(dim=1)
    chosen = masks[torch.arange(masks.shape[0]), best][:, None]                 # B, 1, h', w'
    chosen = F.interpolate(chosen, size=padded, mode="bilinear", align_corners=False)
    return chosen[:, 0, :size[0], :size[1]] > threshold


MAX_TOKENS = 16384


def selfmask_short_side(height: int, width: int, short_side: int, patch: int, max_tokens: int = MAX_TOKENS) -> int:
    """The short side to resize to: `short_side`, lowered one patch at a time while the padded
    patch grid of the resized image would hold more than max_tokens tokens."""
    return capped_short_side(height, width, short_side, patch, max_tokens)


class SelfMaskPredictor:
    """The saliency-model face of SelfMask (see common.SaliencyModel)."""
    name = "selfmask"

    def __init__(self, model: SelfMask, short_side: int = 512, max_tokens: int = MAX_TOKENS):
        self.model, self.short_side, self.max_tokens = model.eval(), short_side, max_tokens
        self.patch = patch_size(model.encoder)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        side = selfmask_short_side(image.shape[0], image.shape[1], self.short_side, self.patch, self.max_tokens)
        if side != self.short_side:
            log.info("SelfMask: a %dx%d image at short side %d would exceed %d patch tokens; short side %d",
                     image.shape[1], image.shape[0], self.short_side, self.max_tokens, side)
        return resize_short_side(image, side)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        padded = F.pad(images, (0, (-w) % self.patch, 0, (-h) % self.patch), value=0.0)  # zeros after normalising
        masks, objectness = self.model(padded)
        return select_masks(masks, objectness, tuple(padded.shape[-2:]), (h, w))


def save_selfmask(model: SelfMask, path: str | Path, encoder: str = OFFICIAL["encoder"], encoder_kwargs: dict | None = None) -> None:
    """Official layout {"model": state_dict} plus a "config" with the architecture, so
    non-default (e.g. tiny test) models load without being told their shape."""
    from namedmask.io import save_torch

    config = {"encoder": encoder, "encoder_kwargs": dict(encoder_kwargs or {}),
              "n_queries": model.query_embed.shape[0], "n_decoder_layers": len(model.decoder.layers)}
    save_torch({"model": model.state_dict(), "config": config}, path)


def load_selfmask(path: str | Path) -> SelfMask:
    """A SelfMask from a checkpoint: the official one (ViT-S/8, 20 queries, 6 layers) or one
    written by save_selfmask (architecture in its "config")."""
    ckpt = read_checkpoint(path)
    config = {**OFFICIAL, **ckpt.get("config", {})} if isinstance(ckpt.get("config"), dict) else dict(OFFICIAL)
    sd = ckpt.get("model", ckpt)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    model = SelfMask(build_vit(config["encoder"], **config["encoder_kwargs"]), config["n_queries"],
                     config["n_decoder_layers"])
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        raise DinoWeightsError(f"{path}: not a SelfMask checkpoint of {config}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict(sd)
    log.info("loaded SelfMask from %s", path)
    return model.eval()
