"""Vocabularies for naming segments with no class list (`namedmask discover`).

"builtin": the union, in this order, de-duplicated case-insensitively, of
- the 1000 ImageNet-1k class names as open_clip ships them (open_clip.IMAGENET_CLASSNAMES,
  the cleaned names of the CLIP paper's zero-shot notebook),
- the 80 COCO things, the Cityscapes objects, the 80 CoCA categories (namedmask.data.categories)
  and VOC's prompt names,
- COCO-Stuff's stuff names (Caesar et al. 2018), written out below, so regions that are not
  objects (sky, grass, road, wall) have a word too.
About 1,150 names. A file: one entry a line, `name | synonym, synonym` (synonyms optional;
blank lines and '#' comments ignored); an entry is embedded with all its words."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from namedmask.data.categories import BUILTIN, VOC_PROMPT_NAMES, read_name_lines
from namedmask.errors import NamedMaskError

COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling", "tile ceiling", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk", "dirt",
    "door", "fence", "marble floor", "floor", "stone floor", "tile floor", "wood floor", "flower", "fog",
    "food", "fruit", "furniture", "grass", "gravel", "ground", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky", "skyscraper", "snow", "solid", "stairs", "stone", "straw",
    "structural", "table", "tent", "textile", "towel", "tree", "vegetable", "brick wall", "concrete wall",
    "wall", "panel wall", "stone wall", "tile wall", "wood wall", "water", "waterdrops", "window blind",
    "window", "wood",
)


class VocabularyError(NamedMaskError, ValueError):
    """A vocabulary file that is missing, empty or malformed."""


@dataclass(frozen=True)
class Vocabulary:
    source: str
    names: tuple                 # the display name of each entry
    words: tuple                 # per entry, every word it is embedded with (name first)

    def __len__(self) -> int:
        return len(self.names)


def builtin_names() -> tuple:
    import open_clip

    seen, out = set(), []
    sources = (open_clip.IMAGENET_CLASSNAMES, BUILTIN["coco-object"][1:], BUILTIN["cityscapes-object"][1:],
               BUILTIN["coca"][1:], tuple(VOC_PROMPT_NAMES.values()), COCO_STUFF)
    for names in sources:
        for n in names:
            if n.lower() not in seen:
                seen.add(n.lower())
                out.append(n)
    return tuple(out)


def load_vocabulary(name_or_path: str = "builtin") -> Vocabulary:
    if name_or_path == "builtin":
        names = builtin_names()
        return Vocabulary("builtin", names, tuple((n,) for n in names))
    path = Path(name_or_path)
    if not path.is_file():
        raise VocabularyError(f"--vocabulary {name_or_path}: not 'builtin' and not a file "
                              f"(one name a line, synonyms after '|')")
    names, words, seen = [], [], set()
    for lineno, name, alts in read_name_lines(path, "vocabulary", VocabularyError):
        if name.lower() in seen:
            raise VocabularyError(f"{path}:{lineno}: {name!r} is listed twice")
        seen.add(name.lower())
        names.append(name)
        words.append((name, *alts))
    if not names:
        raise VocabularyError(f"{path}: no names found (one name a line, synonyms after '|')")
    return Vocabulary(str(path), tuple(names), tuple(words))
