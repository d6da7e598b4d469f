"""What a trained segmenter was made from, recorded in its model.json (`provenance`): the CLIP
that named its archives (name, weights, sha256 of the weights file), the DINO / SelfMask of its
pseudo-masks, its category words, its training image size, the pool it learnt from ("world")
and two flags: `toy` (the toy world's tiny CLIP) and `random_weights` (an untrained CLIP or
DINO). A toy or random-weight model knows nothing outside its world: `WorldCheck` warns, once,
when one is run on other images (predict, eval, namedmask.load)."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

TOY_CLIPS = ("nm-toy",)          # namedmask.toy.clip.MODEL: the toy world's tiny CLIP
RANDOM = "random"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per process for a file of the same size and mtime (the
    experts stage trains many models on the same CLIP file)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _weights_file(name: str, pretrained: str | None) -> str | None:
    """The file a CLIP's weights came from: a local file, or the cached file of a hub tag."""
    if not pretrained or pretrained == RANDOM:
        return None
    if Path(pretrained).is_file():
        return str(pretrained)
    try:
        import open_clip

        from namedmask.models.clip import _cached_weights

        return _cached_weights(open_clip.get_pretrained_cfg(name, pretrained) or {})
    except Exception:  # an unknown model or tag: no file to hash
        return None


def world_of(pool_root: str | Path) -> str:
    """The folder a model's images come from: the pool's root, or the folder holding a folder
    named `pool` (the toy world and the generated demo keep their eval sets beside it)."""
    root = Path(pool_root).resolve()
    return str(root.parent if root.name == "pool" else root)


def training_provenance(archive_meta: dict, pool_root, saliency_config: dict, category_words: dict,
                        crop_size: int) -> dict:
    """model.json's `provenance` of a segmenter trained on an archive (its meta) and pseudo-masks
    made with `saliency_config` (the saliency manifest's config)."""
    clip = dict(archive_meta.get("model") or {})
    name, pretrained = clip.get("name"), clip.get("pretrained")
    weights = _weights_file(name, pretrained)
    clip_rec = {"name": name, "pretrained": pretrained,
                "weights_file": weights, "sha256": file_sha256(weights) if weights else None}
    method = saliency_config.get("method")
    dino_rec = {"method": method, "name": saliency_config.get("dino"),
                "weights": saliency_config.get("checkpoint") if method == "selfmask" else saliency_config.get("dino_weights"),
                "random_weights": bool(saliency_config.get("random_weights"))}
    if dino_rec["weights"] and Path(dino_rec["weights"]).is_file():
        dino_rec["sha256"] = file_sha256(dino_rec["weights"])
    toy = name in TOY_CLIPS
    random_weights = pretrained == RANDOM or dino_rec["random_weights"]
    return {"clip": clip_rec, "saliency": dino_rec, "category_words": category_words,
            "image_size": int(crop_size), "world": world_of(pool_root), "toy": toy, "random_weights": random_weights}


def untrusted(meta: dict) -> str | None:
    """'toy' / 'random-weight' when the model's provenance says it knows only its own world."""
    prov = meta.get("provenance") or {}
    if prov.get("toy"):
        return "toy"
    if prov.get("random_weights"):
        return "random-weight"
    return None


def describe(meta: dict) -> str:
    """One line for reports: what the model was trained from."""
    prov = meta.get("provenance")
    if not prov:
        return "not recorded (a model trained before provenance was recorded)"
    clip, sal = prov.get("clip") or {}, prov.get("saliency") or {}
    sha = f", sha256 {clip['sha256'][:12]}" if clip.get("sha256") else ""
    kind = untrusted(meta)
    return (f"CLIP {clip.get('name')}/{Path(str(clip.get('pretrained'))).name}{sha}; saliency {sal.get('method')} "
            f"{sal.get('name') or ''}{' (random weights)' if sal.get('random_weights') else ''}; "
            f"{len(prov.get('category_words') or {})} categories; {prov.get('image_size')} px crops; "
            f"world {prov.get('world')}" + (f"; {kind.upper()} MODEL" if kind else ""))


class WorldCheck:
    """Warns once when a toy or random-weight model is run on an image outside its world."""

    def __init__(self, meta: dict, source: str, log: logging.Logger | None = None):
        self.kind = untrusted(meta)
        world = (meta.get("provenance") or {}).get("world")
        self.world = Path(world) if world else None
        self.source, self.log = source, log or logging.getLogger("namedmask")
        self.warned = False

    def outside(self, path: str | Path | None) -> bool:
        if path is None or self.world is None:
            return True  # an array, or no recorded world: nothing says it is from the model's world
        try:
            return os.path.commonpath([str(Path(path).resolve()), str(self.world)]) != str(self.world)
        except ValueError:
            return True

    def __call__(self, path: str | Path | None = None) -> bool:
        """Checks one image (its path; None for an in-memory image); True when it warned now."""
        if self.warned or self.kind is None or not self.outside(path):
            return False
        self.warned = True
        what = f"{path}" if path is not None else "an in-memory image"
        self.log.warning("%s is a %s model trained only on %s; its labels for images from elsewhere (%s) are "
                         "meaningless. Train on your own photos: namedmask run --pool DIR --categories \"a, b\"",
                         self.source, self.kind.upper(), self.world or "its own generated world", what)
        return True
