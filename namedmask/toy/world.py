"""The toy world: generated captioned scenes in which NamedMask's quality can be measured
without real foundation-model weights (tiny CLIP and DINO are trained on it, see namedmask/toy).

Ten categories, each a name plus synonyms, a shape, a hue and a texture; every object varies
in hue, saturation, size, aspect, rotation and texture phase. Backgrounds are smooth two-colour
gradients with faint low-frequency shading and fine noise: a feasibility probe found that
multicolour noise backgrounds defeat every tiny saliency model, while on smooth ones objects
stand out as they do in object-centric photos. Multi-object scenes may overlap (later objects
occlude earlier ones; the label keeps what is visible).

Splits written by `write_world(root, seed)` (all 96x96 JPEGs; labels are index PNGs with ids
1..8 = the NamedMask categories in NAMED order, 0 = background):

    pretrain/images/*.jpg + pretrain/captions.tsv   1-3 objects, captions name every object with a
                                                    random synonym (all ten categories)
    pool/*.jpg                                      unlabelled retrieval pool: mostly one object,
                                                    some 2-3, some none (all ten categories)
    pool_labels/*.png                               its masks (ids 1..10 = ALL order); used only to
                                                    score retrieval and saliency, never to train
    eval/{single,multi,all}/{images,labels}/         held-out sets of NAMED categories (folder layout)
    categories.txt                                  the 8 NamedMask categories with synonyms
    world.json                                      seed, sizes, categories (what generated it)

The last two categories (HELD_OUT) appear in captions and pool but not in categories.txt: the
tiny CLIP knows them, NamedMask does not (for open-vocabulary work). Everything is a function of
the seed: split s uses the generator seeded with (seed, s)."""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from namedmask import io
from namedmask.data.categories import voc_palette
from namedmask.errors import InputError

SIZE = 96


@dataclass(frozen=True)
class ToyCategory:
    name: str
    synonyms: tuple
    shape: str
    hue: float          # degrees
    texture: str


CATEGORIES = (
    ToyCategory("ball", ("sphere", "orb"), "disc", 0, "shaded"),
    ToyCategory("box", ("cube", "crate"), "square", 220, "checker"),
    ToyCategory("pyramid", ("triangle", "wedge"), "triangle", 52, "hstripes"),
    ToyCategory("star", ("starfish", "asterisk"), "star", 28, "dots"),
    ToyCategory("ring", ("donut", "hoop"), "ring", 280, "plain"),
    ToyCategory("cross", ("plus", "crucifix"), "cross", 120, "dstripes"),
    ToyCategory("heart", ("valentine", "love"), "heart", 330, "shaded"),
    ToyCategory("moon", ("crescent", "lune"), "crescent", 185, "speckle"),
    ToyCategory("kite", ("diamond", "rhombus"), "rhombus", 95, "checker"),
    ToyCategory("arrow", ("pointer", "chevron"), "arrow", 250, "vstripes"),
)
HELD_OUT = ("kite", "arrow")
NAMED = tuple(c for c in CATEGORIES if c.name not in HELD_OUT)

# Split sizes of the full world and of the reduced one the CI test builds.
SIZES = {"full": {"pretrain": 4000, "pool": 800, "single": 96, "multi": 96},
         "ci": {"pretrain": 1200, "pool": 240, "single": 24, "multi": 24}}
_SPLIT_SEED = {"pretrain": 1, "pool": 2, "single": 3, "multi": 4}
CAPTION_JOIN = ("{} and a {}", "{}, a {} and a {}")


def names_of(cat: ToyCategory) -> tuple:
    return (cat.name,) + cat.synonyms


# ---------------------------------------------------------------- rendering

def _background(rng: np.random.Generator) -> np.ndarray:
    """Smooth gradient between two muted colours + faint low-frequency shading + fine noise."""
    c = [np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.9))) * 255
         for _ in range(2)]
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    t = np.clip((xx * math.cos(a) + yy * math.sin(a)) + 0.5, 0, 1)[..., None]
    img = c[0] * (1 - t) + c[1] * t
    coarse = rng.normal(0, 10, (3, 3)).astype(np.float32)
    img += np.asarray(Image.fromarray(coarse, "F").resize((SIZE, SIZE), Image.BICUBIC))[..., None]
    return img + rng.normal(0, 3, (SIZE, SIZE, 3))


def _unit_polygon(shape: str, rng: np.random.Generator) -> list:
    """Vertices in [-1, 1]^2 (before rotation)."""
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(0, -1), (0.95, 0.8), (-0.95, 0.8)]
    if shape == "star":
        inner = rng.uniform(0.38, 0.5)
        return [((1 if i % 2 == 0 else inner) * math.sin(i * math.pi / 5),
                 -(1 if i % 2 == 0 else inner) * math.cos(i * math.pi / 5)) for i in range(10)]
    if shape == "cross":
        w = rng.uniform(0.3, 0.4)
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
                (-w, -w)]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return list(zip(x / 17, (y + 2.5) / 17))
    if shape == "rhombus":
        return [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    if shape == "arrow":
        return [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    raise ValueError(shape)


def _shape_mask(shape: str, rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of one object (rotation and aspect jitter included)."""
    s = 4  # supersample, then majority-vote down: smooth, rotation-independent edges
    img = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(img)
    aspect = rng.uniform(0.85, 1.15)
    if shape in ("disc", "ring", "crescent"):
        rx, ry = r * aspect * s, r / aspect * s
        box = lambda x, y, a, b: (x - a, y - b, x + a, y + b)  # noqa: E731
        draw.ellipse(box(cx * s, cy * s, rx, ry), fill=1)
        if shape == "ring":
            k = rng.uniform(0.45, 0.6)
            draw.ellipse(box(cx * s, cy * s, rx * k, ry * k), fill=0)
        elif shape == "crescent":
            a = rng.uniform(0, 2 * math.pi)
            d = rng.uniform(0.4, 0.55)
            draw.ellipse(box((cx + d * r * math.cos(a)) * s, (cy + d * r * math.sin(a)) * s, rx * 0.9, ry * 0.9),
                         fill=0)
    else:
        a = rng.uniform(0, 2 * math.pi) if shape != "heart" else rng.uniform(-0.5, 0.5)
        ca, sa = math.cos(a), math.sin(a)
        pts = [((cx + r * (x * aspect * ca - y / aspect * sa)) * s, (cy + r * (x * aspect * sa + y / aspect * ca)) * s)
               for x, y in _unit_polygon(shape, rng)]
        draw.polygon(pts, fill=1)
    big = np.asarray(img, np.float32).reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))
    return big >= 0.5


def _appearance(cat: ToyCategory, rng: np.random.Generator) -> np.ndarray:
    """[SIZE, SIZE, 3] float RGB of the category's colour and texture (jittered)."""
    hue = (cat.hue + rng.uniform(-12, 12)) % 360 / 360
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)), np.float32) * 255
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    period, phase = rng.uniform(6, 10), rng.uniform(0, 2 * math.pi)
    a = rng.uniform(0, math.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    if cat.texture == "checker":
        p = ((np.floor((xx + phase) / period) + np.floor((yy + phase) / period)) % 2)
    elif cat.texture == "hstripes":
        p = (np.sin(yy * 2 * math.pi / period + phase) > 0)
    elif cat.texture == "vstripes":
        p = (np.sin(xx * 2 * math.pi / period + phase) > 0)
    elif cat.texture == "dstripes":
        p = (np.sin((xx + yy) * math.pi / period + phase) > 0)
    elif cat.texture == "dots":
        p = (np.sin(xx * 2 * math.pi / period + phase) * np.sin(yy * 2 * math.pi / period) > 0.4)
    elif cat.texture == "speckle":
        p = rng.uniform(size=(SIZE, SIZE)) > 0.7
    elif cat.texture == "shaded":
        p = 1 - np.clip(np.abs(u - u.mean()) / SIZE * 2, 0, 1)
    else:
        p = np.ones((SIZE, SIZE))
    return rgb * (0.65 + 0.35 * p.astype(np.float32))[..., None]


def render(rng: np.random.Generator, cats: list, size_range=(0.3, 0.45)) -> tuple:
    """(uint8 RGB [SIZE, SIZE, 3], uint8 label [SIZE, SIZE]: i+1 where cats[i] is visible, 0 else).
    Objects are drawn in order; a later one occludes an earlier one."""
    img = _background(rng)
    label = np.zeros((SIZE, SIZE), np.uint8)
    for i, cat in enumerate(cats):
        r = rng.uniform(*size_range) * SIZE / 2 * 1.0
        cx, cy = rng.uniform(r * 0.8, SIZE - r * 0.8, 2)
        mask = _shape_mask(cat.shape, rng, cx, cy, r)
        if not mask.any():
            continue
        img[mask] = _appearance(cat, rng)[mask]
        label[mask] = i + 1
    img += rng.normal(0, 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def _pick(rng: np.random.Generator, pool: tuple, k: int) -> list:
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def _scene(rng: np.random.Generator, n: int, pool: tuple) -> tuple:
    cats = _pick(rng, pool, n)
    size_range = (0.5, 0.8) if n == 1 else (0.3, 0.5)
    img, lab = render(rng, cats, size_range)
    return img, lab, cats


def caption(rng: np.random.Generator, cats: list, templates: tuple) -> str:
    """A random prompt template naming every object by a random synonym."""
    words = [names_of(c)[rng.integers(len(names_of(c)))] for c in cats]
    phrase = words[0] if len(words) == 1 else CAPTION_JOIN[len(words) - 2].format(*words)
    return templates[rng.integers(len(templates))].format(phrase)


def caption_templates() -> tuple:
    """Caption phrasings: the prompt templates CLIP is queried with are web-like captions too,
    so the toy CLIP learns its words in the contexts it will be asked in."""
    from namedmask.models.prompts import get_templates

    return tuple(get_templates("namedmask"))


# ---------------------------------------------------------------- splits

def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_SEED[split]])


def _save_jpg(path: Path, img: np.ndarray) -> None:
    with io.atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="JPEG", quality=95)


def _relabel(lab: np.ndarray, cats: list, ids: dict) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for i, c in enumerate(cats):
        lut[i + 1] = ids[c.name]
    return lut[lab]


def write_world(root: str | Path, seed: int = 0, size: str = "full", progress: bool = True) -> Path:
    """Writes the world's splits under root (layout in the module docstring). Idempotent: a
    complete world of the same seed and size is left as it is; another one is an error."""
    from tqdm.auto import tqdm

    root = Path(root)
    spec = {"seed": seed, "size": size, "sizes": SIZES[size], "image_size": SIZE,
            "categories": [{"name": c.name, "synonyms": list(c.synonyms), "held_out": c.name in HELD_OUT}
                           for c in CATEGORIES]}
    done = root / "world.json"
    if done.exists():
        old = json.loads(done.read_text())
        if old != spec:
            raise InputError(f"{root}: holds a toy world of seed {old.get('seed')}/{old.get('size')}, not "
                             f"{seed}/{size}; use another --out folder")
        return root
    n = SIZES[size]
    named_ids = {c.name: i + 1 for i, c in enumerate(NAMED)}
    all_ids = {c.name: i + 1 for i, c in enumerate(CATEGORIES)}
    bar = tqdm(total=sum(n.values()), desc="toy world", unit="img", disable=not progress)

    rng, templates, lines = _rng(seed, "pretrain"), caption_templates(), []
    for i in range(n["pretrain"]):
        img, _, cats = _scene(rng, int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), CATEGORIES)
        _save_jpg(root / "pretrain" / "images" / f"{i:05d}.jpg", img)
        lines.append(f"images/{i:05d}.jpg\t{caption(rng, cats, templates)}")
        bar.update()
    io.write_text(root / "pretrain" / "captions.tsv", "\n".join(lines) + "\n")

    rng = _rng(seed, "pool")
    for i in range(n["pool"]):
        k = int(rng.choice([1, 2, 3, 0], p=[0.75, 0.1, 0.05, 0.1]))
        if k:
            img, lab, cats = _scene(rng, k, CATEGORIES)
            lab = _relabel(lab, cats, all_ids)
        else:
            img, lab = render(rng, [])
        _save_jpg(root / "pool" / f"{i:05d}.jpg", img)
        io.save_png(root / "pool_labels" / f"{i:05d}.png", lab, voc_palette())
        bar.update()

    for split in ("single", "multi"):
        rng = _rng(seed, split)
        for i in range(n[split]):
            k = 1 if split == "single" else int(rng.choice([2, 3]))
            img, lab, cats = _scene(rng, k, NAMED)
            lab = _relabel(lab, cats, named_ids)
            for sub, name in ((split, f"{i:04d}"), ("all", f"{split}_{i:04d}")):
                _save_jpg(root / "eval" / sub / "images" / f"{name}.jpg", img)
                io.save_png(root / "eval" / sub / "labels" / f"{name}.png", lab, voc_palette())
            bar.update()
    bar.close()
    io.write_text(root / "categories.txt", "".join(f"{c.name} | {', '.join(c.synonyms)}\n" for c in NAMED))
    io.write_json(done, spec)
    return root


def read_captions(root: str | Path) -> list:
    """[(image path, caption)] of the pretraining split."""
    root = Path(root) / "pretrain"
    pairs = []
    for line in (root / "captions.tsv").read_text().splitlines():
        rel, _, text = line.partition("\t")
        pairs.append((root / rel, text))
    return pairs
