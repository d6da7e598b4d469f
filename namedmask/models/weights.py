"""Which pretrained weights a run needs, where namedmask looks for them, which are present, and,
for each missing one, where to download it and the exact option or config key that takes the
file: `namedmask weights` prints this, and `namedmask run` checks it before any stage starts
(one line per problem, no hub retries).

Places looked in, in order:
- a local file given by a flag / config key (`--pretrained`, `--dino-weights`, `archive.pretrained`,
  `saliency.dino_weights`, `saliency.checkpoint`, `train.model.pretrained`);
- the Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub),
  where open_clip and timm keep hub downloads;
- open_clip's own URL cache (~/.cache/clip) and torch's hub cache ($TORCH_HOME/hub/checkpoints),
  where URL downloads land.
Offline ($HF_HUB_OFFLINE, or the host unreachable) a missing file is an error at once."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from namedmask.errors import UnavailableError
from namedmask.io import offline_reason  # noqa: F401  (re-exported: dino, pipeline)

log = logging.getLogger(__name__)


class WeightsMissingError(UnavailableError):
    """A weights file a run needs is neither given, cached nor downloadable; the message is one
    line: which model, where namedmask looked, the URL and the key that takes the file."""

# torch.hub names of the DINO ViTs -> timm names
ALIASES = {"dino_vits16": "vit_small_patch16_224.dino", "dino_vits8": "vit_small_patch8_224.dino",
           "dino_vitb16": "vit_base_patch16_224.dino", "dino_vitb8": "vit_base_patch8_224.dino"}
# The official release files, for the hint of what to download where there is network.
DINO_URLS = {
    "vit_small_patch16_224.dino": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "vit_small_patch8_224.dino": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "vit_base_patch16_224.dino": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "vit_base_patch8_224.dino": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}
# What open_clip and timm say about the models the presets use (checked against them by
# tests/test_photos.py), so `namedmask weights` answers without importing torch, open_clip or timm.
OPEN_CLIP_WEIGHTS, OPEN_CLIP_SAFE_WEIGHTS = "open_clip_pytorch_model.bin", "open_clip_model.safetensors"
KNOWN_CLIP = {
    ("ViT-B-16", "openai"): {
        "url": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb"
               "61988df416f/ViT-B-16.pt", "hf_hub": "timm/vit_base_patch16_clip_224.openai/", "quick_gelu": True},
    ("ViT-L-14-336", "openai"): {
        "url": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2"
               "dac08641f02/ViT-L-14-336px.pt", "hf_hub": "timm/vit_large_patch14_clip_336.openai/", "quick_gelu": True},
}
KNOWN_DINO = {name: {"hf_hub_id": f"timm/{name}", "url": url} for name, url in DINO_URLS.items()}
DINO_RESNET50_URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
SELFMASK_URL = "https://github.com/NoelShin/selfmask/releases/download/v1.0.0/selfmask_nq20.pt"
# Small timm backbones of the cpu preset: torchvision's ImageNet weights share timm's key layout.
BACKBONE_URLS = {
    "resnet50": DINO_RESNET50_URL,
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
}


@dataclass
class Weights:
    """One model a run needs."""
    role: str                   # CLIP | DINO | SelfMask | backbone
    model: str                  # what it is (ViT-B-16/openai, vit_small_patch16_224.dino, ...)
    status: str                 # present | missing | random | local file missing
    key: str                    # the run config key that takes a file
    flag: str                   # the stage command's option that takes it ("saliency --dino-weights FILE")
    path: str | None = None     # the file found
    url: str | None = None      # where to download it
    looked: list = field(default_factory=list)
    required: bool = True       # False: training runs without it (random init, a warning)
    note: str = ""              # appended to the hint (e.g. the -quickgelu model a local OpenAI file needs)

    @property
    def ok(self) -> bool:
        return self.status in ("present", "random")

    def line(self, offline: str | None = None) -> str:
        """One line: what, where it is, or what to do."""
        head = f"{self.role} {self.model}: "
        if self.status == "present":
            return head + f"present ({self.path})"
        if self.status == "random":
            return head + "RANDOM weights (requested; smoke runs only)"
        if self.status == "local file missing":
            return head + f"{self.path}: no such file; fix it: namedmask run --set {self.key}=FILE (or {self.flag})"
        where = "not in " + ", ".join(self.looked) if self.looked else "no file given"
        why = f"; offline ({offline})" if offline else ""
        fetch = f"download {self.url} and pass it" if self.url else "pass a local file"
        optional = " (optional: without it training starts from random weights)" if not self.required else ""
        return head + (f"missing ({where}){why}; {fetch}: namedmask run --set {self.key}=FILE{self.note} "
                       f"(or {self.flag}){optional}")


TINY_MODEL = "nm-tiny"   # a tiny CLIP config (open_clip_configs/) for tests and smoke runs
_CONFIG_DIR = Path(__file__).with_name("open_clip_configs")


def register_configs() -> None:
    """Makes namedmask's model configs (nm-tiny, nm-toy) known to open_clip."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def default_pretrained(name: str) -> str:
    """What --pretrained means when not given: OpenAI weights where they exist, random for nm-tiny."""
    import open_clip

    from namedmask.errors import InputError

    if "openai" in open_clip.list_pretrained_tags_by_model(name):
        return "openai"
    if name == TINY_MODEL:
        return "random"
    raise InputError(f"CLIP model {name!r} has no 'openai' weights; pass --pretrained with one of "
                     f"{open_clip.list_pretrained_tags_by_model(name)}, a checkpoint file, or 'random'")


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def clip_tag_cfg(name: str, tag: str) -> dict:
    """open_clip's pretrained config of a tag (the known ones without importing open_clip)."""
    if (name, tag) in KNOWN_CLIP:
        return dict(KNOWN_CLIP[(name, tag)])
    import open_clip

    register_configs()
    return open_clip.get_pretrained_cfg(name, tag) if name in open_clip.list_models() else {}


def cached_clip_weights(tag_cfg: dict) -> str | None:
    """The weights file of an open_clip pretrained tag if it is already on disk (no network):
    its `file`, the HF hub cache (safetensors first), or open_clip's URL cache (~/.cache/clip)."""
    if tag_cfg.get("file"):
        return tag_cfg["file"]
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or OPEN_CLIP_WEIGHTS
        names = ([OPEN_CLIP_SAFE_WEIGHTS] if filename == OPEN_CLIP_WEIGHTS else []) + [filename]
        found = _hub_file(repo, names)
        if found:
            return found
    if tag_cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if path.is_file():
            return str(path)
    return None


def torch_hub_checkpoints() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def _hub_file(repo: str, names) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str):
            return path
    return None


def _short(path: Path) -> str:
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def clip_weights(name: str, pretrained: str | None) -> Weights:
    """The CLIP of stage (A): an open_clip name and tag / file / 'random'."""
    key, flag = "archive.pretrained", "build-archive --pretrained FILE"
    if not pretrained:  # models.clip.default_pretrained: OpenAI weights where they exist
        if (name, "openai") in KNOWN_CLIP:
            pretrained = "openai"
        else:
            try:
                pretrained = default_pretrained(name)
            except Exception:
                pretrained = "?"
    label = f"{name}/{pretrained}"
    if pretrained == "random":
        return Weights("CLIP", label, "random", key, flag)
    if Path(pretrained).suffix or os.sep in str(pretrained):
        p = Path(pretrained)
        return Weights("CLIP", name, "present" if p.is_file() else "local file missing", key, flag, path=str(p))
    tag = clip_tag_cfg(name, pretrained)
    looked = [_short(hub_cache()), "~/.cache/clip"]
    if not tag:
        return Weights("CLIP", label, "missing", key, flag, looked=looked)
    cached = cached_clip_weights(tag)
    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"])
        url = f"https://huggingface.co/{repo}/resolve/main/{filename or OPEN_CLIP_WEIGHTS}"
    else:
        url = tag.get("url")
    # open_clip builds OpenAI weights with QuickGELU from the tag; from a file only as NAME-quickgelu
    note = f" --set archive.model={name}-quickgelu" if tag.get("quick_gelu") and not name.endswith("-quickgelu") else ""
    return Weights("CLIP", label, "present" if cached else "missing", key, flag, path=cached, url=url, looked=looked,
                   note=note)


def dino_weights(name: str, path: str | None, random_weights: bool = False, *, key="saliency.dino_weights",
                 flag="saliency --dino-weights FILE") -> Weights:
    """A DINO ViT (timm name) for TokenCut / discover."""
    name = ALIASES.get(name, name)
    if path:
        p = Path(path)
        return Weights("DINO", name, "present" if p.is_file() else "local file missing", key, flag, path=str(p))
    if random_weights:
        return Weights("DINO", name, "random", key, flag)
    cached, url = dino_cached(name)
    looked = [_short(hub_cache()), _short(torch_hub_checkpoints())]
    return Weights("DINO", name, "present" if cached else "missing", key, flag, path=cached,
                   url=DINO_URLS.get(name, url), looked=looked)


def dino_cached(name: str) -> tuple[str | None, str | None]:
    """(cached weights file of timm's pretrained `name`, its download URL) without network."""
    cfg = KNOWN_DINO.get(name)
    if cfg is None:
        import timm

        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:
            cfg = None
        if cfg is None:
            return None, DINO_URLS.get(name)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    repo = cfg.get("hf_hub_id")
    if repo:
        found = _hub_file(repo, [cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"])
        if found:
            return found, f"https://huggingface.co/{repo}"
    if cfg.get("url"):
        p = torch_hub_checkpoints() / os.path.basename(cfg["url"])
        if p.is_file():
            return str(p), cfg["url"]
    return None, DINO_URLS.get(name) or (f"https://huggingface.co/{repo}" if repo else cfg.get("url"))


def selfmask_weights(path: str | None, random_weights: bool = False) -> Weights:
    key, flag = "saliency.checkpoint", "saliency --checkpoint FILE"
    if random_weights and not path:
        return Weights("SelfMask", "selfmask_nq20", "random", key, flag)
    if path:
        p = Path(path)
        return Weights("SelfMask", "selfmask_nq20", "present" if p.is_file() else "local file missing", key, flag,
                       path=str(p))
    return Weights("SelfMask", "selfmask_nq20", "missing", key, flag, url=SELFMASK_URL)


def backbone_weights(backbone: str, path: str | None, key: str = "train.model.pretrained") -> Weights:
    role = "DINO-ResNet-50" if backbone == "resnet50" else "backbone"
    flag = "train --set model.pretrained=FILE" if key.startswith("train.") else "experts --set train.model.pretrained=FILE"
    if path:
        p = Path(path)
        return Weights(role, backbone, "present" if p.is_file() else "local file missing", key, flag, path=str(p),
                       required=False)
    return Weights(role, backbone, "missing", key, flag, url=BACKBONE_URLS.get(backbone), required=False)


def run_weights(cfg) -> list:
    """Every model a RunConfig's stages need, in stage order."""
    out = []
    stages = set(cfg.stages)
    if "archive" in stages:
        out.append(clip_weights(cfg.archive.model, cfg.archive.pretrained))
    if "saliency" in stages:
        s = cfg.saliency
        if s.method == "selfmask":
            out.append(selfmask_weights(s.checkpoint, s.random_weights))
        else:
            out.append(dino_weights(s.dino or "vit_small_patch16_224.dino", s.dino_weights, s.random_weights))
    if "experts" in stages and cfg.experts.enabled:
        m = cfg.experts.train.model
        w = backbone_weights(m.backbone, m.pretrained, key="experts.train.model.pretrained")
        w.role = f"{w.role} (experts)"
        out.append(w)
    if "train" in stages:
        out.append(backbone_weights(cfg.train.model.backbone, cfg.train.model.pretrained))
    return out


def check_run(cfg, run: Path | None = None) -> None:
    """Before `namedmask run` starts a stage: every model the stages still to run need is
    present, random by request, or downloadable now; else WeightsMissingError with its line.
    A stage already finished in `run` (its .stages marker) needs nothing. A missing optional
    backbone is a warning."""
    from urllib.parse import urlparse

    done = {p.stem for p in (Path(run) / ".stages").glob("*.json")} if run is not None else set()
    stage_of = {"CLIP": "archive", "DINO": "saliency", "SelfMask": "saliency"}
    for w in run_weights(cfg):
        if w.ok or stage_of.get(w.role, "train") in done:
            continue
        if not w.required:
            log.warning(w.line())
            continue
        if w.status == "missing" and w.url:
            why = offline_reason(urlparse(w.url).hostname)
            if why is None:
                log.info("%s %s is not cached: it will be downloaded", w.role, w.model)
                continue
            raise WeightsMissingError(w.line(why))
        raise WeightsMissingError(w.line())
