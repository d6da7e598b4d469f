"""Stage (D) (and the experts of stage C): train a DeepLabv3+ on category archives + pseudo-masks.
This module is the loop and the checkpoint; the training set and its sample order are in
namedmask/data/training.py, device and DDP setup in namedmask/runtime.py, metrics files
and curves in namedmask/report.py.

Run directory: config.yaml (resolved config), checkpoint.pt (full training state; loads with
torch.load(weights_only=True)), model.safetensors + model.json (the segmenter),
metrics.jsonl (one JSON object per logged iteration / validation), curves.png, summary.json."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from namedmask import io, ops
from namedmask.config import CopyPasteConfig, TrainConfig, changed_settings, dump_yaml, to_dict
from namedmask.data.archive import load_archive
from namedmask.data.augment import IGNORE
from namedmask.data.datasets import open_dataset
from namedmask.data.training import (IterationBatches, TrainError, TrainSamples, _seed, archive_items, collate,
                                     unwrap)
from namedmask.data.pseudo_masks import load_manifest
from namedmask.models.deeplab import build_model, save_segmenter
from namedmask.models.provenance import training_provenance
from namedmask.report import METRICS_FILE, plot_curves
from namedmask.envinfo import environment
from namedmask.evaluation import evaluate_model
from namedmask.models.openvocab import TextObjective
from namedmask.runtime import (Eta, dataloader_workers, resolve_device, set_threads, setup_distributed, sync_buffers,
                               thread_record, threads_are_automatic, threads_source)

log = logging.getLogger(__name__)

CHECKPOINT_FILE, CONFIG_FILE = "checkpoint.pt", "config.yaml"
# Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = ("out", "num_workers", "log_every", "checkpoint_every", "iterations", "device", "val")


def apply_copy_paste(images, labels, cfg: CopyPasteConfig, generator):
    """The one call into the copy-paste op (objects of other samples pasted into the batch)."""
    if cfg.p <= 0:
        return images, labels
    if not hasattr(ops, "random_copy_paste"):
        raise TrainError("copy_paste.p > 0 needs namedmask.ops.random_copy_paste, which this installation "
                         "lacks; set copy_paste.p=0 to train without copy-paste")
    return ops.random_copy_paste(images, labels, p=cfg.p, max_objects=cfg.max_objects, scale=cfg.scale,
                                 hflip=cfg.hflip, generator=generator)


_NO_LABEL = 2 ** 31 - 1   # "ignore" while labels carry their sample (copy_paste_with_sources)


def copy_paste_with_sources(images, labels, cfg: CopyPasteConfig, generator):
    """apply_copy_paste, also saying where each foreground pixel came from: (images, labels,
    sources), sources long [B, H, W] = the batch position of the sample whose object the pixel
    shows, -1 on background and ignore. The labels travel as label + 256 x position through the
    one op call, so images and labels are exactly apply_copy_paste's."""
    batch = torch.arange(len(labels), device=labels.device).view(-1, 1, 1)
    fg = (labels != 0) & (labels != IGNORE)
    if cfg.p <= 0:
        return images, labels, torch.where(fg, batch, -1)
    coded = torch.where(fg, labels.long() + 256 * batch, torch.where(labels == IGNORE, _NO_LABEL, 0))
    if not hasattr(ops, "random_copy_paste"):
        apply_copy_paste(images, labels, cfg, generator)   # raises the same TrainError
    images, coded = ops.random_copy_paste(images, coded, p=cfg.p, max_objects=cfg.max_objects, scale=cfg.scale,
                                          hflip=cfg.hflip, ignore_index=_NO_LABEL, generator=generator)
    fg = (coded != 0) & (coded != _NO_LABEL)
    out = torch.where(fg, coded % 256, torch.where(coded == _NO_LABEL, IGNORE, 0)).to(labels.dtype)
    return images, out, torch.where(fg, coded // 256, -1)


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
    diff = changed_settings(yaml.safe_load(path.read_text()), to_dict(cfg), to_dict(TrainConfig()),
                            ignore=RESUMABLE_CHANGES)
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


def _log_start(cfg: TrainConfig, items: list, class_names: list, ctx) -> None:
    """What a run trains on, said once before the first step; random backbone weights are a warning."""
    log.info("training %s: %d images, %d classes (%s), device %s x %d rank(s), %d iterations of batch %d",
             cfg.out, len(items), len(class_names), ", ".join(class_names[:8]) + (" ..." if len(class_names) > 8 else ""),
             ctx.device, ctx.world, cfg.iterations, cfg.batch_size)
    if cfg.model.pretrained:
        log.info("backbone %s initialised from %s", cfg.model.backbone, cfg.model.pretrained)
    else:
        log.warning("backbone %s starts from RANDOM weights (model.pretrained is not set): fine for a smoke "
                    "run, far below NamedMask's quality (its recipe starts from DINO ResNet-50 weights)",
                    cfg.model.backbone)


def _amp_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.amp not in ("auto", "bf16", "off"):
        raise TrainError(f"amp must be auto, bf16 or off, got {cfg.amp!r}")
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def train(cfg: TrainConfig, *, binary: bool = False, categories=None, on_iteration=None,
          progress: bool = True) -> Path:
    """Trains (or resumes) the run in cfg.out; returns the run directory. `on_iteration(i)` is
    called after each completed iteration i (tests use it to interrupt a run)."""
    if not (cfg.archive and cfg.masks and cfg.out):
        raise TrainError("give an archive, a pseudo-mask folder and an output run directory")
    if cfg.head not in ("linear", "text"):
        raise TrainError(f"train.head {cfg.head!r}: expected linear (closed set) or text (open vocabulary)")
    main = int(os.environ.get("RANK", "0")) == 0
    with io.output_folder(cfg.out, "train", legacy=(CONFIG_FILE,), enabled=main), tiny_training_threads(cfg):
        return _train(cfg, binary, categories, on_iteration, progress)


# Below this many floating-point operations per training iteration (3x the forward pass of a
# batch of crops, counted on the meta device) a model is "tiny": its operators are too short to
# share between threads. The toy configs' DeepLab (resnet10t, 8-64 channels, batch 8, crop 96):
# ~0.9 GFLOP, 96 ms per step on 1 thread against 265 ms on 2 on the busy 2-core machine; the
# paper's ResNet-50 at batch 8, crop 384: ~6 TFLOP.
TINY_TRAINING_FLOPS = 20e9


def training_flops(cfg: TrainConfig) -> float:
    """Floating-point operations of one training iteration of `cfg`'s model (binary head): 3x its
    forward pass on a batch of crops (backward ~2x forward), counted on the meta device."""
    from namedmask.models.inference import forward_flops

    crop = cfg.augment.crop_size
    with torch.device("meta"):  # the architecture only: no backbone file read (nor loaded into meta tensors)
        model = build_model(dataclasses.replace(cfg.model, pretrained=None), 2)
        x = torch.empty(cfg.batch_size, 3, crop, crop)
    return 3 * forward_flops(model.train(), x)


def is_tiny(cfg: TrainConfig) -> bool:
    return training_flops(cfg) < TINY_TRAINING_FLOPS


@contextlib.contextmanager
def tiny_training_threads(cfg: TrainConfig):
    """A tiny model (is_tiny) trained on a CPU with namedmask's automatic threads trains on one
    thread, recorded as such in its summary.json and the run's JSON; an explicit thread count
    is kept as given. A function of the config and the machine, never of the load: the same
    config gives the same bits on any machine with the same instruction set, whatever its cores."""
    if torch.get_num_threads() == 1 or not threads_are_automatic() or resolve_device(cfg.device).type != "cpu" \
            or not is_tiny(cfg):
        yield
        return
    before, source = torch.get_num_threads(), threads_source()
    set_threads(1, f"auto (tiny model: under {TINY_TRAINING_FLOPS / 1e9:.0f} GFLOP per training iteration, 1 thread)")
    log.info("tiny model (%.1f GFLOP per iteration): training on 1 thread (automatic threads; --threads N to choose)",
             training_flops(cfg) / 1e9)
    try:
        yield
    finally:
        set_threads(before, source)


def _train(cfg: TrainConfig, binary, categories, on_iteration, progress) -> Path:
    """The body of train, inside its locked output folder."""
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

    if ctx.is_main:
        _log_start(cfg, items, class_names, ctx)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = TextObjective(cfg.text, cfg.archive, class_names, ctx.device) if cfg.head == "text" else None
    if objective is not None:
        objective.prepare(items, run_dir, cfg.seed, write=ctx.is_main)
    model = (objective.build_model(cfg.model, len(class_names)) if objective
             else build_model(cfg.model, len(class_names))).to(ctx.device)
    if ctx.is_main:
        model.provenance = _provenance(cfg)   # written into model.json by save_segmenter
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    optimizer = torch.optim.Adam([{"params": backbone, "lr": cfg.optim.lr_backbone},
                                  {"params": model.head_parameters(), "lr": cfg.optim.lr_head}],
                                 betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [poly_factor(cfg.optim.lr_backbone, cfg), poly_factor(cfg.optim.lr_head, cfg)])
    start = 0
    if ckpt_path.is_file():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # written atomically, so damage is from outside: say so
            raise TrainError(f"{ckpt_path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); "
                             f"delete it to restart the run") from exc
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
                        num_workers=dataloader_workers(cfg.num_workers), pin_memory=ctx.device.type == "cuda",
                        collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
    val_set = _open_val_set(cfg, class_names) if cfg.val.dataset else None

    net.train()
    bar = tqdm(total=cfg.iterations, initial=start, desc="train", unit="it",
               disable=not (progress and ctx.is_main) or start >= cfg.iterations)
    t_last, it = time.perf_counter(), start
    eta = Eta(log, f"training {run_dir.parent.name}/{run_dir.name}", cfg.iterations, start)
    # The logged loss is the mean over the iterations since the last log or checkpoint (one
    # batch's loss is too noisy to read a curve from); restarting the window at checkpoints keeps
    # a resumed run's log identical to an uninterrupted one.
    window_loss, window_steps = torch.zeros((), device=ctx.device), 0
    for it, batch in enumerate(loader, start=start):
        images, labels, indices = unwrap(batch)
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        # random_copy_paste draws on a CPU generator whatever the images' device
        cp_gen = torch.Generator().manual_seed(_seed(cfg.seed, it, ctx.rank, 2))
        sources = None
        if objective is not None and objective.per_instance:
            images, labels, sources = copy_paste_with_sources(images, labels, cfg.copy_paste, cp_gen)
        else:
            images, labels = apply_copy_paste(images, labels, cfg.copy_paste, cp_gen)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            if objective is not None:  # this iteration's names (same on every rank), + distillation
                loss = objective.loss(net, images, labels, torch.Generator().manual_seed(_seed(cfg.seed, it, 3)),
                                      sources=sources, items=indices, iteration=it)
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
        if ctx.is_main:
            eta.step(done)
        window_loss += loss.detach().float()
        window_steps += 1
        if done % cfg.log_every == 0 or done == cfg.iterations:
            mean_loss = float(ctx.all_reduce(window_loss / window_steps) / ctx.world)
            window_loss.zero_()
            window_steps = 0
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
            window_loss.zero_()
            window_steps = 0
        if val_set is not None and cfg.val.every and done % cfg.val.every == 0 and done < cfg.iterations:
            _validate(ctx, run_dir, net, model, val_set, class_names, done, cfg)
        if on_iteration is not None:
            on_iteration(done)
    bar.close()
    if start >= cfg.iterations:
        log.info("%s is already trained (%d iterations)", run_dir, cfg.iterations)
    elif val_set is not None:
        _validate(ctx, run_dir, net, model, val_set, class_names, cfg.iterations, cfg)
    _finish(ctx, run_dir, model, cfg, resumed=start > 0)
    if ctx.owns_group:
        dist.destroy_process_group()
    return run_dir


def _provenance(cfg: TrainConfig) -> dict:
    """What this model is made from (models.provenance): the archive's CLIP and category words,
    the saliency model behind the masks (through the experts' manifest to its source masks)."""
    archive = load_archive(cfg.archive)
    manifest = load_manifest(cfg.masks)
    if manifest.get("refine") == "experts" and manifest.get("source_masks"):
        source = Path(cfg.masks) / manifest["source_masks"]
        if (source / "manifest.json").is_file():
            manifest = load_manifest(source)
    return training_provenance(archive.meta, archive.pool_root, manifest.get("config") or {},
                               archive.meta.get("prompt_words") or {}, cfg.augment.crop_size)


def _save_checkpoint(ctx, run_dir, model, optimizer, scheduler, iteration, cfg, class_names) -> None:
    """Every rank's RNG state is gathered; rank 0 writes the checkpoint and the weights."""
    sync_buffers(ctx, model)
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
    # The weights first, the checkpoint last: the checkpoint is what a rerun resumes from, so a stop
    # between the two writes redoes this iteration instead of keeping the previous weights as final.
    save_segmenter(run_dir, model, class_names, extra={"iteration": iteration})
    io.save_torch(state, run_dir / CHECKPOINT_FILE)  # a full disk: one line, nothing half-written
    log.info("checkpoint at iteration %d written to %s", iteration, run_dir)


def _open_val_set(cfg: TrainConfig, class_names):
    if cfg.val.root is None:
        raise TrainError(f"val.dataset {cfg.val.dataset!r} needs val.root (the dataset's folder)")
    return open_dataset(cfg.val.dataset, cfg.val.root, cfg.val.split)


def _validate(ctx, run_dir, net, model, val_set, class_names, iteration, cfg) -> None:
    sync_buffers(ctx, model)  # every rank scores its shard with the same model
    report = evaluate_model(model, val_set, class_names, device=ctx.device, amp=_amp_enabled(cfg, ctx.device),
                            max_images=cfg.val.max_images, rank=ctx.rank, world=ctx.world, progress=False)
    net.train()
    if ctx.is_main:
        _append_metrics(run_dir, {"iteration": iteration, "val_miou": report.metrics.miou,
                                  "val_pixel_acc": report.metrics.pixel_acc})
        log.info("iteration %d: val mIoU %.4f", iteration, report.metrics.miou)
        plot_curves(run_dir)  # the plot follows the run, not only its end


def _finish(ctx, run_dir: Path, model, cfg, resumed: bool = False) -> None:
    """Checks the ranks ended with identical weights, writes summary.json and the curves plot."""
    sync_buffers(ctx, model)
    digest = state_digest(model)
    digests = [digest]
    if ctx.world > 1:
        digests = [None] * ctx.world
        dist.all_gather_object(digests, digest)
    if ctx.is_main:
        io.write_json(run_dir / "summary.json", {"iterations": cfg.iterations, "world_size": ctx.world,
                                                 "rank_digests": digests, "weights": "model.safetensors",
                                                 "environment": environment(thread_record(), resumed)})
        plot_curves(run_dir)
    if len(set(digests)) > 1:
        raise TrainError(f"DDP ranks ended with different weights: {digests}")
