"""Stage (D) (and the experts of stage C): train a DeepLabv3+ on category archives + pseudo-masks.

Data order is a pure function of (seed, iteration, rank): sample number k of the run reads
image perm_epoch[k mod N] (perm seeded by (seed, epoch)) and augments it with a generator
seeded by (seed, k); the global batch of iteration i is samples [i B, (i+1) B) whatever the
number of ranks. So a run resumed from its checkpoint, or split over DDP ranks, sees exactly
the data an uninterrupted run sees, without saving any loader state.

Run directory: config.yaml (resolved config), checkpoint.pt (full training state; loads with
torch.load(weights_only=True)), model.safetensors + model.json (the segmenter),
metrics.jsonl (one JSON object per logged iteration / validation), curves.png, summary.json."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from namedmask import io
from namedmask.config import CopyPasteConfig, TrainConfig, dump_yaml, to_dict
from namedmask.data.archive import load_archive
from namedmask.data.augment import IGNORE, train_transform
from namedmask.data.decode import load_image
from namedmask.data.pseudo_masks import mask_paths
from namedmask.models.deeplab import build_model, save_segmenter
from namedmask.stages.openvocab import TextObjective

log = logging.getLogger(__name__)

CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE = "checkpoint.pt", "config.yaml", "metrics.jsonl"
# Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = ("out", "num_workers", "log_every", "checkpoint_every", "iterations", "device", "val")


class TrainError(RuntimeError):
    """Inputs or a run directory that training cannot use; the message says what to do."""


# ----------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class TrainItem:
    image: Path
    mask: Path
    class_id: int      # written where mask == 1


def archive_items(archive_path, masks_dir, categories=None, binary: bool = False) -> tuple[list, list]:
    """(items, class_names) for the images of the archives of `categories` (all by default)
    that have a pseudo-mask. Class id = the archive's explicit id of the image's best
    category, or 1 for a binary (expert) segmenter."""
    archive = load_archive(archive_path)
    masks = mask_paths(masks_dir)
    wanted = list(archive.categories) if categories is None else list(categories)
    unknown = [c for c in wanted if c not in archive.categories]
    if unknown:
        raise TrainError(f"categories {unknown} are not in {archive_path}")
    paths = sorted({e["path"] for c in wanted for e in archive.archives.get(c, [])})
    missing = [p for p in paths if p not in masks]
    if missing:
        log.warning("%d of %d archive images have no pseudo-mask in %s and are not trained on (first: %s)",
                    len(missing), len(paths), masks_dir, missing[0])
    items = []
    for p in paths:
        if p in masks:
            if not binary and p not in archive.best_category:
                raise TrainError(f"{archive_path}: image {p!r} has no best_category entry; rebuild the archive")
            items.append(TrainItem(archive.pool_root / p, Path(masks[p]), 1 if binary else archive.label_of(p)))
    if not items:
        raise TrainError(f"no training images: none of the archive images of {wanted[:5]} has a mask in {masks_dir}")
    names = ["background", "foreground"] if binary else archive.class_names
    return items, names


def read_training_label(item: TrainItem, image_size: tuple) -> torch.Tensor:
    """uint8 [H, W]: class id where mask == 1, 0 where 0, 255 where 255."""
    try:
        with Image.open(item.mask) as img:
            mask = np.array(img)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{item.mask}: cannot read pseudo-mask ({exc})") from exc
    if mask.shape != tuple(image_size):
        raise TrainError(f"{item.mask}: mask size {mask.shape[::-1]} differs from image {item.image} "
                         f"{tuple(image_size)[::-1]} (width x height); masks must be at native resolution")
    label = np.full(mask.shape, IGNORE, np.uint8)
    label[mask == 0] = 0
    label[mask == 1] = item.class_id
    return torch.from_numpy(label)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class TrainSamples(Dataset):
    """Sample number k -> (augmented image, label, index of the image used)."""

    def __init__(self, items: list, cfg: TrainConfig):
        self.items, self.cfg = items, cfg
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:  # sample numbers are unbounded; the sampler decides
        return 2 ** 62

    def image_index(self, k: int) -> int:
        epoch, pos = divmod(k, len(self.items))
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(
                _seed(self.cfg.seed, epoch)))
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __getitem__(self, k: int):
        index = self.image_index(k)
        item = self.items[index]
        image = load_image(item.image).permute(2, 0, 1)
        label = read_training_label(item, image.shape[-2:])
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, -1, k))
        image, label = train_transform(image, label, self.cfg.augment, g)
        return image, label, index


class IterationBatches(Sampler):
    """Batch of iteration i on rank r: sample numbers (i * world + r) * b + [0, b)."""

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __iter__(self):
        for it in range(self.start, self.stop):
            first = (it * self.world + self.rank) * self.batch
            yield list(range(first, first + self.batch))

    def __len__(self) -> int:
        return self.stop - self.start


def apply_copy_paste(images, labels, cfg: CopyPasteConfig, generator):
    """The one call into the copy-paste op (objects of other samples pasted into the batch)."""
    if cfg.p <= 0:
        return images, labels
    from namedmask import ops

    if not hasattr(ops, "random_copy_paste"):
        raise TrainError("copy_paste.p > 0 needs namedmask.ops.random_copy_paste, which this installation "
                         "lacks; set copy_paste.p=0 to train without copy-paste")
    return ops.random_copy_paste(images, labels, p=cfg.p, max_objects=cfg.max_objects, scale=cfg.scale,
                                 hflip=cfg.hflip, generator=generator)


# ------------------------------------------------------------------------------- distribution

@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this process group was created by setup_distributed (and is destroyed by train)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("device cuda requested but no CUDA device is available; use device=cpu")
        return torch.device("cuda", local_rank) if pref == "cuda" else torch.device(pref)
    return torch.device(pref)


def setup_distributed(device_pref: str) -> DistContext:
    """torchrun's environment -> process group (nccl on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank, world, device, owns)


# ------------------------------------------------------------------------------------ training

def poly_factor(base_lr: float, cfg) -> callable:
    """lr(i) = max(base (1 - i/T)^power, min_lr) as a LambdaLR factor."""
    def factor(i: int, total=cfg.iterations, power=cfg.optim.poly_power, floor=cfg.optim.min_lr):
        return max(base_lr * (1 - min(i, total) / total) ** power, floor) / base_lr
    return factor


def state_digest(model) -> str:
    """SHA-256 over the model's state dict (names, shapes and bytes): equal digests = equal models."""
    h = hashlib.sha256()
    for name, t in sorted(getattr(model, "module", model).state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return
    import yaml

    old, new = yaml.safe_load(path.read_text()), to_dict(cfg)
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if diff:
        raise TrainError(f"{run_dir} holds a run with a different config ({', '.join(diff)}); resume it with the "
                         f"same config, or give a new --out")


def _truncate_metrics(run_dir: Path, iteration: int) -> None:
    """On resume: drop records of iterations after the checkpoint (they are redone) and a
    line torn by a kill, so metrics.jsonl reads as one uninterrupted run."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("iteration", 0) <= iteration:
            keep.append(line)
    io.write_text(path, "".join(line + "\n" for line in keep))


def _append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _amp_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.amp not in ("auto", "bf16", "off"):
        raise TrainError(f"amp must be auto, bf16 or off, got {cfg.amp!r}")
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def train(cfg: TrainConfig, *, binary: bool = False, categories=None, on_iteration=None,
          progress: bool = True) -> Path:
    """Trains (or resumes) the run in cfg.out; returns the run directory. `on_iteration(i)` is
    called after each completed iteration i (tests use it to interrupt a run)."""
    from tqdm.auto import tqdm

    if not (cfg.archive and cfg.masks and cfg.out):
        raise TrainError("give an archive, a pseudo-mask folder and an output run directory")
    if cfg.head not in ("linear", "text"):
        raise TrainError(f"train.head {cfg.head!r}: expected linear (closed set) or text (open vocabulary)")
    ctx = setup_distributed(cfg.device)
    run_dir = Path(cfg.out)
    if cfg.batch_size % ctx.world:
        raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the {ctx.world} DDP ranks")
    local_batch = cfg.batch_size // ctx.world
    if local_batch < 2:
        raise TrainError(f"batch per rank is {local_batch}; BatchNorm (image pooling) needs at least 2")
    items, class_names = archive_items(cfg.archive, cfg.masks, categories, binary)
    ckpt_path = run_dir / CHECKPOINT_FILE
    if ctx.is_main:
        _check_resume_config(run_dir, cfg)
        io.write_text(run_dir / CONFIG_FILE, dump_yaml(cfg))

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = TextObjective(cfg.text, cfg.archive, class_names, ctx.device) if cfg.head == "text" else None
    model = (objective.build_model(cfg.model, len(class_names)) if objective
             else build_model(cfg.model, len(class_names))).to(ctx.device)
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    optimizer = torch.optim.Adam([{"params": backbone, "lr": cfg.optim.lr_backbone},
                                  {"params": model.head_parameters(), "lr": cfg.optim.lr_head}],
                                 betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [poly_factor(cfg.optim.lr_backbone, cfg), poly_factor(cfg.optim.lr_head, cfg)])
    start = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["iteration"])
        torch.set_rng_state(state["rng"]["torch"][ctx.rank % len(state["rng"]["torch"])])
        log.info("resuming %s at iteration %d / %d", run_dir, start, cfg.iterations)
        if ctx.is_main:
            _truncate_metrics(run_dir, start)
    else:
        torch.manual_seed(_seed(cfg.seed, ctx.rank, 1))  # training randomness (dropout) per rank
    net = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    amp = _amp_enabled(cfg, ctx.device)
    loader = DataLoader(TrainSamples(items, cfg),
                        batch_sampler=IterationBatches(start, cfg.iterations, local_batch, ctx.rank, ctx.world),
                        num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
    val_set = _open_val_set(cfg, class_names) if cfg.val.dataset else None

    net.train()
    bar = tqdm(total=cfg.iterations, initial=start, desc="train", unit="it", disable=not (progress and ctx.is_main))
    t_last, it = time.perf_counter(), start
    for it, (images, labels, indices) in enumerate(loader, start=start):
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        # random_copy_paste draws on a CPU generator whatever the images' device
        cp_gen = torch.Generator().manual_seed(_seed(cfg.seed, it, ctx.rank, 2))
        images, labels = apply_copy_paste(images, labels, cfg.copy_paste, cp_gen)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            if objective is not None:  # this iteration's names (same on every rank), + distillation
                loss = objective.loss(net, images, labels, torch.Generator().manual_seed(_seed(cfg.seed, it, 3)))
            else:
                logits = net(images)
        if objective is None:
            if bool((labels != IGNORE).any()):
                loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE)
            else:  # an all-ignore batch still joins the DDP gradient exchange
                loss = logits.float().sum() * 0.0
        if not torch.isfinite(loss):
            raise TrainError(f"loss is {float(loss.detach())} at iteration {it + 1}; lower the learning rates "
                             f"(optim.lr_head / optim.lr_backbone) or check the masks in {cfg.masks}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done = it + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.iterations:
            mean_loss = float(ctx.all_reduce(loss.detach().float().clone()) / ctx.world)
            now = time.perf_counter()
            if ctx.is_main:
                _append_metrics(run_dir, {"iteration": done, "loss": mean_loss,
                                          "lr_backbone": optimizer.param_groups[0]["lr"],
                                          "lr_head": optimizer.param_groups[1]["lr"],
                                          "images": indices.tolist(), "seconds": now - t_last})
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            t_last = now
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            _save_checkpoint(ctx, run_dir, model, optimizer, scheduler, done, cfg, class_names)
        if val_set is not None and cfg.val.every and done % cfg.val.every == 0 and done < cfg.iterations:
            _validate(ctx, run_dir, net, model, val_set, class_names, done, cfg)
        if on_iteration is not None:
            on_iteration(done)
    bar.close()
    if start >= cfg.iterations:
        log.info("%s is already trained (%d iterations)", run_dir, cfg.iterations)
    elif val_set is not None:
        _validate(ctx, run_dir, net, model, val_set, class_names, cfg.iterations, cfg)
    _finish(ctx, run_dir, model, cfg)
    if ctx.owns_group:
        dist.destroy_process_group()
    return run_dir


def _sync_buffers(ctx, model) -> None:
    """BN running statistics from rank 0 to all ranks. DDP broadcasts them before every
    forward, so this changes nothing in training, but after the last step each rank holds
    its own statistics; synced, every rank ends with rank 0's (saved) model."""
    if ctx.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _save_checkpoint(ctx, run_dir, model, optimizer, scheduler, iteration, cfg, class_names) -> None:
    """Every rank's RNG state is gathered; rank 0 writes the checkpoint and the weights."""
    _sync_buffers(ctx, model)
    rng = torch.get_rng_state()
    rngs = [rng]
    if ctx.world > 1:
        rngs = [torch.empty_like(rng) for _ in range(ctx.world)]
        dist.all_gather(rngs, rng.to(ctx.device) if ctx.device.type == "cuda" else rng)
        rngs = [r.cpu() for r in rngs]
    if not ctx.is_main:
        return
    state = {"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": {"torch": rngs}, "config": json.dumps(to_dict(cfg)),
             "class_names": list(class_names), "world_size": ctx.world}
    with io.atomic_path(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)
    save_segmenter(run_dir, model, class_names, extra={"iteration": iteration})
    log.info("checkpoint at iteration %d written to %s", iteration, run_dir)


def _open_val_set(cfg: TrainConfig, class_names):
    from namedmask.stages.evaluate import open_eval_set

    return open_eval_set(cfg.val.dataset, cfg.val.root, cfg.val.split)


def _validate(ctx, run_dir, net, model, val_set, class_names, iteration, cfg) -> None:
    from namedmask.stages.evaluate import evaluate_model

    _sync_buffers(ctx, model)  # every rank scores its shard with the same model
    report = evaluate_model(model, val_set, class_names, device=ctx.device, amp=_amp_enabled(cfg, ctx.device),
                            max_images=cfg.val.max_images, rank=ctx.rank, world=ctx.world, progress=False)
    net.train()
    if ctx.is_main:
        _append_metrics(run_dir, {"iteration": iteration, "val_miou": report.metrics.miou,
                                  "val_pixel_acc": report.metrics.pixel_acc})
        log.info("iteration %d: val mIoU %.2f", iteration, 100 * report.metrics.miou)
        plot_curves(run_dir)  # the plot follows the run, not only its end


def _finish(ctx, run_dir: Path, model, cfg) -> None:
    """Checks the ranks ended with identical weights, writes summary.json and the curves plot."""
    _sync_buffers(ctx, model)
    digest = state_digest(model)
    digests = [digest]
    if ctx.world > 1:
        digests = [None] * ctx.world
        dist.all_gather_object(digests, digest)
    if ctx.is_main:
        io.write_json(run_dir / "summary.json", {"iterations": cfg.iterations, "world_size": ctx.world,
                                                 "rank_digests": digests, "weights": "model.safetensors"})
        plot_curves(run_dir)
    if len(set(digests)) > 1:
        raise TrainError(f"DDP ranks ended with different weights: {digests}")


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(run_dir) -> Path | None:
    """curves.png: training loss and validation mIoU against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    loss = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    val = [(r["iteration"], 100 * r["val_miou"]) for r in records if "val_miou" in r]
    if not loss:
        return None
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 5, 3.5), squeeze=False)
    axes[0][0].plot(*zip(*loss))
    axes[0][0].set(xlabel="iteration", ylabel="loss", title="training loss")
    if val:
        axes[0][1].plot(*zip(*val), marker="o")
        axes[0][1].set(xlabel="iteration", ylabel="mIoU (%)", title="validation mIoU")
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
