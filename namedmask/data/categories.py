"""Category sets: class names with explicit ids (0 = background).

Built in: `voc` (20 + background, official order), `coco-object` (80 COCO things in COCO
category order, contiguous ids 1..80; COCO_ID_TO_CONTIGUOUS maps COCO's category ids 1..90),
`cityscapes-object` (the 14 human/vehicle/object classes NamedMask evaluates, ids 1..14 in
Cityscapes label-id order; CITYSCAPES_LABEL_ID_TO_OBJECT maps gtFine labelIds), `coca` (its 80
categories as named by the dataset's folders, sorted, ids 1..80 as in the official code).

Display names (`names`: the dataset's own spellings, used in tables, archives and model files)
and prompt names (`prompt_names`: the words sent to CLIP) are kept apart: VOC's file-system
spellings "diningtable", "pottedplant", "tvmonitor" are prompted as the official NamedMask
strings "dining table", "potted plant", "tv/monitor". The other built-in sets are prompted with
their display names, as in the official configs."""
from __future__ import annotations

import csv
import functools
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path

from namedmask.errors import InputError
from namedmask.io import read_user_text

VOC = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
# The official NamedMask prompt strings where they differ from the display names
# (configs/voc_val_n500_cp2_ex.yaml, datasets/voc2012.py of NoelShin/namedmask).
VOC_PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv/monitor"}


@dataclass(frozen=True)
class CategorySet:
    name: str
    names: tuple            # names[i] is the class with id i; names[0] = "background"
    synonyms: dict = field(default_factory=dict)  # class name -> tuple of alternative names (also prompted)
    prompts: dict = field(default_factory=dict)   # class name -> the word sent to CLIP, where it differs

    def prompt_name(self, name: str) -> str:
        """The word CLIP is prompted with for class `name` (its display name unless set)."""
        return self.prompts.get(name, name)

    def prompt_words(self, name: str) -> tuple:
        """Every word a class is embedded with: its prompt name, then its synonyms."""
        return (self.prompt_name(name), *self.synonyms.get(name, ()))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def ids(self) -> dict:
        return {n: i for i, n in enumerate(self.names)}


# (COCO category id, name) of the 80 thing classes, in COCO's category order.
COCO_THINGS = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"),
    (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"),
    (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"),
    (90, "toothbrush"),
)
COCO_OBJECT = ("background",) + tuple(name for _, name in COCO_THINGS)
COCO_ID_TO_CONTIGUOUS = {coco_id: i for i, (coco_id, _) in enumerate(COCO_THINGS, start=1)}

# gtFine labelId -> object id (1..14); every other labelId is background (0), as in the
# official NamedMask evaluation (the human, vehicle and object groups of Cityscapes).
CITYSCAPES_OBJECTS = (
    (17, "pole"), (18, "polegroup"), (19, "traffic light"), (20, "traffic sign"), (24, "person"), (25, "rider"),
    (26, "car"), (27, "truck"), (28, "bus"), (29, "caravan"), (30, "trailer"), (31, "train"), (32, "motorcycle"),
    (33, "bicycle"),
)
CITYSCAPES_OBJECT = ("background",) + tuple(name for _, name in CITYSCAPES_OBJECTS)
CITYSCAPES_LABEL_ID_TO_OBJECT = {label_id: i for i, (label_id, _) in enumerate(CITYSCAPES_OBJECTS, start=1)}

# CoCA's 80 categories, spelled as its image/<category>/ folders, sorted as in the official code.
COCA = ("background",
        "Accordion", "UAV", "Yellow duck", "alarm clock", "avocado", "backpack", "baseball", "beer bottle", "belt",
        "binoculars", "boots", "butterfly", "calculator", "camel", "camera", "candle", "chopsticks", "clover", "dice",
        "dolphin", "doughnut", "dumbbell", "eggplant", "faucet", "fishing rod", "frisbee", "gift box", "glasses",
        "globe", "glove", "guitar", "hammer", "hammock", "handbag", "harp", "hat", "headphone", "helicopter",
        "high heels", "hourglass", "ice cream", "key", "lollipop", "macaroon", "microphone", "minions", "moon",
        "persimmon", "pigeon", "pillow", "pine cone", "pineapple", "pocket watch", "poker", "potato", "pumpkin",
        "rabbit", "rocking horse", "roller-skating", "rolling pin", "soap bubble", "squirrel", "stethoscope",
        "sticky note", "stool", "strawberry", "sunflower", "tablet", "teddy bear", "thermometer", "tomato", "towel",
        "toy car", "typewriter", "violin", "waffles", "watering can", "watermelon", "wheelchair", "whisk")

# COCO-Stuff-164k: the names of cocostuff's labels.txt by id (index = id; 0 "unlabeled"): COCO's 80
# things with COCO's ids (the 11 ids COCO left unused keep their names: they are never in a label
# map, yet the zero-guidance evaluation matches names against them too) and the 91 stuff classes,
# ids 92-182. A stuffthingmaps PNG holds id - 1 (0 = person) and 255 for unlabelled pixels.
_COCO_UNUSED_THINGS = {12: "street sign", 26: "hat", 29: "shoe", 30: "eye glasses", 45: "plate", 66: "mirror",
                       68: "window", 69: "desk", 71: "door", 83: "blender", 91: "hair brush"}
_COCO_STUFF_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood",
    "water-other", "waterdrops", "window-blind", "window-other", "wood")
COCO_STUFF = ("unlabeled",) + tuple({**dict(COCO_THINGS), **_COCO_UNUSED_THINGS}[i] for i in range(1, 92)) \
    + _COCO_STUFF_STUFF

# PASCAL-Context 59 (mmseg's PascalContextDataset59 / the Detail API converters): id 0 = every
# pixel of no 59-class; PASCAL_CONTEXT_59_SOURCE_IDS[i] = class i's id among the full 459 classes
# of the original release (labels.txt; LabelMap in trainval/*.mat), the converters' `_mapping`.
PASCAL_CONTEXT_59 = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood")
PASCAL_CONTEXT_59_SOURCE_IDS = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158,
    159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366,
    368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)

BUILTIN = {"voc": VOC, "coco-object": COCO_OBJECT, "cityscapes-object": CITYSCAPES_OBJECT, "coca": COCA}

# Alternative names for the open-vocabulary text head's diversification (train.text.names:
# synonyms). Kept out of the category sets themselves: NamedMask's archives prompt the name alone.
_SHARED_SYNONYMS = {
    "person": ("people", "human", "man", "woman"), "bicycle": ("bike", "cycle"), "car": ("automobile", "sedan"),
    "bus": ("coach", "autobus"), "train": ("locomotive", "railway train"), "boat": ("ship", "vessel"),
    "bird": ("songbird",), "cat": ("kitten", "kitty"), "dog": ("puppy", "hound"), "horse": ("pony", "stallion"),
    "sheep": ("lamb", "ewe"), "cow": ("cattle", "bull"), "bottle": ("flask",), "chair": ("seat",),
    "truck": ("lorry", "pickup truck"), "traffic light": ("traffic signal", "stoplight"),
    "rider": ("cyclist", "motorcyclist"), "pole": ("post", "lamppost"), "traffic sign": ("road sign", "street sign"),
    "motorcycle": ("motorbike", "scooter"), "teddy bear": ("stuffed bear", "plush bear"),
}
BUILTIN_SYNONYMS = {
    "voc": {**{k: v for k, v in _SHARED_SYNONYMS.items() if k in VOC},
            "aeroplane": ("airplane", "plane", "aircraft"), "diningtable": ("table", "dinner table"),
            "motorbike": ("motorcycle", "scooter"), "pottedplant": ("houseplant", "plant in a pot"),
            "sofa": ("couch", "settee"), "tvmonitor": ("television", "monitor", "tv")},
    "coco-object": {**{k: v for k, v in _SHARED_SYNONYMS.items() if k in COCO_OBJECT},
                    "airplane": ("aeroplane", "plane"), "couch": ("sofa", "settee"), "tv": ("television", "monitor"),
                    "cell phone": ("mobile phone", "smartphone"), "dining table": ("table",),
                    "potted plant": ("houseplant",), "sports ball": ("ball",), "donut": ("doughnut",),
                    "hair drier": ("hair dryer", "blow dryer"), "refrigerator": ("fridge",),
                    "laptop": ("notebook computer",), "mouse": ("computer mouse",), "remote": ("remote control",)},
    "cityscapes-object": {k: v for k, v in _SHARED_SYNONYMS.items() if k in CITYSCAPES_OBJECT},
    "coca": {"UAV": ("drone",), "Yellow duck": ("rubber duck",), "doughnut": ("donut",), "poker": ("playing cards",),
             "headphone": ("headphones",), "glasses": ("spectacles", "eyeglasses"), "tablet": ("tablet computer",),
             "macaroon": ("macaron",), "sticky note": ("post-it note",), "soap bubble": ("bubble",),
             "roller-skating": ("roller skates",), "binoculars": ("field glasses",), "rabbit": ("bunny",),
             "pigeon": ("dove",), "stool": ("footstool",), "alarm clock": ("clock",)},
}
BUILTIN_PROMPTS = {"voc": VOC_PROMPT_NAMES}


def get_category_set(name_or_path: str, synonyms: bool = False) -> CategorySet:
    """A built-in set by name (with `synonyms`: its BUILTIN_SYNONYMS too), or a text file: one
    class per line, synonyms after '|' separated by commas. The file lists foreground classes;
    background gets id 0."""
    if name_or_path in BUILTIN:
        return CategorySet(name_or_path, tuple(BUILTIN[name_or_path]),
                           synonyms=dict(BUILTIN_SYNONYMS.get(name_or_path, {})) if synonyms else {},
                           prompts=dict(BUILTIN_PROMPTS.get(name_or_path, {})))
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(f"unknown category set {name_or_path!r}: not one of {sorted(BUILTIN)} and not a file")
    names, synonyms, prompts = ["background"], {}, {}
    for lineno, name, alts in read_name_lines(path, "category"):
        if WNID.fullmatch(name):  # an ImageNet(-S) class: the id pairs with the dataset, CLIP gets its lemmas
            prompts[name], alts = _synset_prompt(path, lineno, name, alts)
        if name in names:
            raise InputError(f"{path}:{lineno}: duplicate category {name!r}")
        names.append(name)
        if alts:
            synonyms[name] = alts
    if len(names) == 1:
        raise InputError(f"{path}: no categories found (one name per line)")
    return CategorySet(path.stem, tuple(names), synonyms, prompts)


WNID = re.compile(r"n\d{8}")


@functools.lru_cache(maxsize=1)
def wordnet_lemmas() -> dict:
    """{WordNet id: (lemma, ...)} for the ImageNet-21k synsets, read offline from the file timm
    ships (timm/data/_info/imagenet_synset_to_lemma.txt): the public names of ImageNet's and
    ImageNet-S's classes, the first being the usual class name."""
    text = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode("utf-8")
    return {wnid: tuple(w.strip() for w in lemmas.split(",") if w.strip())
            for wnid, lemmas in csv.reader(text.splitlines(), delimiter="\t")}


def synset_words(name: str) -> tuple:
    """A class's words when it is a WordNet id (its lemmas, the id itself first), else ()."""
    return (name, *wordnet_lemmas().get(name, ())) if WNID.fullmatch(name) else ()


def _synset_prompt(path: Path, lineno: int, wnid: str, alts: tuple) -> tuple:
    """(prompt name, synonyms) of a category line that is a WordNet id: its first lemma, then its
    other lemmas and the line's own synonyms (text diversification, class pairing)."""
    lemmas = wordnet_lemmas().get(wnid)
    if not lemmas:
        raise InputError(f"{path}:{lineno}: {wnid} is not an ImageNet-21k WordNet id; write its name instead")
    return lemmas[0], tuple(dict.fromkeys(w for w in (*lemmas[1:], *alts) if w != lemmas[0]))


def read_name_lines(path: Path, what: str, error: type = InputError) -> list:
    """(line number, name, synonyms) of each entry of a 'name | synonym, ...' file (blank
    lines and '#' comments skipped); an entry without a name is an `error` naming the line."""
    entries = []
    for lineno, line in enumerate(read_user_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, alts = line.partition("|")
        name = name.strip()
        if not name:
            raise error(f"{path}:{lineno}: empty {what} name before '|' in {line!r}; write 'name | synonym, ...'")
        entries.append((lineno, name, tuple(a.strip() for a in alts.split(",") if a.strip())))
    return entries


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
