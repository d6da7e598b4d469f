"""Stage (A): category archives. CLIP embeds every category name (a prompt ensemble) and
every pool image; each category keeps its K most similar images -> archive.json
(schema: namedmask/data/archive.py).

Out directory:
  archive.json                   the result (written last, atomically)
  text_embeddings.safetensors    per-category text embeddings (a cache, keyed by a fingerprint)
  embeddings/index.json          the pool: root + sorted relative paths, and the fingerprint of
                                 everything the image embeddings depend on
  embeddings/shard-NNNNNN.safetensors
                                 fp16 L2-normalised embeddings of pool positions
                                 [N*shard_size, (N+1)*shard_size) + their positions + failures
  report/NNN-<name>.png          contact sheets (--report)

Streaming: images are decoded batch by batch and a shard holds shard_size images, so memory is
O(batch + shard + K x C) whatever the pool size. Resumable: a shard file is written atomically
once complete, so a killed run restarts at the first missing shard; every shard is computed the
same way in every run, so the archive is byte-identical. Distributed (torchrun): shard n belongs
to rank n % world_size; each rank writes its own shards (the out directory must be shared), rank
0 merges after a barrier. Shards, not ranks, fix the batches, so the result does not depend on
the number of processes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from namedmask import io
from namedmask.config import ArchiveConfig
from namedmask.data.archive import Archive, merge_top_k, similarity
from namedmask.data.datasets import DatasetError, list_pool_images
from namedmask.data.categories import CategorySet, get_category_set
from namedmask.data.decode import Resize, iter_image_batches
from namedmask.errors import InputError, OutputStateError
from namedmask.models.clip import Clip, load_clip
from namedmask.models.prompts import get_templates
from namedmask.runtime import init_distributed, resolve_device

log = logging.getLogger(__name__)

REPORT_IMAGES = 40          # images per contact sheet
_SHARD = "shard-{:06d}.safetensors"


class ArchiveBuildError(OutputStateError):
    """The pool or the out directory cannot be used; the message says why and what to do."""


def build_archive(config: ArchiveConfig, progress: bool = True) -> Archive | None:
    """Runs stage (A). Returns the Archive on rank 0 (and in single-process runs), None on
    other ranks."""
    out = Path(config.out)
    categories = _categories_with_synonyms(config.categories, config.synonyms)
    templates = get_templates(config.templates)
    rank, world, own_group = init_distributed()
    try:
        with io.output_folder(out, "build-archive", legacy=("archive.json",), enabled=rank == 0):
            return _build(config, out, categories, templates, rank, world, progress)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _build(config: ArchiveConfig, out: Path, categories, templates, rank: int, world: int, progress: bool):
    """The body of build_archive, inside its locked output folder."""
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    root, paths = _list_pool_images(config.pool, exclude=out)  # an --out inside the pool is not pool
    clip = load_clip(config.model, config.pretrained, device)
    embed_dir = out / "embeddings"
    key = _prepare_embeddings_dir(embed_dir, clip, root, paths, config.shard_size, rank == 0)
    _embed_pool(clip, root, paths, embed_dir, key, config, rank, world, progress)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    text = _text_embeddings(clip, categories, templates, out / "text_embeddings.safetensors")
    top_scores, top_index, skipped = _top_k(embed_dir, key, len(paths), config.shard_size, text, config.k)
    archive = _make_archive(categories, paths, root, top_scores, top_index, skipped, clip, templates, config)
    io.write_json(out / "archive.json", archive.to_dict())
    log.info("archive.json: %d categories x top %d of %d images (%d skipped) -> %s", len(archive.categories),
             config.k, len(paths), len(skipped), out / "archive.json")
    if config.report:
        write_contact_sheets(archive, out / "report")
    return archive


# ---------------------------------------------------------------- inputs

def _categories_with_synonyms(categories: str, synonyms_file: str | None) -> CategorySet:
    cats = get_category_set(categories)
    if not synonyms_file:
        return cats
    extra = get_category_set(synonyms_file)
    unknown = [n for n in extra.synonyms if n not in cats.names]
    if unknown:
        raise InputError(f"{synonyms_file}: synonyms for categories not in {categories!r}: {unknown}")
    return dataclasses.replace(cats, synonyms={**cats.synonyms, **extra.synonyms})


def _list_pool_images(pool: str | Path, exclude=None) -> tuple[Path, list]:
    """(absolute root, sorted relative paths) of a folder tree, list file or ImageNet root."""
    try:
        listing = list_pool_images(pool, exclude)
    except DatasetError as exc:
        raise ArchiveBuildError(str(exc)) from None
    return listing.root, list(listing)


# ---------------------------------------------------------------- image side

def _prepare_embeddings_dir(embed_dir: Path, clip: Clip, root: Path, paths: list, shard_size: int,
                            write: bool) -> str:
    """Checks that existing shards were made by the same model on the same pool (or there are
    none) and writes index.json (every rank checks; rank 0 writes). Returns the fingerprint
    key every shard file carries."""
    model = clip.describe()
    if Path(clip.pretrained).is_file():  # a replaced checkpoint file must not reuse old shards
        model["checkpoint_bytes"] = Path(clip.pretrained).stat().st_size
    fingerprint = {"model": model, "pool_root": str(root), "num_images": len(paths),
                   "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(), "shard_size": shard_size}
    index = embed_dir / "index.json"
    if index.exists():
        old = json.loads(index.read_text())
        if old.get("fingerprint") != fingerprint:
            diff = sorted(k for k in fingerprint if old.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ArchiveBuildError(f"{embed_dir} holds embeddings of another run (different {', '.join(diff)}); "
                                    f"use another --out, or delete {embed_dir} to recompute")
    elif write:
        io.write_json(index, {"fingerprint": fingerprint, "pool_root": str(root), "paths": paths}, indent=None)
    return io.fingerprint(fingerprint)


def _shard_is_complete(path: Path, key: str) -> bool:
    """A shard file exists only once complete (atomic write); it must belong to this run."""
    if not path.exists():
        return False
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != key:
            raise ArchiveBuildError(f"{path} belongs to another run; use another --out, or delete {path.parent}")
    return True


def _embed_pool(clip: Clip, root: Path, paths: list, embed_dir: Path, key: str, config: ArchiveConfig, rank: int,
                world: int, progress: bool) -> None:
    size = config.shard_size
    num_shards = -(-len(paths) // size)
    todo = [n for n in range(rank, num_shards, world) if not _shard_is_complete(embed_dir / _SHARD.format(n), key)]
    done = len(range(rank, num_shards, world)) - len(todo)
    if done:
        log.info("rank %d: %d shard(s) already complete, %d to go", rank, done, len(todo))
    resize = Resize(clip.image_size, clip.image_size, "bicubic")
    images = sum(min(size, len(paths) - n * size) for n in todo)
    bar = tqdm(total=images, unit="img", desc="embed" if world == 1 else f"embed rank {rank}",
               disable=not progress or not todo, dynamic_ncols=True)  # no empty bar on a finished resume
    for n in todo:
        for stale in embed_dir.glob(f".{_SHARD.format(n)}.*"):  # the temp file of a killed run
            stale.unlink(missing_ok=True)
        first = n * size
        chunk = [root / p for p in paths[first:first + size]]
        position = {str(p): first + i for i, p in enumerate(chunk)}
        embeddings, indices, failed = [], [], []
        # Batches arrive on CLIP's device (on a GPU, DALI's output stays there): no host round trip.
        for batch in iter_image_batches(chunk, config.batch_size, resize=resize, on_error="skip", device=clip.device):
            if batch.indices:
                embeddings.append(clip.encode_images(batch.images).half().cpu())
            indices += [first + i for i in batch.indices]
            failed += [[position[str(p)], reason] for p, reason in batch.failed]
            bar.update(len(batch.indices) + len(batch.failed))
        for i, reason in failed:
            log.warning("skipped %s: %s", paths[i], reason)
        tensors = {"embeddings": torch.cat(embeddings) if embeddings else torch.zeros(0, clip.embed_dim,
                                                                                      dtype=torch.float16),
                   "indices": torch.tensor(indices, dtype=torch.int64)}
        io.save_safetensors(tensors, embed_dir / _SHARD.format(n),
                            metadata={"fingerprint": key, "failed": json.dumps(sorted(failed))})
    bar.close()


# ---------------------------------------------------------------- text side

def _text_embeddings(clip: Clip, categories: CategorySet, templates: tuple, cache: Path) -> torch.Tensor:
    """float32 [C, D]: per category every template x every word (its prompt name and synonyms)
    encoded, L2-normalised, averaged and L2-normalised again. Cached in `cache`."""
    names = list(categories.names[1:])
    prompts = {n: [t.format(s) for s in categories.prompt_words(n) for t in templates] for n in names}
    key = io.fingerprint({"model": clip.describe(), "prompts": prompts})
    if cache.exists():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == key:
                log.info("text embeddings from cache %s", cache)
                return f.get_tensor("embeddings")
    flat = [p for n in names for p in prompts[n]]
    encoded = clip.encode_texts(flat).cpu()
    out, start = [], 0
    for n in names:
        mean = encoded[start:start + len(prompts[n])].mean(0)
        out.append(mean / mean.norm())
        start += len(prompts[n])
    text = torch.stack(out)
    io.save_safetensors({"embeddings": text}, cache, metadata={"fingerprint": key, "names": json.dumps(names)})
    return text


# ---------------------------------------------------------------- top-K

def _top_k(embed_dir: Path, key: str, num_images: int, shard_size: int, text: torch.Tensor, k: int):
    """Streams the shards in order: (scores [k', C], pool indices [k', C], skipped [(index, reason)])."""
    scores = torch.empty(0, text.shape[0], dtype=torch.float64)
    index = torch.empty(0, text.shape[0], dtype=torch.int64)
    skipped = []
    for n in range(-(-num_images // shard_size)):
        path = embed_dir / _SHARD.format(n)
        if not _shard_is_complete(path, key):
            raise ArchiveBuildError(f"{path} is missing after all ranks finished; is {embed_dir} on a filesystem "
                                    f"every rank shares?")
        with safe_open(str(path), "pt") as f:
            skipped += json.loads(f.metadata()["failed"])
            emb, idx = f.get_tensor("embeddings"), f.get_tensor("indices")
        scores, index = merge_top_k(scores, index, similarity(emb, text), idx, k)
    return scores, index, skipped


def _make_archive(categories: CategorySet, paths: list, root: Path, scores: torch.Tensor, index: torch.Tensor,
                  skipped: list, clip: Clip, templates: tuple, config: ArchiveConfig) -> Archive:
    ids = {n: i for i, n in enumerate(categories.names) if i > 0}
    archives, best = {}, {}
    for c, name in enumerate(ids):
        entries = [{"path": paths[i], "score": s} for s, i in zip(scores[:, c].tolist(), index[:, c].tolist())]
        archives[name] = entries
        for e in entries:  # duplicate policy: keep-all; the best category is the highest score (lower id on ties)
            if e["path"] not in best or e["score"] > best[e["path"]][1]:
                best[e["path"]] = (name, e["score"])
    if scores.shape[0] < config.k:
        log.warning("only %d decodable images in the pool: archives have fewer than k=%d entries",
                    scores.shape[0], config.k)
    # Everything that decides the archive (not where it is written, nor whether sheets are drawn).
    resolved = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("out", "report")}
    resolved.update(pool=str(root), pretrained=clip.pretrained)
    meta = {"model": clip.describe(),
            "templates": {"source": config.templates, "count": len(templates), "templates": list(templates)},
            "synonyms": {n: list(s) for n, s in categories.synonyms.items()},
            "prompt_words": {n: list(categories.prompt_words(n)) for n in ids},  # what each was embedded with
            "k": config.k, "num_images": len(paths),
            "skipped": [{"path": paths[i], "reason": reason} for i, reason in sorted(skipped)],
            "config": resolved}
    return Archive(root, ids, archives, {p: best[p][0] for p in sorted(best)}, meta)


# ---------------------------------------------------------------- report

def write_contact_sheets(archive: Archive, folder: Path, per_sheet: int = REPORT_IMAGES, thumb: int = 128,
                         columns: int = 8) -> list:
    """One PNG per category: its top images, best first, each captioned with rank and score; the
    title names the category and the words it was retrieved with. Drawn at a size meant to be
    looked at unscaled (the report shows it at its own width)."""
    from PIL import Image, ImageDraw, ImageOps

    from namedmask.report import font

    title_font, words_font, caption_font = font(20), font(14), font(14)
    words = archive.meta.get("prompt_words", {})
    written = []
    for name, cid in archive.categories.items():
        entries = archive.archives[name][:per_sheet]
        rows = max(1, -(-len(entries) // columns))
        head = 52
        sheet = Image.new("RGB", (columns * thumb + (columns - 1) * 2, head + rows * (thumb + 2)), "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((4, 4), f"{cid}: {name}", fill="black", font=title_font)
        also = ", ".join(w for w in words.get(name, []) if w != name)
        draw.text((4, 30), f"top {len(entries)} of {len(archive.archives[name])} retrieved, best first; "
                           f"score = cosine similarity" + (f"; prompts also name it: {also}" if also else ""),
                  fill=(60, 60, 60), font=words_font)
        for r, e in enumerate(entries):
            with Image.open(archive.pool_root / e["path"]) as img:
                img.draft("RGB", (2 * thumb, 2 * thumb))  # JPEG: decode at reduced size, much faster
                img = ImageOps.fit(ImageOps.exif_transpose(img).convert("RGB"), (thumb, thumb), Image.BICUBIC)
            x, y = (r % columns) * (thumb + 2), head + (r // columns) * (thumb + 2)
            sheet.paste(img, (x, y))
            draw.rectangle((x, y, x + thumb - 1, y + 18), fill="black")
            draw.text((x + 3, y + 1), f"#{r + 1}  {e['score']:.3f}", fill="white", font=caption_font)
        path = folder / f"{cid:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        io.save_png(path, sheet)
        written.append(path)
    log.info("contact sheets: %d PNGs in %s", len(written), folder)
    return written
