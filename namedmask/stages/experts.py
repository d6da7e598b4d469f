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
from namedmask.training import is_tiny, train

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
    todo = []
    for g, cats in enumerate(groups):
        done = out / "experts" / f"{g:03d}" / PREDICTED_FILE
        if done.is_file():
            # compared as canonical JSON (what was written); files from before "settings" was recorded pass
            if io.fingerprint(json.loads(done.read_text()).get("settings", settings)) != io.fingerprint(settings):
                raise InputError(f"{out} holds experts made with other settings or other input masks "
                                 f"({done}); use another --out or delete that folder")
        else:
            todo.append(g)
    job = _ExpertJob(archive_file, str(masks_dir), saliency, out, cfg, settings, groups)
    workers = expert_workers(len(todo), device, cfg.train)
    if workers > 1:
        # Tiny experts on a CPU: one expert per process, one thread each, instead of every expert
        # on all cores. Their operators are too small to share between threads (on a busy machine
        # a 2-thread training step was measured 2.7x slower than a 1-thread one), experts are
        # independent, and one thread gives the bits of `--threads 1` on any machine and load.
        log.info("experts: %d to train, %d at a time (one process each, 1 thread: auto threads, tiny experts)",
                 len(todo), workers)
        _run_in_processes(job, todo, workers, progress)
    else:
        # the whole stage's time, measured on its first expert trained now (each expert's own
        # training also logs its estimate)
        eta = Eta(log, "experts", len(groups), warmup=0, measure=1, unit="experts")
        for g in todo:
            t_expert = time.perf_counter()
            job.make(g, archive, progress)
            if eta.t0 is None:
                eta.first, eta.last, eta.t0 = g, g + 1, t_expert
            eta.step(g + 1)
    entries, threads = {}, {}
    for g, cats in enumerate(groups):
        finished = json.loads((out / "experts" / f"{g:03d}" / PREDICTED_FILE).read_text())
        fg = finished["fg_fraction"]
        threads[g] = finished.get("threads")
        for p in sorted(p for p in archive.images() if archive.best_category.get(p) in cats and p in saliency):
            entries[p] = {"mask": mask_relpath(p), "fg_fraction": fg[p],
                          "flag": "empty" if fg[p] == 0 else ("full" if fg[p] == 1 else None)}
    io.write_json(out / "manifest.json", {
        "schema_version": 1, "archive": os.path.relpath(archive_file.resolve(), out.resolve()),
        "method": source.get("method"), "refine": "experts", "source_masks": os.path.relpath(
            Path(masks_dir).resolve(), out.resolve()),
        "config": to_dict(cfg), "groups": groups, "training_threads": threads, "masks": entries, "failed": source.get("failed", [])})
    log.info("refined %d masks with %d experts into %s", len(entries), len(groups), out)
    return out


def expert_workers(todo: int, device: torch.device, train_cfg) -> int:
    """How many experts train at once, each in its own process on one thread: more than one only
    on a CPU, with namedmask's automatic threads (an explicit thread count is kept as given: the
    experts then train one after the other on that many threads, as before), with tiny experts
    (training.is_tiny: under 20 GFLOP per training iteration; the paper's ResNet-50 at crop 384,
    ~6 TFLOP, never) and more than one to train; then min(cores, experts). A function of the
    machine's cores and the config, never of the load."""
    from namedmask.runtime import available_cores, threads_are_automatic

    if device.type != "cpu" or todo < 2 or available_cores() < 2 or not threads_are_automatic():
        return 1
    if not is_tiny(train_cfg):
        return 1
    return min(available_cores(), todo)


@dataclasses.dataclass
class _ExpertJob:
    """Everything an expert needs, picklable for a worker process."""
    archive_file: Path
    masks_dir: str
    saliency: dict
    out: Path
    cfg: ExpertsConfig
    settings: dict
    groups: list

    def make(self, g: int, archive, progress: bool) -> None:
        """Trains expert g, re-predicts its images, writes its predicted.json (what marks it done)."""
        cats, n = self.groups[g], len(self.groups)
        expert_dir = self.out / "experts" / f"{g:03d}"
        images = sorted(p for p in archive.images() if archive.best_category.get(p) in cats and p in self.saliency)
        trained_on = {e["path"] for c in cats for e in archive.archives.get(c, []) if e["path"] in self.saliency}
        log.info("expert %d/%d: categories %s, trains on %d images, re-predicts %d", g + 1, n, cats,
                 len(trained_on), len(images))
        if len(trained_on) < MIN_EXPERT_IMAGES:
            log.warning("expert %d/%d (%s) has only %d training images (< %d): its masks will be unreliable; "
                        "use a larger archive (k) or fewer, grouped experts (groups)", g + 1, n,
                        ", ".join(cats), len(trained_on), MIN_EXPERT_IMAGES)
        device = resolve_device(self.cfg.train.device)
        train_cfg = dataclasses.replace(self.cfg.train, archive=str(self.archive_file), masks=self.masks_dir,
                                        out=str(expert_dir))
        train(train_cfg, binary=True, categories=cats, progress=progress)
        model, _ = load_segmenter(expert_dir, device)
        fg = {}
        for p in tqdm(images, desc=f"expert {g} predict", unit="img", disable=not progress):
            mask = predict_label(model, load_image(archive.pool_root / p), device,
                                 amp=device.type == "cuda").to(torch.uint8)
            io.save_png(io.inside(self.out, mask_relpath(p)), mask.numpy())
            fg[p] = float(mask.float().mean())
        kept = _keep_input_if_collapsed(self.out, images, self.saliency, fg, self.cfg.collapse_ratio,
                                        f"expert {g + 1}/{n} ({', '.join(cats)})")
        io.write_json(expert_dir / PREDICTED_FILE, {"categories": cats, "fg_fraction": fg, "kept_input_masks": kept,
                                                     "threads": torch.get_num_threads(), "settings": self.settings})


_WORKER_ARCHIVE = {}


def _worker_init(level: int) -> None:
    from namedmask.runtime import set_threads

    set_threads(1, "auto (tiny experts: one process per expert, 1 thread each)")  # before any torch op
    if not logging.getLogger().handlers:  # spawned (a forked worker keeps the parent's handlers)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _worker_make(job: _ExpertJob, g: int) -> int:
    if job.archive_file not in _WORKER_ARCHIVE:
        _WORKER_ARCHIVE[job.archive_file] = load_archive(job.archive_file)
    job.make(g, _WORKER_ARCHIVE[job.archive_file], progress=False)
    return g


def _run_in_processes(job: _ExpertJob, todo: list, workers: int, progress: bool) -> None:
    """job.make(g) for every g of `todo`, `workers` processes at a time; the first failure is
    raised after the running ones end. Forked where the OS can (a spawned worker pays ~6 s of CPU
    to import torch and namedmask again): as a DataLoader worker, a forked worker sets one torch
    thread before any op, so OpenMP's pool of this process is never used there."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    level = logging.getLogger("namedmask").getEffectiveLevel()
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_init,
                             initargs=(level,)) as pool:
        futures = [pool.submit(_worker_make, job, g) for g in todo]
        try:
            for f in tqdm(as_completed(futures), total=len(futures), desc="experts", unit="expert",
                          disable=not progress):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
