"""Vocabularies for naming segments with no class list (`namedmask discover`).

"builtin": the union, in this order, de-duplicated case-insensitively, of
- the 1000 ImageNet-1k class names as open_clip ships them (open_clip.IMAGENET_CLASSNAMES,
  the cleaned names of the CLIP paper's zero-shot notebook),
- the 80 COCO things, the Cityscapes objects, the 80 CoCA categories (namedmask.data.categories)
  and VOC's prompt names,
- COCO-Stuff's stuff names (Caesar et al. 2018), written out below, so regions that are not
  objects (sky, grass, road, wall) have a word too,
- common nouns from the WordNet synsets of ImageNet-21k, read offline from the files timm ships
  (timm/data/_info/: imagenet12k_synsets.txt, imagenet_synset_to_lemma.txt; see
  `imagenet21k_nouns` for the filter); each keeps its synset's other lemmas as synonyms.
About 6,200 entries. A file: one entry a line, `name | synonym, synonym` (synonyms optional;
blank lines and '#' comments ignored); an entry is embedded with all its words."""
from __future__ import annotations

import functools
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

from namedmask.data.categories import BUILTIN, VOC_PROMPT_NAMES, read_name_lines, wordnet_lemmas
from namedmask.errors import BadInputError

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


class VocabularyError(BadInputError):
    """A vocabulary file that is missing, empty or malformed."""


@dataclass(frozen=True)
class Vocabulary:
    source: str
    names: tuple                 # the display name of each entry
    words: tuple                 # per entry, every word it is embedded with (name first)

    def __len__(self) -> int:
        return len(self.names)


_LEMMA = re.compile(r"[a-z]+( [a-z]+)?")  # one or two lowercase words: no proper nouns, taxa, digits


def imagenet21k_nouns() -> tuple:
    """Entries (name, synonym, ...) of common nouns, from the WordNet lemmas of ImageNet-21k.

    Source: timm's copies of the ImageNet synset lists (timm/data/_info/, offline, public).
    Filter, per synset of timm's ImageNet-12k list (11,821 of the 21,843 ImageNet-21k synsets,
    in that file's order):
    - a lemma is kept when it is one or two lowercase ASCII words (drops proper nouns, Latin
      taxa, hyphenated and numbered names) and every word is a single token of CLIP's BPE
      vocabulary (open_clip's tokenizer): a word frequent enough in web text to have been merged
      into one token, the offline stand-in for "common";
    - the first lemma names the entry when it is kept (else the synset is dropped), the other
      kept lemmas are its synonyms;
    - a name already taken (case-insensitive, by an earlier synset) drops the later synset
      (e.g. the second "mouse")."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer().encoder

    def common(lemma):
        return _LEMMA.fullmatch(lemma) is not None and all(w + "</w>" in bpe for w in lemma.split())

    def info(name):
        return pkgutil.get_data("timm.data", f"_info/{name}").decode("utf-8")

    lemmas = wordnet_lemmas()
    seen, out = set(), []
    for synset in info("imagenet12k_synsets.txt").split():
        words = list(lemmas[synset])
        if not common(words[0]) or words[0] in seen:
            continue
        seen.add(words[0])
        out.append((words[0], *dict.fromkeys(w for w in words[1:] if common(w) and w != words[0])))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def builtin_entries() -> tuple:
    """The builtin vocabulary: entries (name, synonym, ...), names unique case-insensitively; a
    synonym that is another entry's name is dropped (two entries embedding one word would tie)."""
    import open_clip

    seen, out = set(), []
    sources = (open_clip.IMAGENET_CLASSNAMES, BUILTIN["coco-object"][1:], BUILTIN["cityscapes-object"][1:],
               BUILTIN["coca"][1:], tuple(VOC_PROMPT_NAMES.values()), COCO_STUFF)
    for entry in [(n,) for names in sources for n in names] + list(imagenet21k_nouns()):
        if entry[0].lower() not in seen:
            seen.add(entry[0].lower())
            out.append(entry)
    return tuple((e[0], *(w for w in e[1:] if w.lower() not in seen)) for e in out)


def builtin_names() -> tuple:
    return tuple(e[0] for e in builtin_entries())


def load_vocabulary(name_or_path: str = "builtin", option: str = "--vocabulary") -> Vocabulary:
    """The builtin vocabulary or a names file; errors name the file or the command's `option`."""
    if name_or_path == "builtin":
        entries = builtin_entries()
        return Vocabulary("builtin", tuple(e[0] for e in entries), entries)
    path = Path(name_or_path)
    if not path.is_file():
        raise VocabularyError(f"{option} {name_or_path}: not 'builtin' and not a file "
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
