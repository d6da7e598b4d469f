"""The training set of stage (D) and of the experts (stage C): archive images with their
pseudo-masks, and the sample order.

Data order is a pure function of (seed, iteration, rank): sample number k of the run reads
image perm_epoch[k mod N] (perm seeded by (seed, epoch)) and augments it with a generator
seeded by (seed, k); the global batch of iteration i is samples [i B, (i+1) B) whatever the
number of ranks. So a run resumed from its checkpoint, or split over DDP ranks, sees exactly
the data an uninterrupted run sees, without saving any loader state."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from namedmask.config import TrainConfig
from namedmask.data.archive import load_archive
from namedmask.data.augment import IGNORE, train_transform
from namedmask.data.decode import load_image
from namedmask.data.pseudo_masks import mask_paths, no_foreground_message, read_pseudo_mask
from namedmask.errors import BadInputError, NamedMaskError
from namedmask.runtime import one_thread

log = logging.getLogger(__name__)


class TrainError(BadInputError, RuntimeError):
    """Inputs or a run directory that training cannot use; the message says what to do."""


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
    check_masks(items, masks_dir, require_foreground=not binary)
    names = ["background", "foreground"] if binary else archive.class_names
    return items, names


def _mask_array(path: Path, check_values: bool = True) -> np.ndarray:
    return read_pseudo_mask(path, TrainError, check_values)


def check_masks(items: list, masks_dir, require_foreground: bool = True) -> None:
    """Every pseudo-mask read once before the first step (data.pseudo_masks.read_pseudo_mask:
    values other than 0, 1 and 255 are an error naming file and value, since 0/255 masks would
    train every foreground pixel as 'ignore'); so is a folder whose masks have no foreground."""
    foreground = False
    for item in items:
        foreground = foreground or bool((_mask_array(item.mask) == 1).any())
    if not foreground and not require_foreground:  # an expert of objects saliency missed: said, not fatal
        log.warning("%s: none of the %d pseudo-masks of this expert has foreground", masks_dir, len(items))
    elif not foreground:
        raise TrainError(no_foreground_message(masks_dir, len(items)))


def read_training_label(item: TrainItem, image_size: tuple) -> torch.Tensor:
    """uint8 [H, W]: class id where mask == 1, 0 where 0, 255 where 255."""
    mask = _mask_array(item.mask, check_values=False)  # checked once by check_masks before training
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
        try:
            return self._sample(k)
        except (NamedMaskError, OSError) as exc:  # a bad image: the error itself, not torch's wrapper
            return WorkerError(exc)

    def _sample(self, k: int):
        index = self.image_index(k)
        item = self.items[index]
        image = load_image(item.image).permute(2, 0, 1)
        label = read_training_label(item, image.shape[-2:])
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, -1, k))
        with one_thread():  # the same bits whatever the thread count and the number of workers
            image, label = train_transform(image, label, self.cfg.augment, g)
        return image, label, index


class WorkerError:
    """An error of ours (or the OS's) raised while loading a sample, carried out of a DataLoader
    worker as a value: torch would re-raise it with the worker's traceback as its message. The
    loader's `collate` passes it on, and `unwrap` raises it, in the main process."""

    def __init__(self, error: BaseException):
        self.error = error


def collate(batch: list):
    """default_collate, or the batch's first WorkerError."""
    return next((s for s in batch if isinstance(s, WorkerError)), None) or default_collate(batch)


def unwrap(batch):
    """The batch, or its sample's error raised here."""
    if isinstance(batch, WorkerError):
        raise batch.error
    return batch


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
