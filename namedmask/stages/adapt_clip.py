"""`namedmask adapt-clip --archive RUN/archive --masks RUN/refined --out DIR`: mask prompt
tuning on NamedMask's own (image, refined mask, category words) triples.

Each archive image with a non-empty mask becomes a masked crop (namedmask.models.zero_guidance
.masked_crops: the mask's bounding box, outside pixels set to CLIP's mean colour) labelled with
its category (the archive's duplicate policy decides for an image in two archives). Crops are
made a batch at a time from the files (RegionFiles), so memory does not grow with the archive. CLIP is
frozen; the prompt tokens (namedmask.models.mask_prompts) that replace the blank patches are
trained with cross-entropy over the categories, whose text embeddings are the prompt ensemble of
every word the archive embedded them with (name + synonyms), and, with `negatives`, over the
entries of a vocabulary that share no word with them (classes no region belongs to: prompts
trained on the categories alone learn a closed choice among them). `finetune=True` also trains
CLIP's image tower and writes it as an open_clip state dict (`--pretrained FILE` loads it).

A held-out share of the pairs (by a seeded permutation) is never trained on: adapt.json reports
masked-region accuracy there for plain CLIP and with the prompts.

Output: DIR/mask_prompts.safetensors (`discover --embed crop --mask-prompts`), DIR/adapt.json,
DIR/negatives_text.safetensors (the negatives' text embeddings, kept so that a rerun does not
encode them again), DIR/clip_finetuned.safetensors (finetune only). A finished folder with the same settings is
left as it is (resumable); other settings in it are refused.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from namedmask import io
from namedmask.config import AdaptConfig, changed_settings
from namedmask.data.archive import load_archive
from namedmask.data.decode import ImageDecodeError, load_image
from namedmask.data.pseudo_masks import mask_paths, no_foreground_message, read_pseudo_mask
from namedmask.data.vocabulary import Vocabulary, load_vocabulary
from namedmask.errors import BadInputError
from namedmask.models import zero_guidance as zg
from namedmask.models.clip import Clip, load_clip
from namedmask.models.mask_prompts import MaskPrompts, contrastive_loss, lr_factor
from namedmask.models.maskclip import ensemble_text_embeddings
from namedmask.models.prompts import get_templates
from namedmask.runtime import resolve_device

log = logging.getLogger(__name__)

CONFIG_NAME = "adapt.json"
PROMPTS_NAME = "mask_prompts.safetensors"
NEGATIVES_NAME = "negatives_text.safetensors"  # the negatives vocabulary's text embeddings (a cache)
# Settings added since the first folders were written, at the value they had before.
LEGACY_SETTINGS = {"negatives": None, "loss": "ce", "warmup": 0, "schedule": "constant", "beta2": 0.999, "eps": 1e-8}


class AdaptError(BadInputError):
    """No usable (image, mask) pairs, or an output folder made with other settings."""


@dataclass
class Regions:
    """Masked regions held in memory (small sets, tests, benches)."""
    crops: torch.Tensor    # uint8 [N, 3, S, S]
    masks: torch.Tensor    # bool [N, S, S]
    labels: torch.Tensor   # int64 [N], 0..C-1
    names: list            # category names, index = label

    def batch(self, idx: torch.Tensor) -> tuple:
        """(uint8 crops [B, 3, S, S], bool masks [B, S, S]) of regions `idx`."""
        return self.crops[idx], self.masks[idx]


class RegionFiles:
    """The archive's masked regions, read from disk a batch at a time (memory does not grow with
    the archive): `batch(idx)` decodes those images and masks and makes their masked crops
    (namedmask.models.zero_guidance.masked_crops) — the same crops `Regions` would hold."""

    def __init__(self, items: list, labels: torch.Tensor, names: list, size: int, mean: tuple):
        self.items, self.labels, self.names, self.size, self.mean = items, labels, names, size, mean

    def crop(self, i: int) -> tuple:
        image_path, mask_path = self.items[i]
        try:
            image = load_image(image_path)
        except ImageDecodeError as exc:
            raise AdaptError(str(exc)) from exc
        mask = torch.from_numpy(read_pseudo_mask(mask_path, AdaptError) == 1)
        if mask.shape != tuple(image.shape[:2]):
            raise AdaptError(f"{mask_path}: size {tuple(mask.shape)} differs from its image {tuple(image.shape[:2])}")
        c, m = zg.masked_crops(image.permute(2, 0, 1), mask[None], self.size, self.mean)
        return c[0], m[0]

    def batch(self, idx: torch.Tensor) -> tuple:
        crops, masks = zip(*(self.crop(int(i)) for i in idx))
        return torch.stack(crops), torch.stack(masks)

    def in_memory(self) -> Regions:
        crops, masks = self.batch(torch.arange(len(self.labels)))
        return Regions(crops, masks, self.labels, self.names)


def load_regions(archive_path, masks_dir, size: int, mean: tuple) -> RegionFiles:
    """Every archive image that has a non-empty mask in `masks_dir`, with its category; only the
    masks are read here (to drop empty ones), images are decoded when a batch needs them."""
    archive = load_archive(archive_path)
    masks = mask_paths(masks_dir)
    names = sorted(archive.categories, key=archive.categories.get)
    items, labels, missing, read = [], [], 0, 0
    first_category = {}  # an image's category when best_category lacks it: the first archive holding it
    for n in names:
        for e in archive.archives[n]:
            first_category.setdefault(e["path"], n)
    for path in archive.images():
        if path not in masks:
            missing += 1
            continue
        name = archive.best_category.get(path) or first_category[path]
        read += 1  # the schema's reader (as train's): 0/255 and foreign values are named, not taken as empty
        if not (read_pseudo_mask(masks[path], AdaptError) == 1).any():
            continue
        items.append((archive.pool_root / path, masks[path]))
        labels.append(names.index(name))
    if missing:
        log.warning("adapt-clip: %d archive images have no mask in %s (skipped)", missing, masks_dir)
    if read and not items:
        raise AdaptError(no_foreground_message(masks_dir, read))
    if len(items) < 2:
        raise AdaptError(f"{masks_dir}: fewer than 2 archive images with a non-empty mask; "
                         f"pass the refined pseudo-mask folder of this archive")
    return RegionFiles(items, torch.tensor(labels), names, size, mean)


def category_text(clip: Clip, archive_path, names: list, templates: tuple) -> torch.Tensor:
    """[C, E]: per category the prompt ensemble over every word the archive embedded it with."""
    words = load_archive(archive_path).meta.get("prompt_words", {})
    return ensemble_text_embeddings(clip, [words.get(n, [n]) for n in names], templates)


def negative_text(clip: Clip, vocab: Vocabulary, archive_path, names: list, templates: tuple,
                  cache: Path | None = None) -> torch.Tensor:
    """[K, E]: the prompt ensembles of the vocabulary's entries that share no word with the
    categories (name or any synonym the archive embedded them with), for training as negatives.
    The whole vocabulary is encoded (cached in `cache`, the same embeddings discover makes)."""
    words = load_archive(archive_path).meta.get("prompt_words", {})
    taken = {w.lower() for n in names for w in (n, *words.get(n, ()))}
    kept = [i for i, ws in enumerate(vocab.words) if not taken & {w.lower() for w in ws}]
    log.info("adapt-clip: %d negatives from %s (%d entries share a word with the categories)",
             len(kept), vocab.source, len(vocab) - len(kept))
    if not kept:
        raise AdaptError(f"--negatives {vocab.source}: every entry shares a word with the categories")
    return ensemble_text_embeddings(clip, list(vocab.words), templates, cache)[kept]


def _embed(clip: Clip, regions, idx: torch.Tensor, prompts: MaskPrompts | None) -> torch.Tensor:
    """Embeddings of regions `idx` of `regions` (Regions or RegionFiles)."""
    crops, masks = regions.batch(idx)
    x = zg.normalise(clip, crops)
    e = prompts.forward(clip, x, masks) if prompts is not None else zg.clip_forward(clip, x)
    return F.normalize(e.float(), dim=-1)


@torch.no_grad()
def predict(clip: Clip, regions, idx: torch.Tensor, text: torch.Tensor, prompts=None, bs: int = 64) -> torch.Tensor:
    """[len(idx)] int64: per region, the row of `text` [T, E] its embedding is closest to."""
    return torch.cat([(_embed(clip, regions, idx[i:i + bs], prompts) @ text.T.to(clip.device)).argmax(1).cpu()
                      for i in range(0, len(idx), bs)] or [torch.empty(0, dtype=torch.long)])


def accuracy(clip: Clip, regions, idx: torch.Tensor, text: torch.Tensor, prompts=None, bs: int = 64) -> float:
    """Share of regions `idx` whose closest text row is their label (text rows = categories)."""
    if len(idx) == 0:
        return float("nan")
    return int((predict(clip, regions, idx, text, prompts, bs) == regions.labels[idx]).sum()) / len(idx)


def split(n: int, val_fraction: float, seed: int) -> tuple:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def noun_text(clip: Clip, names: list) -> torch.Tensor:
    """[C, E]: each category's plain noun (its name, no template) encoded and L2-normalised, the
    text side of OVSeg's contrastive loss."""
    return clip.encode_texts(list(names)).float()


def train_prompts(clip: Clip, regions, text: torch.Tensor, train_idx: torch.Tensor, config: AdaptConfig,
                  progress: bool = True, negatives: torch.Tensor | None = None) -> tuple:
    """Returns (prompts, per-step losses). loss "ce": cross-entropy over the categories' text rows
    [C, E], and over `negatives` [K, E] as extra classes no region belongs to. loss "contrastive"
    (OVSeg): `text` holds the categories' plain nouns (noun_text); open_clip's symmetric in-batch
    loss between each region and its noun, with a learned logit scale (clamped to <= 100) that
    starts at CLIP's. The lr follows config.warmup / config.schedule (lr_factor)."""
    torch.manual_seed(config.seed)
    prompts = MaskPrompts(clip, depth=config.depth, seed=config.seed)
    for p in clip.model.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(prompts.parameters()), "lr": config.lr}]
    contrastive = config.loss == "contrastive"
    log_scale = None
    if contrastive:   # open_clip leaves the logit scale trainable under --lock-image/--lock-text
        log_scale = torch.nn.Parameter(clip.model.logit_scale.detach().float().clone().clamp(max=math.log(100)))
        groups.append({"params": [log_scale], "lr": config.lr})
    if config.finetune:
        visual = [p for p in clip.model.visual.parameters()]
        for p in visual:
            p.requires_grad_(True)
        groups.append({"params": visual, "lr": config.finetune_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, config.beta2), eps=config.eps)
    base_lrs = [group["lr"] for group in opt.param_groups]
    scheduled = config.warmup > 0 or config.schedule != "constant"
    scale = float(clip.model.logit_scale.exp().clamp(max=100))
    text = (text if negatives is None else torch.cat([text, negatives.to(text)])).to(clip.device)
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    for step in tqdm(range(config.steps), desc="adapt-clip", disable=not progress):
        if scheduled:
            factor = lr_factor(step, config.steps, config.warmup, config.schedule)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * factor
        b = train_idx[torch.randint(len(train_idx), (min(config.batch_size, len(train_idx)),), generator=g)]
        emb = _embed(clip, regions, b, prompts)
        if contrastive:
            loss = contrastive_loss(emb, text[regions.labels[b].to(clip.device)], log_scale.exp())
        else:
            loss = F.cross_entropy(scale * emb @ text.T, regions.labels[b].to(clip.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_scale is not None:
            with torch.no_grad():
                log_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
    for p in clip.model.parameters():
        p.requires_grad_(False)
    prompts.learned_logit_scale = None if log_scale is None else float(log_scale.detach().exp())
    return prompts, losses


def adapt_clip(archive_path, masks_dir, out_dir, config: AdaptConfig | None = None, *, progress: bool = True) -> dict:
    """Trains mask prompts; returns the summary written to adapt.json."""
    config = config or AdaptConfig()
    if config.steps < 1 or config.batch_size < 1 or not 0 <= config.val_fraction < 1:
        raise AdaptError(f"adapt-clip: steps and batch size must be >= 1 and val fraction in [0, 1), got "
                         f"{config.steps}, {config.batch_size}, {config.val_fraction}")
    # Read before anything is written or loaded: a missing or malformed file is one error line.
    negatives = None if config.negatives is None else load_vocabulary(config.negatives, "--negatives")
    with io.output_folder(out_dir, "adapt-clip", legacy=(CONFIG_NAME,)) as out:  # owned, locked, cleaned
        return _adapt_clip(out, archive_path, masks_dir, config, negatives, progress)


def _adapt_clip(out: Path, archive_path, masks_dir, config: AdaptConfig, negative_vocab, progress: bool) -> dict:
    """The body of adapt_clip, inside its locked output folder."""
    settings = {"archive": str(Path(archive_path).resolve()), "masks": str(Path(masks_dir).resolve()),
                **{k: v for k, v in asdict(config).items() if k != "device"}}
    if config.negatives not in (None, "builtin"):
        settings["negatives"] = str(Path(config.negatives).resolve())
    done = out / CONFIG_NAME
    if done.is_file():
        summary = json.loads(done.read_text())
        previous = {**LEGACY_SETTINGS, **summary.get("settings", {})}
        changed = {k: settings[k] for k in changed_settings(summary.get("settings", {}), settings, LEGACY_SETTINGS)}
        if changed:
            hint = (" (a folder made before --negatives existed has none: pass --negatives none)"
                    if "negatives" in changed and previous["negatives"] is None else "")
            differences = "; ".join(f"{k}: {previous.get(k)!r} there, {v!r} now" for k, v in changed.items())
            raise AdaptError(f"{out} holds mask prompts trained with other settings ({differences}); "
                             f"use a new --out folder{hint}")
        if (out / PROMPTS_NAME).is_file():
            log.info("adapt-clip: %s is finished (same settings), nothing to do", out)
            return summary
    templates = get_templates(config.templates)
    clip = load_clip(config.model, config.pretrained, resolve_device(config.device))
    regions = load_regions(archive_path, masks_dir, clip.image_size, clip.mean)
    text = category_text(clip, archive_path, regions.names, templates).cpu()
    train_idx, val_idx = split(len(regions.labels), config.val_fraction, config.seed)
    plain = accuracy(clip, regions, val_idx, text)
    negatives = None if negative_vocab is None else negative_text(
        clip, negative_vocab, archive_path, regions.names, templates, out / NEGATIVES_NAME)
    train_text = noun_text(clip, regions.names).cpu() if config.loss == "contrastive" else text
    prompts, losses = train_prompts(clip, regions, train_text, train_idx, config, progress, negatives)
    tuned = accuracy(clip, regions, val_idx, text, prompts)
    prompts.save(out / PROMPTS_NAME)
    if config.finetune:
        io.save_safetensors({k: v.detach().cpu().contiguous() for k, v in clip.model.state_dict().items()},
                            out / "clip_finetuned.safetensors")
    k = max(1, min(10, len(losses) // 10))
    summary = {"settings": settings, "categories": regions.names, "train": len(train_idx), "val": len(val_idx),
               "val_accuracy_plain": plain, "val_accuracy_prompts": tuned,
               "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
               "chance": 1 / len(regions.names), "negatives": 0 if negatives is None else len(negatives)}
    if prompts.learned_logit_scale is not None:
        summary["learned_logit_scale"] = prompts.learned_logit_scale
    summary = {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in summary.items()}
    io.write_json(done, summary)
    log.info("adapt-clip: held-out masked-region accuracy %.3f plain -> %.3f with mask prompts (%d regions)",
             plain, tuned, len(val_idx))
    return summary
