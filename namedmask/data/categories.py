"""Category sets: class names with explicit ids (0 = background)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

VOC = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


@dataclass(frozen=True)
class CategorySet:
    name: str
    names: tuple            # names[i] is the class with id i; names[0] = "background"
    synonyms: dict = field(default_factory=dict)  # class name -> tuple of alternative names

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def ids(self) -> dict:
        return {n: i for i, n in enumerate(self.names)}


BUILTIN = {"voc": VOC}


def get_category_set(name_or_path: str) -> CategorySet:
    """A built-in set by name, or a text file: one class per line, synonyms after '|'
    separated by commas. The file lists foreground classes; background gets id 0."""
    if name_or_path in BUILTIN:
        return CategorySet(name_or_path, tuple(BUILTIN[name_or_path]))
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown category set {name_or_path!r}: not one of {sorted(BUILTIN)} and not a file")
    names, synonyms = ["background"], {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, alts = line.partition("|")
        name = name.strip()
        if name in names:
            raise ValueError(f"{path}:{lineno}: duplicate category {name!r}")
        names.append(name)
        alts = tuple(a.strip() for a in alts.split(",") if a.strip())
        if alts:
            synonyms[name] = alts
    if len(names) == 1:
        raise ValueError(f"{path}: no categories found (one name per line)")
    return CategorySet(path.stem, tuple(names), synonyms)


def voc_palette() -> list:
    """The PASCAL VOC colour map (256 entries, flattened RGB)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette
