"""Per-image outputs: the one way a command that writes files per input image (predict,
discover) finds its images and names, claims and fills its output folder.

- Input scan (`find_images`): files given directly, and the images found (recursively) in the
  folders given; hidden files and folders (a killed run's `.x.tmp.png`) and everything under
  the output folder are left out, so `predict photos/ --out photos/pred` run twice does not
  predict its own outputs. A file given twice (directly and inside a folder) is taken once.
- Output names (`output_names`): an image's path relative to the folder it was found in (its
  file name when given directly) without the suffix; where two images would get one name (the
  same stem with other suffixes: photo.jpg, photo.png, photo.webp) the suffix stays in the name
  (photo.jpg -> labels/photo.jpg.png); where they still collide (two folders holding a/x.jpg)
  their paths below the folders' common parent name them; a name that is still taken gets
  `~2`, `~3`. Names are a function of the whole input list, so a rerun with the same inputs
  finds its own outputs.
- The folder (`ImageOutputs`): claimed, locked and cleaned by namedmask.io.output_folder before
  any work; every output path is proven to stay inside it (a subfolder symlinked elsewhere is
  refused before the first image); each finished image records its input's identity (sha256
  of the file) in `sources/<name>.json`, written last, so an image is "already done" only when
  that record names the same bytes and every output file exists: a different image of the same
  name (another folder, an edited file) is computed again. `write_record`/`is_recorded` are
  that record for commands whose inputs are pairs (refine: image and mask).
- Bad images (`load`): an unreadable file does not stop the others; at the end (`finish`) they
  are one error listing each (rc 1), or with skip_bad logged and listed (rc 0).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from namedmask import io
from namedmask.data.datasets import list_files
from namedmask.data.decode import IMAGE_SUFFIXES, ImageDecodeError, load_image
from namedmask.errors import BadInputError

log = logging.getLogger(__name__)

SOURCES = "sources"     # sources/<name>.json: the input each finished image was computed from


class ImageInputError(BadInputError):
    """No images to work on, a missing input, or unreadable images (listed); the message names them."""


@dataclass(frozen=True)
class Found:
    path: Path          # the image file
    relative: str       # its path relative to the folder it was found in (posix), or its file name


def _within(path: Path | None, folder: Path) -> bool:
    if path is None:
        return False
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def find_images(inputs, exclude: str | os.PathLike | None = None) -> list:
    """[Found] of the image files given and found (recursively, sorted) in the folders given;
    hidden files and folders and anything inside `exclude` (the output folder) are left out."""
    exclude = Path(exclude) if exclude is not None else None
    found, seen, left_out = [], set(), False
    for given in map(Path, inputs):
        if given.is_dir():
            left_out = left_out or _within(exclude, given)
            candidates = [Found(p, p.relative_to(given).as_posix())
                          for p in list_files(given, IMAGE_SUFFIXES, exclude) if p.is_file()]
        elif given.is_file():
            candidates = [Found(given, given.name)]
        else:
            raise ImageInputError(f"{given}: no such file or folder")
        for f in candidates:
            key = os.path.realpath(f.path)
            if key not in seen:
                seen.add(key)
                found.append(f)
    if left_out:
        log.info("the output folder %s is not searched for input images", exclude)
    if not found:
        raise ImageInputError(f"no images found in {[str(p) for p in inputs]}"
                              + (" (outside the output folder)" if left_out else ""))
    return found


def _strip(relative: str) -> str:
    return relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative


def output_names(found: list) -> list:
    """One unique output name (a relative posix path without suffix) per Found (module notes)."""
    names = [_strip(f.relative) for f in found]
    groups: dict = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        suffixes = [Path(found[i].relative).suffix.lower() for i in members]
        if len(set(suffixes)) == len(members):      # photo.jpg, photo.png: keep the suffix
            for i in members:
                names[i] = found[i].relative
            continue
        # the same relative path from two folders: name them by their paths below the common parent
        real = [Path(os.path.realpath(found[i].path)) for i in members]
        common = Path(os.path.commonpath([str(r.parent) for r in real]))
        below = [r.relative_to(common).as_posix() for r in real]
        stripped = [_strip(b) for b in below]
        keep_suffix = len(set(stripped)) < len(stripped)  # a/x.jpg, b/x.jpg, b/x.png
        for i, b, st in zip(members, below, stripped):
            names[i] = b if keep_suffix else st
    taken, out = set(), []
    for n in names:
        unique, k = n, 1
        while unique.lower() in taken:
            k += 1
            unique = f"{n}~{k}"
        taken.add(unique.lower())
        out.append(unique)
    return out


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes (None when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def record_path(out: Path, name: str) -> Path:
    return io.inside(out, f"{SOURCES}/{name}.json")


def write_record(out: Path, name: str, inputs: dict) -> None:
    """sources/<name>.json: {kind: {"path", "sha256"}} of the inputs `name` was computed from
    (`inputs`: {kind: (path, sha256)}); written after the outputs, it marks them finished."""
    io.write_json(record_path(out, name), {k: {"path": str(p), "sha256": d} for k, (p, d) in inputs.items()})


def is_recorded(out: Path, name: str, inputs: dict) -> bool:
    """Whether sources/<name>.json names exactly these inputs' bytes ({kind: (path, sha256)};
    the paths may differ: a moved folder is still done, another image of that name is not)."""
    try:
        recorded = json.loads(record_path(out, name).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(
        d is not None and isinstance(recorded.get(k), dict) and recorded[k].get("sha256") == d
        for k, (_, d) in inputs.items()) and set(recorded) == set(inputs)


@dataclass
class Item:
    path: Path
    name: str
    _digest: str | None = field(default=None, repr=False)

    @property
    def digest(self) -> str | None:
        """sha256 of the file (None when it cannot be read)."""
        if self._digest is None:
            self._digest = file_digest(self.path)
        return self._digest

    @property
    def inputs(self) -> dict:
        return {"image": (self.path, self.digest)}


class ImageOutputs:
    """A claimed output folder and the images to fill it from; use `claim_image_outputs`."""

    def __init__(self, out: Path, items: list, outputs: dict, skip_bad: bool):
        self.out, self.items, self.outputs, self.skip_bad = out, items, outputs, skip_bad
        self.bad: list = []          # (path, reason)

    def path(self, kind: str, item: Item) -> Path:
        """The output file of kind `kind` (a key of `outputs`) of `item`, proven inside the folder."""
        return io.inside(self.out, self.outputs[kind].format(item.name))

    def done(self, item: Item, kinds=None) -> bool:
        """Whether `item` was finished from the same bytes and its output files (of `kinds`,
        default all) exist."""
        return is_recorded(self.out, item.name, item.inputs) and all(
            self.path(k, item).is_file() for k in (kinds or self.outputs))

    def load(self, item: Item):
        """The image (uint8 [H, W, 3]), or None when it cannot be read (listed for `finish`)."""
        try:
            return load_image(item.path)
        except (ImageDecodeError, OSError) as exc:
            reason = str(exc) if isinstance(exc, ImageDecodeError) else f"{item.path}: {exc.strerror or exc}"
            self.bad.append((item.path, reason))
            log.warning("skipped %s", reason)
            return None

    def record(self, item: Item) -> None:
        """Marks `item` finished (after its outputs are written): its input's identity."""
        write_record(self.out, item.name, item.inputs)

    def finish(self, done: int) -> None:
        """Unreadable images: one error listing them (the others are finished), or with
        skip_bad a warning listing them."""
        if not self.bad:
            return
        listing = "; ".join(reason for _, reason in self.bad[:10]) + (
            f"; and {len(self.bad) - 10} more" if len(self.bad) > 10 else "")
        if not self.skip_bad:
            raise ImageInputError(f"{len(self.bad)} unreadable image(s) (the other {done} were done): {listing}; "
                                  f"fix or remove them and rerun (finished images are kept), or pass --skip-bad")
        log.warning("%d unreadable image(s) skipped: %s", len(self.bad), ", ".join(str(p) for p, _ in self.bad))


@contextlib.contextmanager
def claim_image_outputs(out_dir, stage: str, inputs, outputs: dict, *, legacy: tuple = (),
                        skip_bad: bool = False) -> Iterator[ImageOutputs]:
    """Takes `out_dir` for `stage` (namedmask.io.output_folder: owned, locked, cleaned), finds
    the images of `inputs` outside it and names them. `outputs`: {kind: "folder/{}.suffix"}, the
    files written per image; their folders (and sources/) must stay inside the output folder."""
    out = Path(out_dir)
    with io.output_folder(out, stage, legacy=legacy):  # a folder not ours is refused first
        found = find_images(inputs, exclude=out)
        for pattern in (*outputs.values(), f"{SOURCES}/{{}}"):  # a symlinked subfolder leading out: refused now
            folder = Path(pattern.format("x")).parent
            if str(folder) != ".":
                io.inside(out, folder)
        items = [Item(f.path, n) for f, n in zip(found, output_names(found))]
        yield ImageOutputs(out, items, outputs, skip_bad)
