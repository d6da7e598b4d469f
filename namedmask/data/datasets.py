"""The labelled datasets users already have, and unlabelled image pools.

`open_dataset(name, root, split="val")` gives a LabeledSet: items (id, image path, label
path) in a stable sorted order, the class names in id order (0 = background) and
`read_label(item)`, an H×W array of class ids with `ignore_index` for unscored pixels.

  voc                VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/<split>.txt}
                     (root may be the folder holding VOCdevkit, VOCdevkit, or VOC2012); 255 = ignore.
  coco-object        <root>/<split>2017/*.jpg + the masks `namedmask prepare coco-object` builds
                     (namedmask/data/coco.py: crowd -> 255, overlaps -> the smaller instance).
  coca               <root>/image/<category>/*.jpg + <root>/binary/<category>/*.png (0/255 masks):
                     foreground (> 127) gets the category's id 1..80; scored like every set, as
                     an 81-class mIoU (the official protocol); binary=True adds the mean
                     per-image foreground IoU beside it.
  cityscapes-object  <root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/..._gtFine_labelIds.png;
                     the 14 object classes, every other labelId is background (official protocol).
  imagenet-s         <root>/validation/<wnid>/*.JPEG + validation-segmentation/<wnid>/*.png, root =
                     an ImageNetS50/300/919 folder; id = R + 256·G, ignore_index = 1000 (the dataset's
                     own; 255 is a real class in S300/S919); class names are the subset's WordNet ids,
                     sorted (that is the dataset's id order); labels are int32.

  coco-stuff         COCO-Stuff-164k: images <root>/images/<split>2017/*.jpg (or <root>/<split>2017) +
                     stuffthingmaps PNGs <root>/stuffthingmaps_trainval2017/<split>2017/*.png (or
                     <root>/annotations/<split>2017, mmseg's place for them; *_labelTrainIds.png are
                     not read): pixel = cocostuff id - 1, 255 unlabelled (ignored). Class ids are
                     cocostuff's (1 person ... 182 wood; 0 "unlabeled" never occurs), names from
                     <root>/labels.txt or the stuffthingmaps folder's labels.txt ("id: name"), else
                     built in. No background class: every class is matched and scored.
  pascal-context-59  PASCAL-Context, 59 classes + 0 = the pixels of none of them. <root> = VOC2010 (or a
                     folder holding VOC2010 or VOCdevkit/VOC2010): JPEGImages/ + either
                     SegmentationClassContext/<id>.png (mmseg's converted maps, 0..59) with
                     ImageSets/SegmentationContext/<split>.txt, or the original release's
                     trainval/<id>.mat (LabelMap, the 459 ids; mapped to the 59 by the standard
                     converters' id table, every other id -> 0) with that split file or
                     ImageSets/Main/<split>.txt. 0 is not ignored (the zero-guidance evaluation
                     scores its pixels as negatives); 255 is.
  pascal-context-459 the original release: <root>/labels.txt ("id: name", 459 lines) + trainval/<id>.mat
                     (or segment_anno/<id>.mat) + the images and split as for pascal-context-59.
                     0 and the "unknown" class are neither a class nor ignored.

  folder             <root>/images/**/*.{jpg,png,...} + <root>/labels/<same relative stem>.png (index PNGs);
                     an image without a label is listed (label None) and not scored; class names
                     are the model's (class_names None).

`list_pool_images(path)` lists an unlabelled pool: a folder tree, a list file (one path per
line, relative to the file's folder), or an ImageNet root (only train/<wnid>/*.JPEG)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from namedmask import io
from namedmask.data.categories import (CITYSCAPES_LABEL_ID_TO_OBJECT, COCO_STUFF, PASCAL_CONTEXT_59,
                                       PASCAL_CONTEXT_59_SOURCE_IDS, get_category_set)
from namedmask.data.coco import coco_paths
from namedmask.data.decode import IMAGE_SUFFIXES
from namedmask.data.labelmaps import LabelMapError, index_label_maps, read_label_map
from namedmask.errors import BadInputError, InputError

log = logging.getLogger(__name__)

DATASETS = ("voc", "coco-object", "coca", "cityscapes-object", "imagenet-s", "coco-stuff", "pascal-context-59",
            "pascal-context-459", "folder")
_WNID = re.compile(r"^n\d{8}$")


class DatasetError(BadInputError, FileNotFoundError):
    """A dataset folder that does not have the expected layout; the message says what is missing."""


@dataclass(frozen=True)
class LabeledItem:
    id: str                 # unique within the set, e.g. "2007_000033" or "cat/0001"
    image: Path
    label: Path | None


@dataclass
class LabeledSet:
    name: str
    root: Path
    class_names: tuple      # class_names[i] = class with id i; 0 = background
    items: list
    label_reader: Callable = field(repr=False)   # (label path, item) -> H×W class ids
    ignore_index: int = 255
    binary: bool = False    # CoCA-style (one object per image): also report mean per-image foreground IoU
    background: int | None = 0   # the id of "no class" pixels (eval --discover ignores them for a class absent
    #                              from the image); None: no such id, every pixel scores

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index) -> LabeledItem:
        return self.items[index]

    def __iter__(self) -> Iterator[LabeledItem]:
        return iter(self.items)

    def read_label(self, item: LabeledItem) -> np.ndarray:
        """H×W class ids (uint8, int32 for ImageNet-S), ignore_index where not scored."""
        if item.label is None:
            raise InputError(f"{self.name}: item {item.id} has no label")
        return self.label_reader(item.label, item)


# ---------------------------------------------------------------------------------------------
# Helpers

def list_files(folder: Path, suffixes, exclude: str | os.PathLike | None = None) -> list:
    """Sorted files under `folder` (recursive, symlinks followed, hidden names skipped), none of
    them inside `exclude` (a command's own output folder below its input folder: its outputs are
    not inputs of the next run)."""
    excluded = os.path.realpath(exclude) if exclude is not None else None

    def kept(path: str) -> bool:
        if excluded is None:
            return True
        real = os.path.realpath(path)
        return real != excluded and not real.startswith(excluded.rstrip(os.sep) + os.sep)

    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and kept(os.path.join(dirpath, d))]
        out += [Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(suffixes)]
    return sorted(out)


def _require(*paths: Path) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetError("missing: " + ", ".join(str(p) for p in missing))


def _pair(images: dict, labels: dict, what: str) -> list:
    """Items for the ids present in both {id: path} maps; an image without its label is an error."""
    no_label = [i for i in images if i not in labels]
    if no_label:
        raise DatasetError(f"{what}: {len(no_label)} image(s) have no label file, e.g. {images[no_label[0]]}")
    return [LabeledItem(i, images[i], labels[i]) for i in sorted(images)]


def _read_index_png(path: Path, item=None) -> np.ndarray:
    return read_label_map(path)


# ---------------------------------------------------------------------------------------------
# Readers

def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() or (cand / "SegmentationClass").is_dir():
            return cand
    raise DatasetError(f"{root}: no VOC2012 folder (looked for JPEGImages/ in {root}, {root / 'VOC2012'} and "
                       f"{root / 'VOCdevkit' / 'VOC2012'})")


def _open_voc(root: Path, split: str) -> LabeledSet:
    voc = _voc_root(root)
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    _require(voc / "JPEGImages", voc / "SegmentationClass", split_file)
    ids = [line.split()[0] for line in io.read_user_text(split_file, DatasetError).splitlines() if line.strip()]
    items = [LabeledItem(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png") for i in ids]
    _check_items_exist(items, f"VOC {split} ({split_file})")
    return LabeledSet("voc", voc, get_category_set("voc").names, items, _read_index_png)


def _check_items_exist(items: list, what: str) -> None:
    missing = [p for it in items for p in (it.image, it.label) if p is not None and not p.is_file()]
    if missing:
        raise DatasetError(f"{what}: {len(missing)} listed file(s) missing, e.g. {', '.join(map(str, missing[:3]))}")


def _open_coco_object(root: Path, split: str) -> LabeledSet:
    paths = coco_paths(root, split)
    _require(paths["images"])
    if not paths["masks"].is_dir():
        raise DatasetError(f"{paths['masks']}: COCO-Object masks not built yet; run "
                           f"`namedmask prepare coco-object --root {root} --split {split}` "
                           f"(needs {paths['instances']})")
    images = {p.stem: p for p in list_files(paths["images"], (".jpg", ".jpeg", ".png"))}
    labels = {p.stem: p for p in list_files(paths["masks"], (".png",))}
    return LabeledSet("coco-object", root, get_category_set("coco-object").names,
                      _pair(images, labels, f"COCO-Object {split}"), _read_index_png)


def _open_coca(root: Path, split: str) -> LabeledSet:
    _require(root / "image", root / "binary")
    names = get_category_set("coca").names
    ids = {n: i for i, n in enumerate(names)}
    images = {p.relative_to(root / "image").with_suffix("").as_posix(): p
              for p in list_files(root / "image", (".jpg", ".jpeg", ".png"))}
    labels = {p.relative_to(root / "binary").with_suffix("").as_posix(): p for p in list_files(root / "binary", (".png",))}
    unknown = sorted({i.split("/")[0] for i in images} - set(ids))
    if unknown:
        raise DatasetError(f"{root / 'image'}: folder(s) {unknown[:5]} are not CoCA categories")

    def read(path: Path, item: LabeledItem) -> np.ndarray:
        mask = read_label_map(path)
        return np.where(mask > 127, ids[item.id.split("/")[0]], 0).astype(np.uint8)

    return LabeledSet("coca", root, names, _pair(images, labels, "CoCA"), read, binary=True)


def _open_cityscapes(root: Path, split: str) -> LabeledSet:
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    _require(img_dir, gt_dir)
    images = {p.relative_to(img_dir).as_posix()[:-len("_leftImg8bit.png")]: p
              for p in list_files(img_dir, ("_leftimg8bit.png",))}
    labels = {p.relative_to(gt_dir).as_posix()[:-len("_gtFine_labelIds.png")]: p
              for p in list_files(gt_dir, ("_gtfine_labelids.png",))}
    lut = np.zeros(256, dtype=np.uint8)
    for label_id, object_id in CITYSCAPES_LABEL_ID_TO_OBJECT.items():
        lut[label_id] = object_id

    def read(path: Path, item: LabeledItem) -> np.ndarray:
        return lut[read_label_map(path)]

    return LabeledSet("cityscapes-object", root, get_category_set("cityscapes-object").names,
                      _pair(images, labels, f"Cityscapes {split}"), read)


IMAGENET_S_IGNORE = 1000


def _read_imagenet_s(path: Path, item=None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
    except OSError as exc:
        raise LabelMapError(f"{path}: cannot read ImageNet-S label ({exc})") from exc
    return rgb[..., 0] + 256 * rgb[..., 1]


def _open_imagenet_s(root: Path, split: str) -> LabeledSet:
    img_name, seg_name = {"val": ("validation", "validation-segmentation"),
                          "validation": ("validation", "validation-segmentation"),
                          "train-semi": ("train-semi", "train-semi-segmentation")}.get(split, (None, None))
    if img_name is None:
        raise InputError(f"imagenet-s split must be 'val' or 'train-semi', got {split!r}")
    img_dir, seg_dir = root / img_name, root / seg_name
    _require(img_dir, seg_dir)
    wnids = sorted(d.name for d in seg_dir.iterdir() if d.is_dir() and _WNID.match(d.name))
    images = {p.relative_to(img_dir).with_suffix("").as_posix(): p for p in list_files(img_dir, (".jpeg", ".jpg"))}
    labels = {p.relative_to(seg_dir).with_suffix("").as_posix(): p for p in list_files(seg_dir, (".png",))}
    images = {k: v for k, v in images.items() if k in labels}  # the image folder may be all of ImageNet val
    return LabeledSet(f"imagenet-s{len(wnids)}", root, ("background",) + tuple(wnids),
                      [LabeledItem(k, images[k], labels[k]) for k in sorted(images)], _read_imagenet_s,
                      ignore_index=IMAGENET_S_IGNORE)


def _first_dir(what: str, *candidates: Path) -> Path:
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise DatasetError(f"{what}: no folder {' or '.join(str(c) for c in candidates)}")


def _read_id_names(path: Path) -> dict:
    """{id: name} of an "id: name" file (cocostuff's and PASCAL-Context's labels.txt)."""
    out = {}
    for n, line in enumerate(io.read_user_text(path, DatasetError).splitlines(), 1):
        if not line.strip():
            continue
        key, sep, name = line.partition(":")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise DatasetError(f"{path}:{n}: expected 'id: name', got {line!r}")
        out[int(key)] = name.strip()
    return out


def _open_coco_stuff(root: Path, split: str) -> LabeledSet:
    images_dir = _first_dir("COCO-Stuff images", root / "images" / f"{split}2017", root / f"{split}2017")
    labels_dir = _first_dir("COCO-Stuff stuffthingmaps", root / "stuffthingmaps_trainval2017" / f"{split}2017",
                            root / "annotations" / f"{split}2017", root / "stuffthingmaps" / f"{split}2017")
    names = list(COCO_STUFF)
    for txt in (root / "labels.txt", labels_dir.parent / "labels.txt"):
        if txt.is_file():
            given = _read_id_names(txt)
            if sorted(given) != list(range(len(COCO_STUFF))):
                raise DatasetError(f"{txt}: expected ids 0..{len(COCO_STUFF) - 1} (cocostuff's labels.txt)")
            names = [given[i] for i in range(len(COCO_STUFF))]
            break
    images = {p.stem: p for p in list_files(images_dir, (".jpg", ".jpeg", ".png"))}
    labels = {p.stem: p for p in list_files(labels_dir, (".png",)) if not p.stem.endswith("_labelTrainIds")}
    lut = np.full(256, 255, dtype=np.uint8)
    lut[:len(COCO_STUFF) - 1] = np.arange(1, len(COCO_STUFF))   # id - 1 -> id; 255 stays ignored

    def read(path: Path, item: LabeledItem) -> np.ndarray:
        return lut[read_label_map(path)]

    return LabeledSet("coco-stuff", root, tuple(names), _pair(images, labels, f"COCO-Stuff {split}"), read,
                      background=None)


def _context_root(root: Path) -> Path:
    for cand in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(f"{root}: no PASCAL-Context images (looked for JPEGImages/ in {root}, {root / 'VOC2010'} and "
                       f"{root / 'VOCdevkit' / 'VOC2010'})")


def _read_mat_labels(path: Path) -> np.ndarray:
    """The LabelMap of a PASCAL-Context .mat file (the 459 ids)."""
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(str(path))["LabelMap"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabelMapError(f"{path}: cannot read a PASCAL-Context LabelMap ({exc})") from exc


def _context_items(root: Path, voc: Path, split: str, labels_dir: Path, suffix: str, what: str) -> list:
    split_files = [voc / "ImageSets" / "SegmentationContext" / f"{split}.txt"]
    if suffix == ".mat":
        split_files.append(voc / "ImageSets" / "Main" / f"{split}.txt")
    split_file = next((f for f in split_files if f.is_file()), None)
    if split_file is None:
        raise DatasetError(f"{what}: no split file {' or '.join(map(str, split_files))}")
    ids = [line.split()[0] for line in io.read_user_text(split_file, DatasetError).splitlines() if line.strip()]
    items = [LabeledItem(i, voc / "JPEGImages" / f"{i}.jpg", labels_dir / f"{i}{suffix}") for i in ids]
    _check_items_exist(items, f"{what} ({split_file})")
    return items


def _context_mat_dir(root: Path, voc: Path) -> Path | None:
    for cand in (root / "trainval", root / "segment_anno", voc / "trainval"):
        if cand.is_dir():
            return cand
    return None


def _open_pascal_context_59(root: Path, split: str) -> LabeledSet:
    voc = _context_root(root)
    png_dir, mat_dir = voc / "SegmentationClassContext", _context_mat_dir(root, voc)
    if png_dir.is_dir():
        items = _context_items(root, voc, split, png_dir, ".png", f"PASCAL-Context 59 {split}")
        return LabeledSet("pascal-context-59", voc, PASCAL_CONTEXT_59, items, _read_index_png, background=None)
    if mat_dir is None:
        raise DatasetError(f"{voc}: no PASCAL-Context labels: neither {png_dir} (mmseg's 59-class PNGs) nor "
                           f"{root / 'trainval'} (the original release's .mat files)")
    lut = np.zeros(460, dtype=np.uint8)
    lut[list(PASCAL_CONTEXT_59_SOURCE_IDS)] = np.arange(len(PASCAL_CONTEXT_59_SOURCE_IDS))

    def read(path: Path, item: LabeledItem) -> np.ndarray:
        ids = _read_mat_labels(path)
        if ids.size and (ids.min() < 0 or ids.max() >= len(lut)):
            raise LabelMapError(f"{path}: LabelMap ids outside 0..459")
        return lut[ids]

    items = _context_items(root, voc, split, mat_dir, ".mat", f"PASCAL-Context 59 {split}")
    return LabeledSet("pascal-context-59", voc, PASCAL_CONTEXT_59, items, read, background=None)


def _open_pascal_context_459(root: Path, split: str) -> LabeledSet:
    voc = _context_root(root)
    mat_dir = _context_mat_dir(root, voc)
    labels_txt = next((p for p in (root / "labels.txt", voc / "labels.txt") if p.is_file()), None)
    if mat_dir is None or labels_txt is None:
        missing = [str(root / "trainval")] * (mat_dir is None) + [str(root / "labels.txt")] * (labels_txt is None)
        raise DatasetError(f"PASCAL-Context 459 needs the original release: missing {', '.join(missing)}")
    given = _read_id_names(labels_txt)
    if not given or min(given) < 1 or max(given) > 65535:
        raise DatasetError(f"{labels_txt}: expected ids 1..459 ('id: name' lines)")
    names = ["unlabeled"] + [given.get(i, f"unused {i}") for i in range(1, max(given) + 1)]
    lut = np.arange(len(names), dtype=np.int64)
    for i, n in enumerate(names):
        if n == "unknown":     # the official evaluation's unlabelled class: neither scored nor ignored
            lut[i] = 0

    def read(path: Path, item: LabeledItem) -> np.ndarray:
        ids = _read_mat_labels(path)
        if ids.size and (ids.min() < 0 or ids.max() >= len(lut)):
            raise LabelMapError(f"{path}: LabelMap ids outside 0..{len(lut) - 1} ({labels_txt})")
        return lut[ids].astype(np.int32)

    items = _context_items(root, voc, split, mat_dir, ".mat", f"PASCAL-Context 459 {split}")
    return LabeledSet("pascal-context-459", voc, tuple(names), items, read, ignore_index=65535, background=None)


class FolderLabeledSet(LabeledSet):
    """<root>/images/*.{jpg,png,...} + <root>/labels/<same stem>.png: a plain folder pair
    (the demo's evaluation set, or any user folder). Class names: the model's."""

    def __init__(self, root: str | Path, class_names: list | None = None):
        root = Path(root)
        images_dir, labels_dir = root / "images", root / "labels"
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: not a directory (a folder set needs images/ and labels/)")
        labels = index_label_maps(labels_dir) if labels_dir.is_dir() else {}
        items = [LabeledItem(p.relative_to(images_dir).with_suffix("").as_posix(), p,
                             labels.get(p.relative_to(images_dir).with_suffix("").as_posix()))
                 for p in sorted(images_dir.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        super().__init__("folder", root, list(class_names) if class_names else None, items, _read_index_png)


_OPENERS = {"voc": _open_voc, "coco-object": _open_coco_object, "coca": _open_coca,
            "cityscapes-object": _open_cityscapes, "imagenet-s": _open_imagenet_s, "coco-stuff": _open_coco_stuff,
            "pascal-context-59": _open_pascal_context_59, "pascal-context-459": _open_pascal_context_459,
            "folder": lambda root, split: FolderLabeledSet(root)}


def open_dataset(name: str, root: str | Path, split: str = "val") -> LabeledSet:
    """A labelled evaluation set (layouts in the module docstring). Raises DatasetError
    naming what is missing; `namedmask prepare check` prints a full inventory."""
    key = name.lower()
    if re.fullmatch(r"imagenet-s\d+", key):
        key = "imagenet-s"
    if key not in _OPENERS:
        raise InputError(f"unknown dataset {name!r}; one of {list(DATASETS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a folder")
    ds = _OPENERS[key](root, split)
    if not len(ds):
        raise DatasetError(f"{root}: no {name} {split} images found")
    return ds


# ---------------------------------------------------------------------------------------------
# Dataset check (what users most often get wrong: the folder layout)

def _expected_layout(name: str, root: Path, split: str) -> list:
    """(path, what it should hold) the reader needs, for `check_dataset`. A "(for prepare)"
    entry is needed only while the derived files are not built."""
    if name == "voc":
        try:
            voc = _voc_root(root)
        except DatasetError:
            voc = root / "VOCdevkit" / "VOC2012"
        return [(voc / "JPEGImages", "*.jpg photos"), (voc / "SegmentationClass", "*.png palette label maps"),
                (voc / "ImageSets" / "Segmentation" / f"{split}.txt", "image ids of the split, one per line")]
    if name == "coco-object":
        p = coco_paths(root, split)
        return [(p["images"], "*.jpg photos"), (p["instances"], "COCO instances json (for prepare)"),
                (p["masks"], "label PNGs built by `namedmask prepare coco-object`")]
    if name == "coca":
        return [(root / "image", "<category>/*.jpg"), (root / "binary", "<category>/*.png 0/255 masks")]
    if name == "cityscapes-object":
        return [(root / "leftImg8bit" / split, "<city>/*_leftImg8bit.png"),
                (root / "gtFine" / split, "<city>/*_gtFine_labelIds.png")]
    if name == "folder":
        return [(root / "images", "images (*.jpg, *.png, ...)"), (root / "labels", "<image stem>.png index label maps")]
    if name == "coco-stuff":
        images = next((p for p in (root / "images" / f"{split}2017", root / f"{split}2017") if p.is_dir()),
                      root / "images" / f"{split}2017")
        maps = next((p for p in (root / "annotations" / f"{split}2017", root / "stuffthingmaps" / f"{split}2017")
                     if p.is_dir()), root / "stuffthingmaps_trainval2017" / f"{split}2017")
        return [(images, "*.jpg photos"), (maps, "stuffthingmaps *.png (cocostuff id - 1, 255 unlabelled)")]
    if name.startswith("pascal-context"):
        try:
            voc = _context_root(root)
        except DatasetError:
            voc = root / "VOCdevkit" / "VOC2010"
        mat = _context_mat_dir(root, voc) or root / "trainval"
        if name == "pascal-context-59" and (voc / "SegmentationClassContext").is_dir():
            return [(voc / "JPEGImages", "*.jpg photos"), (voc / "SegmentationClassContext", "*.png, ids 0..59"),
                    (voc / "ImageSets" / "SegmentationContext" / f"{split}.txt", "image ids of the split")]
        split_file = next((p for p in (voc / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                                       voc / "ImageSets" / "Main" / f"{split}.txt") if p.is_file()),
                          voc / "ImageSets" / "SegmentationContext" / f"{split}.txt")
        out = [(voc / "JPEGImages", "*.jpg photos"), (mat, "<id>.mat with LabelMap (the 459 ids)"),
               (split_file, "image ids of the split")]
        if name == "pascal-context-459":
            out.append((root / "labels.txt", "'id: name' lines of the 459 classes"))
        return out
    folders = ("train-semi", "train-semi-segmentation") if split == "train-semi" else \
        ("validation", "validation-segmentation")
    return [(root / folders[0], "<wnid>/*.JPEG"), (root / folders[1], "<wnid>/*.png (id = R + 256*G)")]


@dataclass
class CheckReport:
    dataset: str
    root: Path
    split: str
    found: list = field(default_factory=list)    # lines
    missing: list = field(default_factory=list)  # lines
    items: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and self.items > 0

    def text(self) -> str:
        lines = [f"{self.dataset} ({self.split}) at {self.root}"]
        lines += [f"  found    {s}" for s in self.found]
        lines += [f"  MISSING  {s}" for s in self.missing]
        lines.append(f"  => {self.items} labelled images ready" if self.ok else "  => not usable yet")
        return "\n".join(lines)


def _unreadable(files: list, shown: int = 10) -> list:
    """Lines for image files whose header does not decode (0 bytes, text named .png, ...):
    a dataset is not 'ready' because its file names look right."""
    bad = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.size  # the header is parsed on open; the pixels are not read
        except (OSError, SyntaxError, ValueError) as exc:
            bad.append(f"{f}  (unreadable: {' '.join(str(exc).split())[:120]})")
    if len(bad) > shown:
        bad = bad[:shown] + [f"... and {len(bad) - shown} more unreadable files"]
    return bad


def check_dataset(name: str, root: str | Path, split: str = "val") -> CheckReport:
    """What of a dataset's expected layout is present under `root`, and what is missing."""
    key = "imagenet-s" if re.fullmatch(r"imagenet-s\d*", name.lower()) else name.lower()
    if key not in _OPENERS:
        raise InputError(f"unknown dataset {name!r}; one of {list(DATASETS)}")
    root = Path(root).expanduser()
    report = CheckReport(key, root, split)
    layout = _expected_layout(key, root, split)
    built = all(p.exists() for p, what in layout if "(for prepare)" not in what)
    for path, what in layout:
        if path.is_dir():
            files = list_files(path, IMAGE_SUFFIXES)
            report.found.append(f"{path}/  ({len(files)} image files; expected {what})")
            report.missing += _unreadable(files)
        elif path.is_file():
            report.found.append(f"{path}  ({path.stat().st_size:,} bytes)")
        elif built and "(for prepare)" in what:
            report.found.append(f"{path}  not here (not needed: its output is built)")
        else:
            report.missing.append(f"{path}  ({what})")
    try:
        report.items = len(open_dataset(key, root, split))
    except (DatasetError, ValueError, OSError) as exc:
        if not report.missing:  # the layout is there but its content is not right
            report.missing.append(str(exc))
    return report


# ---------------------------------------------------------------------------------------------
# Unlabelled image pools

class ImagePool(list):
    """Sorted image paths relative to `root` (a list of str); `absolute(i)` joins them."""

    def __init__(self, root: Path, paths):
        super().__init__(paths)
        self.root = Path(root)

    def absolute(self, index: int) -> Path:
        return self.root / self[index]

    def absolute_paths(self) -> list:
        return [self.root / p for p in self]


def list_pool_images(path: str | Path, exclude: str | os.PathLike | None = None) -> ImagePool:
    """The images of an unlabelled pool: a folder tree (every image below it but those inside
    `exclude`, the output folder), a text file listing one image path per line (relative to the
    file's folder, '#' comments), or an ImageNet root (only train/<wnid>/*.JPEG, as
    'train/<wnid>/<file>'). Sorted, relative."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise DatasetError(f"{path}: an image, not a pool; give the folder of images or a list file")
        root = path.parent
        rel = []
        for lineno, line in enumerate(io.read_user_text(path, DatasetError).splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            if p.is_absolute():
                try:
                    p = p.relative_to(root)
                except ValueError:
                    raise DatasetError(f"{path}:{lineno}: {line} is not inside {root}, the list file's folder; "
                                       f"list paths relative to it") from None
            normal = Path(os.path.normpath(p))
            if normal.parts[:1] == ("..",) or normal == Path("."):
                # outputs are named after these paths (masks/<path>.png): an escape here
                # would write outside the stage's folder, over the user's files
                raise DatasetError(f"{path}:{lineno}: {line} leads outside {root}, the list file's folder; "
                                   f"list only images below it")
            rel.append(normal.as_posix())
        if not rel:
            raise DatasetError(f"{path}: the list file names no images")
        unique = sorted(set(rel))
        if len(unique) < len(rel):
            log.warning("%s: %d duplicate line(s) ignored", path, len(rel) - len(unique))
        return ImagePool(root, unique)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder or a list file of images")
    train = path / "train"
    if train.is_dir() and any(_WNID.match(d.name) for d in os.scandir(train) if d.is_dir()):
        files = list_files(train, IMAGE_SUFFIXES, exclude)
    else:
        files = list_files(path, IMAGE_SUFFIXES, exclude)
    if not files:
        raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return ImagePool(path, sorted(p.relative_to(path).as_posix() for p in files))
