"""CLIP through open_clip: any model name open_clip knows, with a pretrained tag (from the
local cache, or downloaded when the network is there), a local checkpoint file in open_clip's
format, or random weights from a fixed seed. Weights that are neither cached nor downloadable
fail at once with a message saying how to pass a local file (open_clip alone would spend a
minute in hub retries first).

`nm-tiny` is a tiny CLIP registered with open_clip for tests and smoke runs (random weights);
it is never a default."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from namedmask.errors import InputError, UnavailableError
from namedmask.io import offline_reason as _offline_reason
from namedmask.models.weights import cached_clip_weights as _cached_weights  # noqa: F401
from namedmask.models.weights import default_pretrained, register_configs  # noqa: F401  (defined there, torch-free)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-L-14-336"
TINY_MODEL = "nm-tiny"
TOY_MODEL = "nm-toy"     # the toy world's tiny CLIP (namedmask/toy), trained here on generated data
RANDOM = "random"        # --pretrained value: random weights from RANDOM_SEED
RANDOM_SEED = 0


class WeightsUnavailableError(UnavailableError):
    """Pretrained weights are not cached and cannot be downloaded."""


@dataclass
class Clip:
    model: torch.nn.Module
    tokenizer: object
    name: str
    pretrained: str            # the tag, the checkpoint file (absolute) or "random"
    image_size: int
    embed_dim: int
    mean: tuple
    std: tuple
    device: torch.device

    def describe(self) -> dict:
        return {"name": self.name, "pretrained": self.pretrained, "image_size": self.image_size,
                "embed_dim": self.embed_dim, "mean": list(self.mean), "std": list(self.std)}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] (S = image_size) -> float32 L2-normalised [B, D]."""
        x = images.to(self.device, torch.float32).div_(255)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image((x - mean) / std).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list, batch_size: int = 256) -> torch.Tensor:
        """Strings -> float32 L2-normalised [N, D]. A progress bar when there are many (a
        vocabulary of thousands of names x 85 templates takes hours on a CPU)."""
        out = []
        with tqdm(total=len(texts), unit="prompt", desc=f"{self.name} text", disable=len(texts) <= 4 * batch_size,
                  leave=False) as bar:
            for i in range(0, len(texts), batch_size):
                out.append(self.model.encode_text(self.tokenizer(texts[i:i + batch_size]).to(self.device)).float())
                bar.update(len(out[-1]))
        return F.normalize(torch.cat(out), dim=-1)


def load_clip(name: str = DEFAULT_MODEL, pretrained: str | None = None, device: str | torch.device = "cpu") -> Clip:
    """name: an open_clip model name (or nm-tiny); pretrained: a tag of that model, a checkpoint
    file in open_clip's format (a state dict, .pt/.bin/.safetensors), 'random', or None for
    default_pretrained(name)."""
    register_configs()
    if name not in open_clip.list_models():
        raise InputError(f"unknown CLIP model {name!r}; open_clip knows e.g. {DEFAULT_MODEL}, ViT-B-16, {TINY_MODEL} "
                         f"(open_clip.list_models() lists all)")
    pretrained = pretrained or default_pretrained(name)
    tag_cfg, checkpoint = {}, None
    if pretrained == RANDOM:
        log.warning("CLIP %s with random weights (seed %d): for tests and smoke runs only", name, RANDOM_SEED)
    elif Path(pretrained).is_file():
        checkpoint = pretrained = str(Path(pretrained).resolve())
        _warn_if_quick_gelu_needed(name)
    else:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            raise InputError(f"--pretrained {pretrained!r}: not a file, and not a tag of {name} "
                             f"(tags: {open_clip.list_pretrained_tags_by_model(name)}, or {RANDOM!r})")
        checkpoint = _cached_or_downloaded(name, pretrained, tag_cfg)
    cfg = open_clip.get_model_config(name)
    device = torch.device(device)
    # Random init draws from the global RNG: a fixed seed makes "random" reproducible, and the
    # caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        try:
            model = open_clip.create_model(name, pretrained=checkpoint, device=device,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
        except Exception as exc:  # a truncated file fails as EOFError, UnpicklingError, SafetensorError, ...
            if checkpoint is None:
                raise
            first = (str(exc).splitlines() or [""])[0]
            raise InputError(f"{checkpoint}: cannot load as {name} weights in open_clip's format "
                             f"({type(exc).__name__}: {first}); is the file complete?") from exc
    model.eval()
    image_size = cfg["vision_cfg"]["image_size"]
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    return Clip(model, open_clip.get_tokenizer(name), name, pretrained, int(image_size), int(cfg["embed_dim"]),
                tuple(tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                tuple(tag_cfg.get("std", open_clip.OPENAI_DATASET_STD)), device)


def _warn_if_quick_gelu_needed(name: str) -> None:
    openai = open_clip.get_pretrained_cfg(name, "openai")
    if openai.get("quick_gelu") and not name.endswith("-quickgelu"):
        log.warning("%s from a local file uses GELU; if the file holds OpenAI weights, use --model %s-quickgelu",
                    name, name)


def _cached_or_downloaded(name: str, tag: str, tag_cfg: dict) -> str:
    cached = _cached_weights(tag_cfg)
    if cached:
        return cached
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        source = f"https://huggingface.co/{repo}/resolve/main/{filename or open_clip.constants.HF_WEIGHTS_NAME}"
    else:
        host, source = urlparse(tag_cfg["url"]).hostname, tag_cfg["url"]
    why = _offline_reason(host)
    if why:
        raise WeightsUnavailableError(
            f"CLIP weights {name}/{tag} are not in the local cache and cannot be downloaded ({why}). "
            f"Download them where there is network ({source}), copy the file here and pass "
            f"--pretrained /path/to/file (an open_clip state dict: .bin, .pt or .safetensors)"
            + (f" with --model {name}-quickgelu" if tag_cfg.get("quick_gelu") else "")
            + "; in namedmask run: --set archive.pretrained=FILE"
            + (f" --set archive.model={name}-quickgelu" if tag_cfg.get("quick_gelu") else "") + ".")
    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as exc:  # network errors come in many types
        raise WeightsUnavailableError(f"downloading CLIP weights {name}/{tag} from {source} failed ({exc}); "
                                      f"pass a local file with --pretrained PATH (namedmask run: --set archive.pretrained=FILE)") from exc
