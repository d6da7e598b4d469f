"""DINO ViTs (timm) for the saliency stage.

Weights come from one of three places, chosen explicitly:
- a local file: the official DINO layout (`dino_deitsmall16_pretrain.pth`: a flat state dict
  with `blocks.N.attn.qkv.weight`-style keys, or a full training checkpoint holding
  `teacher`/`student` with `module.`/`backbone.` prefixes and a DINO head), or timm's layout
  (`.pth` or `.safetensors`);
- the timm hub (`vit_small_patch16_224.dino` with pretrained=True) when online;
- random initialisation, only when asked for (`random_weights=True`, smoke runs).
Offline without a file is an error that says what to do, never a silent random model.

`forward_tokens` runs the ViT at any input size that is a multiple of the patch size,
interpolating the position embedding bicubically by each model's own rule: DINO (and TokenCut,
which runs DINO's code) passes scale_factor=((n + 0.1) / sqrt(N)) per side, SelfMask passes
size=(h, w) - the two differ by up to ~0.02 on real embeddings (timm's own dynamic resize
antialiases, which changes the numbers again); `last_layer_keys` hooks the last block's
qkv projection for TokenCut's key features (timm does not return attention internals).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from namedmask.errors import InputError, UnavailableError
from namedmask.models.weights import ALIASES, dino_cached, offline_reason

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoWeightsError(UnavailableError):
    """DINO weights that cannot be obtained or do not fit the model; the message says what to do."""


def build_vit(name: str = "vit_small_patch16_224.dino", *, pretrained: bool = False, **timm_kwargs):
    """A timm ViT with one class token and no classifier; random init unless `pretrained`
    (timm hub)."""
    import timm

    name = ALIASES.get(name, name)
    if not timm.is_model(name):
        raise InputError(f"unknown DINO model {name!r}; timm names such as vit_small_patch16_224.dino, "
                         f"vit_small_patch8_224.dino, vit_base_patch16_224.dino")
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    if getattr(model, "num_prefix_tokens", None) != 1 or getattr(model, "no_embed_class", False):
        raise InputError(f"{name}: expected a ViT with one class token and a class position embedding (DINO)")
    return model.eval()


def create_dino(name: str = "vit_small_patch16_224.dino", weights: str | Path | None = None, *,
                random_weights: bool = False, **timm_kwargs):
    """A DINO ViT with real weights from `weights` (a local file) or the timm hub, or random
    weights when `random_weights` is set (and no file is given)."""
    name = ALIASES.get(name, name)
    if weights is None and not random_weights:
        cached, url = dino_cached(name)
        if cached:  # timm reads the hub cache itself; no network
            return build_vit(name, pretrained=True, **timm_kwargs)
        why = offline_reason("huggingface.co")
        if why:  # timm would retry the hub for ~30 s, then fail without a hint
            raise DinoWeightsError(
                f"DINO weights {name} are not in the local cache and cannot be downloaded ({why}); download "
                f"{url or 'the official DINO checkpoint'} where there is network and pass the file: --dino-weights FILE "
                f"(namedmask run: --set saliency.dino_weights=FILE), or --random-weights for a smoke run")
        try:
            return build_vit(name, pretrained=True, **timm_kwargs)
        except ValueError:
            raise
        except Exception as exc:  # hub errors come as many types (OSError, HTTP errors, ...)
            first_line = (str(exc).splitlines() or [""])[0]
            raise DinoWeightsError(
                f"cannot download the weights of {name} ({type(exc).__name__}: {first_line}). Offline? Pass a local "
                f"file instead (official DINO checkpoint such as dino_deitsmall16_pretrain.pth, or a timm state "
                f"dict), or --random-weights for a smoke run.") from exc
    model = build_vit(name, **timm_kwargs)
    if weights is not None:
        load_dino_weights(model, weights)
    else:
        log.warning("%s: RANDOM weights (requested); masks will be meaningless", name)
    return model


def read_checkpoint(path: str | Path) -> dict:
    """A state-dict-like mapping from a .pth/.pt (tensors and plain containers only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise DinoWeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError: truncated or not a safetensors file
            raise DinoWeightsError(f"{path}: cannot read as safetensors ({exc})") from exc
    try:
        # Official DINO/SelfMask training checkpoints also pickle their argparse.Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DinoWeightsError(f"{path}: cannot read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc


def dino_to_timm(checkpoint: dict) -> dict:
    """Official DINO layout -> timm's VisionTransformer keys. Accepts the flat backbone file,
    a full training checkpoint (teacher preferred, as DINO evaluates it) or a timm state dict.
    Parameter names of the ViT body coincide; the work is unwrapping, stripping DDP/backbone
    prefixes and dropping the DINO projection head."""
    sd = checkpoint
    for key in ("teacher", "student", "model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head."):  # DINO projection head (training only)
            continue
        out[k] = v
    return out


def load_dino_weights(model, path: str | Path) -> None:
    """Loads a local DINO checkpoint (see `dino_to_timm`) into `model`, strictly."""
    sd = dino_to_timm(read_checkpoint(path))
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.patch_embed.grid_size)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
        raise DinoWeightsError(
            f"{path}: does not fit {model.default_cfg.get('architecture', type(model).__name__)}: "
            f"missing [{few(missing)}], unexpected [{few(unexpected)}], wrong shape [{few(wrong)}]. "
            f"Is it a checkpoint of this ViT (patch size, width, depth)?")
    model.load_state_dict(sd)
    log.info("loaded DINO weights from %s", path)


POS_EMBED_RULES = ("dino", "size")


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple, rule: str = "size") -> torch.Tensor:
    """[1, 1 + g*g, C] -> [1, 1 + h*w, C]: class embedding kept, the square grid resized
    bicubically (align_corners=False, no antialias). rule "size": to size=(h, w) (SelfMask,
    and checkpoint conversion); "dino": scale_factor=((h + 0.1) / g, (w + 0.1) / g) as DINO's
    interpolate_pos_encoding (the +0.1 only guards the output size; the factor itself sets
    where the bicubic kernel samples, so the values differ from size=)."""
    if rule not in POS_EMBED_RULES:
        raise InputError(f"position-embedding rule must be one of {POS_EMBED_RULES}, got {rule!r}")
    n = pos_embed.shape[1] - 1
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (g, g):
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if rule == "dino":
        scale = ((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n))
        patches = F.interpolate(patches.float(), scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(patches.shape[-2:]) != (h, w):
            raise ValueError(f"DINO position-embedding interpolation gave {tuple(patches.shape[-2:])}, not {(h, w)}")
    else:
        patches = F.interpolate(patches.float(), size=(h, w), mode="bicubic", align_corners=False)
    patches = patches.to(pos_embed.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def patch_size(vit) -> int:
    return int(vit.patch_embed.patch_size[0])


def forward_tokens(vit, images: torch.Tensor, pos_embed_rule: str = "dino", stride: int | None = None):
    """Normalised images [B, 3, H, W] (H, W multiples of the patch size) -> (last-layer
    tokens after the final norm [B, 1 + h*w, C], (h, w)). pos_embed_rule: "dino" (DINO,
    TokenCut) or "size" (SelfMask), see resample_pos_embed. stride (a divisor of the patch
    size): overlapping patches, grid 1 + (H - p) / stride per side (the dino-vit-features
    extractor's `patch_vit_resolution`, used by zero-guidance segmentation)."""
    p = patch_size(vit)
    if images.shape[-2] % p or images.shape[-1] % p:
        raise ValueError(f"input {tuple(images.shape[-2:])} is not a multiple of the patch size {p}")
    if stride is not None and stride != p:
        if stride < 1 or p % stride:
            raise InputError(f"DINO stride {stride} must divide the patch size {p}")
        proj = vit.patch_embed.proj
        x = F.conv2d(images, proj.weight, proj.bias, stride=stride)
    else:
        x = vit.patch_embed.proj(images)
    b, _, h, w = x.shape
    x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
    pos = resample_pos_embed(vit.pos_embed, (h, w), pos_embed_rule)
    x = torch.cat([vit.cls_token.expand(b, -1, -1), x], dim=1) + pos
    x = vit.norm(vit.blocks(vit.norm_pre(vit.pos_drop(x))))
    return x, (h, w)


class _KeysCaptured(Exception):
    """Raised by capture_last_keys(stop=True) once the keys exist: nothing after them is needed."""


@contextlib.contextmanager
def capture_last_keys(vit, stop: bool = False):
    """Within the block, each forward stores the last block's attention keys (heads
    concatenated, before any k-norm) as captured["keys"]: [B, N tokens, C]. stop=True ends the
    forward right there by raising _KeysCaptured (the caller catches it): the last block's
    attention and MLP and the final norm do not change the keys."""
    captured = {}
    qkv = vit.blocks[-1].attn.qkv

    def hook(module, inputs, output):
        dim = output.shape[-1] // 3  # qkv output is [q | k | v], each heads x head_dim
        captured["keys"] = output[..., dim:2 * dim]
        if stop:
            raise _KeysCaptured

    handle = qkv.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def last_layer_keys(vit, images: torch.Tensor, stride: int | None = None):
    """TokenCut's features: last-layer keys of the patch tokens [B, h*w, C], and (h, w)
    (stride: see forward_tokens). The forward stops at the last block's qkv projection (the
    official TokenCut runs that block's attention too; neither needs its MLP): the same keys,
    one twelfth less work for a 12-block ViT."""
    p = patch_size(vit)
    step = stride or p
    with capture_last_keys(vit, stop=True) as captured:
        try:
            forward_tokens(vit, images, stride=stride)
        except _KeysCaptured:
            pass
    grid = ((images.shape[-2] - p) // step + 1, (images.shape[-1] - p) // step + 1)  # the patch conv's output
    return captured["keys"][:, vit.num_prefix_tokens:], grid
