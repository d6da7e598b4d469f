"""Stage (B): a class-agnostic pseudo-mask for every archive image.

Each image is resized (short side 512), run through the saliency model (TokenCut on DINO
keys, or SelfMask), refined by the bilateral solver at that resolution (threshold 0.5),
upsampled (nearest) to its native size and written as a 0/1 PNG in the pseudo-mask folder
schema of namedmask.data.pseudo_masks. Images of equal prepared size share a forward pass.

Device: images are decoded onto the stage's device and stay there (on a GPU: DALI decode,
torch resize, model, bilateral solver's CUDA backend, upsampling); only the finished native
mask is copied to the host, to be written. The GPU resize computes PIL's pixels
(models/saliency/common.resize_tensor); DALI's decoding is described in data/decode.py.

Resumable: an image whose mask file exists is not recomputed (a mask written just before
an interruption is picked up from disk); the manifest is rewritten atomically every
`manifest_every_s` seconds, at the end and on Ctrl-C. Undecodable or failing images are logged and listed under "failed" (retried on the
next run); empty and full-frame masks are flagged, never dropped.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from namedmask import io, ops
from namedmask.config import SaliencyConfig
from namedmask.data.archive import Archive, load_archive
from namedmask.data.decode import iter_image_batches, load_image
from namedmask.data.pseudo_masks import SCHEMA_VERSION, load_manifest, mask_relpath
from namedmask.errors import OutputStateError
from namedmask.models.dino import build_vit, create_dino
from namedmask.runtime import resolve_device
from namedmask.report import mask_overlay, mask_sheet
from namedmask.models.saliency import SelfMask, SelfMaskPredictor, TokenCut, load_selfmask, normalize

log = logging.getLogger(__name__)

METHODS = ("tokencut", "selfmask")
REFINES = ("bilateral-solver", "none")
DEFAULT_DINO = {"tokencut": "vit_small_patch16_224.dino", "selfmask": "vit_small_patch8_224.dino"}
# Settings that change the masks: a folder made with other values is not silently extended.
RESULT_KEYS = ("method", "refine", "short_side", "dino", "dino_weights", "checkpoint", "random_weights", "tau",
               "vit_kwargs", "corner_rule")
# A key missing from an older manifest (added since, e.g. corner_rule) had its default value.
RESULT_DEFAULTS = {k: getattr(SaliencyConfig(), k) for k in RESULT_KEYS}


class SaliencyError(OutputStateError):
    """A problem the user must fix (bad settings, missing weights or op); the message says how."""


def resolve_config(self: SaliencyConfig) -> SaliencyConfig:
    """Checked, with absolute paths, the method's default DINO and a concrete device."""
    if self.method not in METHODS:
        raise SaliencyError(f"method must be one of {METHODS}, got {self.method!r}")
    if self.refine not in REFINES:
        raise SaliencyError(f"refine must be one of {REFINES}, got {self.refine!r}")
    if self.short_side < 16 or self.batch_size < 1:
        raise SaliencyError("short_side must be >= 16 and batch_size >= 1")
    device = self.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolve_device(device)  # an unknown or absent device: one clear error, before any work
    absolute = {k: str(Path(getattr(self, k)).resolve()) for k in ("archive", "out", "dino_weights", "checkpoint")
                if getattr(self, k) is not None}
    return SaliencyConfig(**{**asdict(self), **absolute, "dino": self.dino or DEFAULT_DINO[self.method],
                             "device": device})


@dataclass
class SaliencyResult:
    out: Path
    total: int
    computed: int
    recovered: int       # masks found on disk but missing from the manifest (interrupted run)
    failed: list         # [{"path", "reason"}]
    flags: dict          # "empty"/"full" -> count
    report: list = field(default_factory=list)

    def summary(self) -> str:
        flags = ", ".join(f"{n} {k}" for k, n in sorted(self.flags.items())) or "none flagged"
        return (f"{self.total} images: {self.computed} computed, {self.total - self.computed - len(self.failed)} "
                f"already done ({self.recovered} recovered from disk), {len(self.failed)} failed; {flags}; "
                f"masks in {self.out}")


def build_model(config: SaliencyConfig):
    """The saliency model of a resolved config, on its device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-weight smoke runs resume with the same model
        if config.method == "tokencut":
            vit = create_dino(config.dino, config.dino_weights, random_weights=config.random_weights,
                              **config.vit_kwargs)
            return TokenCut(vit.to(config.device), config.short_side, config.tau, solver=config.eigen_solver,
                            corner_rule=config.corner_rule)
        if config.checkpoint:
            model = load_selfmask(config.checkpoint)
        elif config.random_weights:
            log.warning("SelfMask with RANDOM weights (requested); masks will be meaningless")
            model = SelfMask(build_vit(config.dino, **config.vit_kwargs))
        else:
            raise SaliencyError("--method selfmask needs --checkpoint PATH (the official selfmask_nq20.pt from "
                                "github.com/NoelShin/selfmask releases, or one saved by namedmask), or "
                                "--random-weights for a smoke run")
        return SelfMaskPredictor(model.to(config.device), config.short_side)


def bilateral_refiner(kind: str):
    """None for "none"; else image uint8 [h, w, 3], bool mask [h, w] -> refined bool mask."""
    if kind == "none":
        return None
    solve = getattr(ops, "bilateral_solve", None)
    if solve is None:
        raise SaliencyError("--refine bilateral-solver needs namedmask.ops.bilateral_solve, which this build does "
                            "not have; use --refine none")

    def refine(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        soft = solve(image, mask.to(torch.float32), preset="namedmask")
        return torch.as_tensor(soft) > 0.5

    return refine


def mask_entry(image_relpath: str, mask: np.ndarray) -> dict:
    fg = float(mask.mean()) if mask.size else 0.0
    flag = "empty" if not mask.any() else ("full" if mask.all() else None)
    return {"mask": mask_relpath(image_relpath), "fg_fraction": round(fg, 6), "flag": flag}


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def _open_manifest(out: Path, config: SaliencyConfig) -> dict:
    path = out / "manifest.json"
    archive_file = Path(config.archive)
    archive_file = archive_file / "archive.json" if archive_file.is_dir() else archive_file
    source = _file_digest(archive_file)
    fresh = {"schema_version": SCHEMA_VERSION, "archive": os.path.relpath(archive_file, out),
             "archive_sha256": source, "method": config.method, "refine": config.refine, "config": asdict(config), "masks": {}, "failed": []}
    if not path.is_file():
        return fresh
    old = load_manifest(path)
    before = old.get("config", {})
    was = {k: before.get(k, RESULT_DEFAULTS[k]) for k in RESULT_KEYS}
    changed = [f"{k}: {was[k]!r} -> {getattr(config, k)!r}" for k in RESULT_KEYS if was[k] != getattr(config, k)]
    # The masks belong to one archive: another one (other content, or another file for
    # manifests made before its digest was recorded) is a settings change too.
    if old.get("archive_sha256", source) != source or (
            "archive_sha256" not in old and before.get("archive") not in (None, config.archive)):
        changed.append(f"archive: {before.get('archive')} -> {config.archive} (other content)")
    if changed:
        raise SaliencyError(f"{out} holds masks made with other settings ({'; '.join(changed)}); "
                            f"use another --out or delete that folder")
    return {**fresh, "masks": old["masks"]}


def _file_digest(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise SaliencyError(f"{path}: cannot read the archive ({exc.strerror})") from None


def run_saliency(config: SaliencyConfig) -> SaliencyResult:
    config = resolve_config(config)
    archive = load_archive(config.archive)
    refine = bilateral_refiner(config.refine)
    out = Path(config.out)
    with io.output_folder(out, "saliency", legacy=("manifest.json",)):
        return _run(config, archive, refine, out)


def _run(config: SaliencyConfig, archive: Archive, refine, out: Path) -> SaliencyResult:
    """The body of run_saliency, inside its locked output folder."""
    manifest = _open_manifest(out, config)
    io.write_json(out / "config.json", asdict(config))

    images = archive.images()
    wanted = set(images)
    masks = manifest["masks"] = {k: v for k, v in manifest["masks"].items() if k in wanted}
    failed = manifest["failed"] = []  # earlier failures are retried
    todo, recovered = _scan(out, images, masks, failed)
    computed = 0
    log.info("%d archive images: %d to compute, %d done", len(images), len(todo), len(images) - len(todo))

    if todo:
        model = build_model(config)
        paths = [archive.pool_root / rel for rel in todo]
        flushed = time.monotonic()
        try:
            with tqdm(total=len(todo), desc=f"saliency ({config.method})", unit="img") as bar:
                for batch in iter_image_batches(paths, config.batch_size, on_error="skip", device=config.device):
                    for path, reason in batch.failed:
                        failed.append(_failure(Path(path).relative_to(archive.pool_root).as_posix(), reason))
                    rels = [todo[i] for i in batch.indices]
                    for rel, mask, reason in _predict_batch(model, refine, rels, batch.images, config.device):
                        if mask is None:
                            failed.append(_failure(rel, reason))
                            continue
                        io.save_png(io.inside(out, mask_relpath(rel)), mask)
                        masks[rel] = mask_entry(rel, mask)
                        computed += 1
                    bar.update(len(batch.indices) + len(batch.failed))
                    # Rewriting a 500k-entry manifest per batch would dominate; the disk scan
                    # above recovers whatever a hard kill leaves unlisted.
                    if time.monotonic() - flushed >= config.manifest_every_s:
                        io.write_json(out / "manifest.json", manifest)
                        flushed = time.monotonic()
        finally:  # also on Ctrl-C
            io.write_json(out / "manifest.json", manifest)
    manifest["summary"] = {"images": len(images), "masks": len(masks), "failed": len(failed),
                           "flags": dict(Counter(e["flag"] for e in masks.values() if e["flag"]))}
    io.write_json(out / "manifest.json", manifest)

    result = SaliencyResult(out, len(images), computed, recovered, failed,
                            manifest["summary"]["flags"])
    if config.report:
        result.report = write_report(out, archive, manifest, config.report_per_category)
    return result


def _scan(out: Path, images: list, masks: dict, failed: list) -> tuple:
    """Which images still need a mask. Updates `masks` with masks found on disk but not
    listed (written just before an interruption) and `failed` with mask-path collisions.
    Returns (todo, number recovered from disk)."""
    owner = {}  # the schema maps a.jpg and a.png to one masks/a.png: the first keeps it
    todo, recovered = [], 0
    for rel in images:
        first = owner.setdefault(mask_relpath(rel), rel)
        if first != rel:
            failed.append(_failure(rel, f"its mask path {mask_relpath(rel)} is taken by {first}; rename one image"))
        elif rel in masks and (out / masks[rel]["mask"]).is_file():
            continue
        elif io.inside(out, mask_relpath(rel)).is_file():  # mask files are written atomically
            masks[rel] = mask_entry(rel, _read_mask(out / mask_relpath(rel)))
            recovered += 1
        else:
            todo.append(rel)
    return todo, recovered


def _failure(rel: str, reason: str) -> dict:
    log.warning("%s: failed: %s", rel, reason)
    return {"path": rel, "reason": reason}


def _predict_batch(model, refine, rels: list, images: list, device: str):
    """Yields (relpath, native-resolution uint8 0/1 mask or None, failure reason). The images
    stay on their device until the native mask, which is copied to the host once."""
    prepared = [model.prepare(img) for img in images]
    groups = {}
    for i, p in enumerate(prepared):
        groups.setdefault(tuple(p.shape), []).append(i)
    for members in groups.values():
        try:
            low = model.predict(normalize([prepared[i] for i in members], device))
        except Exception as exc:  # one bad group must not end a 500k-image run; it is listed
            for i in members:
                yield rels[i], None, f"{type(exc).__name__}: {exc}"
            continue
        for i, mask in zip(members, low):
            try:
                if refine is not None:
                    mask = refine(prepared[i], mask)
                native = F.interpolate(mask[None, None].to(torch.uint8), size=images[i].shape[:2], mode="nearest")
                yield rels[i], native[0, 0].cpu().numpy(), None
            except Exception as exc:
                yield rels[i], None, f"{type(exc).__name__}: {exc}"


def write_report(out: Path, archive: Archive, manifest: dict, per_category: int = 4) -> list:
    """report/<id>_<category>.png: the first `per_category` masks of each archive (best
    ranked first) as overlays side by side."""
    written = []
    for name, cid in sorted(archive.categories.items(), key=lambda kv: kv[1]):
        rels = [e["path"] for e in archive.archives.get(name, []) if e["path"] in manifest["masks"]][:per_category]
        if not rels:
            continue
        tiles = [mask_overlay(load_image(archive.pool_root / r), _read_mask(out / manifest["masks"][r]["mask"]))
                 for r in rels]
        sheet = mask_sheet(tiles, f"{cid}: {name}  (first {len(tiles)} archive images)")
        path = out / "report" / f"{cid:04d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        io.save_png(path, sheet)
        written.append(path)
    log.info("report: %d overlay sheets in %s", len(written), out / "report")
    return written
