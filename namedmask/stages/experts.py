"""Stage (C): category experts refine the saliency pseudo-masks.

Categories are grouped (one group per category by default, or N groups by spherical k-means
over the categories' CLIP text embeddings: the paper's grouped experts, whose grouping code was
never released). Per group, a binary fg/bg DeepLabv3+ is trained on the group's archives with
the saliency masks, then re-predicts, at native resolution, the images whose best category is
in the group; argmax(bg, fg) is the refined mask. Output: a pseudo-mask folder of the same
schema (manifest.json + masks/), experts in <out>/experts/<group>/. Resumable per expert:
training resumes from its checkpoint, predicted masks already on disk are kept."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from namedmask import io
from namedmask.config import ExpertsConfig, to_dict
from namedmask.data.archive import load_archive
from namedmask.data.decode import load_image
from namedmask.data.pseudo_masks import load_manifest, mask_paths, mask_relpath
from namedmask.errors import InputError
from namedmask.models.deeplab import load_segmenter
from namedmask.models.inference import predict_label
from namedmask.runtime import Eta, resolve_device
from namedmask.training import train

log = logging.getLogger(__name__)

PREDICTED_FILE = "predicted.json"
MIN_EXPERT_IMAGES = 10   # fewer and an expert is warned about (the paper trains on 500 per category)


def kmeans(x: torch.Tensor, k: int, iterations: int = 100, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine) with k-means++ seeding; returns a cluster id per row."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    if not 1 <= k <= len(x):
        raise InputError(f"cannot make {k} groups of {len(x)} categories")
    g = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(len(x), (), generator=g))]
    for _ in range(1, k):
        dist = (1 - x @ x[centres].T).min(dim=1).values.clamp(min=0)
        weights = dist ** 2 if dist.sum() > 0 else torch.ones(len(x))
        centres.append(int(torch.multinomial(weights, 1, generator=g)))
    c = x[centres].clone()
    labels = None
    for _ in range(iterations):
        new = (x @ c.T).argmax(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = torch.nn.functional.normalize(members.sum(0), dim=0)
    return labels


def load_embeddings(path: str | Path, names: list) -> torch.Tensor:
    """[C, D] text embeddings in the order of `names` from a safetensors or torch file
    {name: vector}, or from build-archive's cache (text_embeddings.safetensors: one
    [C, D] tensor, category names in its metadata)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        table = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            listed = json.loads((f.metadata() or {}).get("names", "null"))
        if listed and set(table) == {"embeddings"}:
            table = dict(zip(listed, table["embeddings"]))
    else:
        table = torch.load(path, map_location="cpu", weights_only=True)
    missing = [n for n in names if n not in table]
    if missing:
        raise InputError(f"{path}: no text embedding for categories {missing[:10]}")
    return torch.stack([table[n].float().reshape(-1) for n in names])


def category_groups(categories: list, groups: int | None = None, embeddings: str | Path | None = None) -> list:
    """One list of category names per expert."""
    if groups is None:
        return [[c] for c in categories]
    if embeddings is None:
        raise InputError("grouped experts need the categories' text embeddings (embeddings file)")
    labels = kmeans(load_embeddings(embeddings, categories), groups)
    out = [[c for c, lab in zip(categories, labels.tolist()) if lab == j] for j in range(groups)]
    return [g for g in out if g]


def refine_with_experts(archive_path, masks_dir, out_dir, cfg: ExpertsConfig | None = None,
                        progress: bool = True) -> Path:
    """Trains the experts and writes the refined pseudo-mask folder `out_dir`; returns it."""
    cfg = cfg or ExpertsConfig()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("experts runs in one process (each expert is a small run); start it without torchrun")
    archive = load_archive(archive_path)
    archive_file = Path(archive_path) / "archive.json" if Path(archive_path).is_dir() else Path(archive_path)
    source = load_manifest(masks_dir)
    saliency = mask_paths(masks_dir)
    out = Path(out_dir)
    with io.output_folder(out, "experts", legacy=("manifest.json",)):
        return _refine(archive, archive_file, masks_dir, source, saliency, out, cfg, progress)


def _keep_input_if_collapsed(out: Path, images: list, saliency: dict, fg: dict, ratio: float, name: str) -> bool:
    """With ratio > 0: when the expert's masks cover less than `ratio` of the input masks'
    foreground (mean over its images), writes the input masks in their place (fg updated) and
    warns; returns whether it did."""
    if not ratio or not images:
        return False
    fg_in = {p: float((np.asarray(Image.open(saliency[p])) == 1).mean()) for p in images}
    mean_in, mean_out = np.mean(list(fg_in.values())), np.mean([fg[p] for p in images])
    if mean_out >= ratio * mean_in:
        return False
    log.warning("%s collapsed: its masks cover %.1f%% of the pixels, the masks it learnt from %.1f%% "
                "(collapse_ratio %.2f); its %d images keep their input masks", name, 100 * mean_out, 100 * mean_in,
                ratio, len(images))
    for p in images:  # read again rather than held: an expert may own thousands of masks
        io.save_png(io.inside(out, mask_relpath(p)), np.asarray(Image.open(saliency[p])))
    fg.update(fg_in)
    return True


def _refine(archive, archive_file: Path, masks_dir, source: dict, saliency: dict, out: Path, cfg: ExpertsConfig,
            progress: bool) -> Path:
    """The body of refine_with_experts, inside its locked output folder."""
    embeddings = cfg.embeddings
    if cfg.groups is not None and embeddings is None and (archive_file.parent / "text_embeddings.safetensors").is_file():
        embeddings = archive_file.parent / "text_embeddings.safetensors"  # build-archive's CLIP text embeddings
    groups = category_groups(list(archive.categories), cfg.groups, embeddings)
    device = resolve_device(cfg.train.device)
    # What a finished expert's masks depend on (its config, the input masks' settings and list):
    # a rerun with anything else must not reuse them. Worker and batch counts change nothing.
    config = to_dict(cfg)
    config.pop("predict_batch_size", None)
    config.get("train", {}).pop("num_workers", None)
    settings = {"config": config, "input_masks": source.get("config"), "images": io.fingerprint(sorted(saliency))}
    entries = {}
    # the whole stage's time, measured on its first expert trained now (each expert's own
    # training also logs its estimate)
    eta = Eta(log, "experts", len(groups), warmup=0, measure=1, unit="experts")
    for g, cats in enumerate(groups):
        expert_dir = out / "experts" / f"{g:03d}"
        images = sorted(p for p in archive.images() if archive.best_category.get(p) in cats and p in saliency)
        done = expert_dir / PREDICTED_FILE
        if done.is_file():
            finished = json.loads(done.read_text())
            # compared as canonical JSON (what was written); files from before "settings" was recorded pass
            if io.fingerprint(finished.get("settings", settings)) != io.fingerprint(settings):
                raise InputError(f"{out} holds experts made with other settings or other input masks "
                                 f"({expert_dir / PREDICTED_FILE}); use another --out or delete that folder")
            fg = finished["fg_fraction"]
        else:
            trained_on = {e["path"] for c in cats for e in archive.archives.get(c, []) if e["path"] in saliency}
            log.info("expert %d/%d: categories %s, trains on %d images, re-predicts %d", g + 1, len(groups), cats,
                     len(trained_on), len(images))
            if len(trained_on) < MIN_EXPERT_IMAGES:
                log.warning("expert %d/%d (%s) has only %d training images (< %d): its masks will be unreliable; "
                            "use a larger archive (k) or fewer, grouped experts (groups)", g + 1, len(groups),
                            ", ".join(cats), len(trained_on), MIN_EXPERT_IMAGES)
            t_expert = time.perf_counter()
            train_cfg = dataclasses.replace(cfg.train, archive=str(archive_file), masks=str(masks_dir),
                                            out=str(expert_dir))
            train(train_cfg, binary=True, categories=cats, progress=progress)
            model, _ = load_segmenter(expert_dir, device)
            fg = {}
            for p in tqdm(images, desc=f"expert {g} predict", unit="img", disable=not progress):
                mask = predict_label(model, load_image(archive.pool_root / p), device,
                                     amp=device.type == "cuda").to(torch.uint8)
                io.save_png(io.inside(out, mask_relpath(p)), mask.numpy())
                fg[p] = float(mask.float().mean())
            kept = _keep_input_if_collapsed(out, images, saliency, fg, cfg.collapse_ratio,
                                            f"expert {g + 1}/{len(groups)} ({', '.join(cats)})")
            io.write_json(done, {"categories": cats, "fg_fraction": fg, "kept_input_masks": kept, "settings": settings})
            if eta.t0 is None:
                eta.first, eta.last, eta.t0 = g, g + 1, t_expert
            eta.step(g + 1)
        for p in images:
            entries[p] = {"mask": mask_relpath(p), "fg_fraction": fg[p],
                          "flag": "empty" if fg[p] == 0 else ("full" if fg[p] == 1 else None)}
    io.write_json(out / "manifest.json", {
        "schema_version": 1, "archive": os.path.relpath(archive_file.resolve(), out.resolve()),
        "method": source.get("method"), "refine": "experts", "source_masks": os.path.relpath(
            Path(masks_dir).resolve(), out.resolve()),
        "config": to_dict(cfg), "groups": groups, "masks": entries, "failed": source.get("failed", [])})
    log.info("refined %d masks with %d experts into %s", len(entries), len(groups), out)
    return out
