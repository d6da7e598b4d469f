"""The Python API: load a segmenter once, then name the pixels of any image.

    import namedmask
    seg = namedmask.load("runs/mine")                       # a run (or its train/ folder, checkpoint.pt,
                                                            # model.safetensors)
    seg = namedmask.load("final_model.pt", categories="voc")  # the official NamedMask release
    seg = namedmask.load(zero_shot="ViT-B-16/openai", text="dog, cat|kitten")  # dense CLIP, no training
    result = seg.predict("photo.jpg")                       # or a PIL image, an H x W x 3 uint8 array/tensor
    result.labels, result.scores, result.class_names         # H x W ids, C x H x W probabilities, names
    result.overlay().save("overlay.png"); result.save("out/")
    results = seg.predict(["a.jpg", "b.jpg"], text="dog, cat")  # a list in, a list out (batched)

Modelled on segment-anything's predictor (load once, predict many; arrays in, arrays out) and
Hugging Face pipelines (one call from a path, a list gives a list). The segmenters are built by
the one factory the CLI uses too (models.openvocab.build_segmenter), and every user error is a
NamedMaskError."""
from __future__ import annotations

import io as _io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from namedmask import io
from namedmask.data.augment import normalize
from namedmask.data.categories import voc_palette
from namedmask.data.decode import ImageDecodeError, _pil_decode, _to_rgb, load_image
from namedmask.errors import BadInputError, InputError
from namedmask.models.provenance import WorldCheck, describe
from namedmask.runtime import resolve_device
from namedmask.models.openvocab import build_segmenter, text_classes

log = logging.getLogger("namedmask")

PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


class ImageInputError(BadInputError, TypeError):
    """An input predict cannot read as an image; the message says what it takes."""


@dataclass(eq=False)
class Result:
    """One image's segmentation. `labels`: H x W class ids (uint8 up to 256 classes, else
    int32); `scores`: float32 C x H x W per-class probabilities; `class_names[i]` names id i
    (0 = background); `palette`: C x 3 uint8 colours of the label PNG and the overlay.
    Behaves as its label array where it reads it (`np.asarray(result)`, `result[y, x]`,
    `result.shape`, `result.flat`, as `predict` returned a bare array before); compute on
    `result.labels`."""
    labels: np.ndarray
    scores: np.ndarray
    class_names: list
    image: np.ndarray
    source: str | None = None

    @property
    def palette(self) -> np.ndarray:
        return PALETTE[np.arange(len(self.class_names)) % 256]

    @property
    def present(self) -> list:
        """Names of the classes that label at least one pixel."""
        return [self.class_names[i] for i in np.unique(self.labels)]

    def overlay(self, alpha: float = 0.5):
        """PIL image: the photo tinted by class, with a legend of the classes present."""
        from namedmask.report import overlay_image

        return overlay_image(torch.from_numpy(self.image), torch.from_numpy(self.labels.astype(np.int64)),
                             self.class_names, alpha)

    def save(self, folder: str | Path, name: str | None = None) -> dict:
        """Writes <folder>/labels/<name>.png (palette PNG of the ids, as `namedmask predict`),
        overlays/<name>.png and scores/<name>.npy; returns their paths."""
        folder = Path(folder)
        name = name or (Path(self.source).stem if self.source else "image")
        paths = {"labels": folder / "labels" / f"{name}.png", "overlay": folder / "overlays" / f"{name}.png",
                 "scores": folder / "scores" / f"{name}.npy"}
        if len(self.class_names) <= 256:
            io.save_png(paths["labels"], self.labels.astype(np.uint8), palette=voc_palette())
        else:
            io.save_png(paths["labels"], self.labels.astype(np.uint16))
        io.save_png(paths["overlay"], self.overlay())
        buf = _io.BytesIO()
        np.save(buf, self.scores)
        io.write_bytes(paths["scores"], buf.getvalue())
        return paths

    def __array__(self, dtype=None, copy=None):
        return self.labels if dtype is None else self.labels.astype(dtype)

    def __getitem__(self, key):
        return self.labels[key]

    def __getattr__(self, name):  # the label array's own attributes (flat, max, tolist, ...)
        if name.startswith("__") or name == "labels":
            raise AttributeError(name)
        return getattr(self.labels, name)

    @property
    def shape(self) -> tuple:
        return self.labels.shape

    @property
    def dtype(self):
        return self.labels.dtype

    def __repr__(self) -> str:
        return f"Result({self.labels.shape[0]}x{self.labels.shape[1]}, {', '.join(self.present)})"


def as_image(x) -> tuple[torch.Tensor, str | None]:
    """(uint8 [H, W, 3] tensor, its path or None) from a path, PNG/JPEG bytes, a PIL image (any
    mode, 16-bit grey read as the CLI reads files) or an H x W x 3 uint8 array / tensor (any strides)."""
    if isinstance(x, (str, Path)):
        try:
            return load_image(x), str(x)
        except FileNotFoundError:
            raise ImageInputError(f"{x}: no such image file") from None
        except ImageDecodeError as exc:
            raise ImageInputError(str(exc)) from None
    if isinstance(x, (bytes, bytearray, memoryview)):
        try:
            return torch.from_numpy(np.array(_pil_decode(bytes(x)))), None
        except Exception as exc:
            raise ImageInputError(f"predict: {len(x)} bytes that are not an image file's contents ({exc})") from None
    if type(x).__module__.startswith("PIL.") and hasattr(x, "mode"):
        return torch.from_numpy(np.array(_to_rgb(x))), None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise ImageInputError(f"predict takes an H x W x 3 uint8 image, got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ImageInputError(f"predict: an empty image ({x.shape[0]} x {x.shape[1]} pixels)")
        return torch.from_numpy(np.ascontiguousarray(x).copy()), None   # flipped / strided views: own memory
    raise ImageInputError(f"predict takes a path, image bytes, a PIL image or an H x W x 3 uint8 array/tensor "
                          f"(or a list of them), got {type(x).__name__}")


class Segmenter:
    """A loaded segmenter: `predict(image or [images], text=None)` -> Result(s). `text` ("dog,
    cat|kitten") names new classes: a text-head run or a zero-shot segmenter only."""

    def __init__(self, source=None, *, categories=None, zero_shot=None, text=None, device="auto",
                 batch_size: int = 8):
        self.device = resolve_device(device)
        self.source, self.categories, self.zero_shot, self.batch_size = source, categories, zero_shot, batch_size
        self.model, self.class_names, self.meta = build_segmenter(
            source, categories=categories, zero_shot=zero_shot, text=text, device=self.device)
        self.text = text
        self._by_text = {text: (self.model, self.class_names)}
        self._world = WorldCheck(self.meta, str(source), log)

    def __repr__(self) -> str:
        what = f"zero-shot {self.zero_shot}" if self.zero_shot else str(self.source)
        return f"Segmenter({what}: {len(self.class_names)} classes on {self.device})"

    @property
    def provenance(self) -> str:
        """What the model was trained from (model.json's provenance), one line."""
        return describe(self.meta)

    def _for_text(self, text):
        if text is None:
            return self.model, self.class_names
        if not isinstance(text, str):
            raise InputError(f"text takes class names as one string, e.g. \"dog, cat|kitten\", got {type(text).__name__}")
        if text not in self._by_text:
            model, names, _ = build_segmenter(self.source, categories=self.categories, zero_shot=self.zero_shot,
                                              text=text, device=self.device)
            self._by_text[text] = (model, names)
        return self._by_text[text]

    @torch.no_grad()
    def predict(self, images, text: str | None = None):
        """One image -> a Result; a list or tuple of images -> a list of Results (images of one
        size share a forward pass, `batch_size` at a time, on the segmenter's device)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not single and not items:
            return []
        for x in items:
            if isinstance(x, (list, tuple)):
                raise ImageInputError("predict takes an image or a flat list of images, not nested lists")
        model, names = self._for_text(text)
        decoded = [as_image(x) for x in items]
        for _, path in decoded:
            self._world(path)
        out: list = [None] * len(decoded)
        groups: dict = {}
        for i, (img, _) in enumerate(decoded):
            groups.setdefault(tuple(img.shape), []).append(i)
        probabilities = _returns_probabilities(model)
        amp = self.device.type == "cuda"
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                x = torch.stack([normalize(decoded[i][0].permute(2, 0, 1)) for i in chunk]).to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    y = model(x).float()
                scores = y.clamp(0, 1) if probabilities else y.softmax(1)
                labels = y.argmax(1)
                for j, i in enumerate(chunk):
                    lab = labels[j].cpu().numpy().astype(np.uint8 if len(names) <= 256 else np.int32)
                    out[i] = Result(lab, scores[j].cpu().numpy(), list(names), decoded[i][0].numpy(), decoded[i][1])
        return out[0] if single else out


def _returns_probabilities(model) -> bool:
    """Dense zero-shot CLIP returns per-class probabilities already (background 2.0 where
    below its threshold); the trained segmenters return logits."""
    from namedmask.models.maskclip import MaskClipSegmenter

    return isinstance(model, MaskClipSegmenter)


def load(source: str | Path | None = None, *, categories=None, zero_shot: str | dict | None = None,
         text: str | None = None, device: str = "auto", batch_size: int = 8) -> Segmenter:
    """A segmenter from
    - a trained run: its folder (`namedmask run --out` or its train/), checkpoint.pt or model.safetensors;
    - the official NamedMask release: `final_model.pt` with `categories` (a category set such as
      "voc", a names file, or "a, b|synonym" text) in the order it was trained on;
    - `zero_shot="ViT-B-16/openai"` (open_clip name/tag, or name/local-file, or a dict of
      zero-shot options): dense CLIP, no training; classes from `text`.
    `text` binds a text-head run or a zero-shot segmenter to these class names."""
    if source is None and zero_shot is None:
        raise InputError("namedmask.load: give a run folder / checkpoint, or zero_shot=\"ViT-B-16/openai\"")
    return Segmenter(source, categories=categories, zero_shot=zero_shot, text=text, device=device,
                     batch_size=batch_size)


@dataclass
class Discovery:
    """One image's zero-guidance segments: `labels` H x W (0 = no segment, i = segments[i-1])
    and `segments` (id, name, score, runner-up names, area)."""
    labels: np.ndarray
    segments: list
    image: np.ndarray

    def overlay(self):
        from namedmask.report import overlay_image

        legend = [""] + [f"{s['id']}: {s['name'] or '?'}" for s in self.segments]
        return overlay_image(torch.from_numpy(self.image), torch.from_numpy(self.labels.astype(np.int64)), legend)


def discover(images, out: str | Path | None = None, **options):
    """Segments and their names with no class list (zero-guidance segmentation, `namedmask
    discover`). `options`: DiscoverConfig keys (vocabulary, model, pretrained, dino, dino_weights,
    size, k, ...). With `out` the CLI's files are written there and its summary returned; else a
    Discovery per image (a list for a list)."""
    from namedmask.config import DiscoverConfig, load_config
    from namedmask.stages.discover import discover as run, discover_image, load_models

    config = load_config(DiscoverConfig, None, options)
    if out is not None:
        items = [images] if isinstance(images, (str, Path)) else list(images)
        return run(items, out, config, progress=False)
    single = not isinstance(images, (list, tuple))
    decoded = [as_image(x)[0] for x in ([images] if single else images)]
    models = load_models(config)
    results = []
    with torch.no_grad():
        for img in decoded:
            labels, segments, _ = discover_image(models, img, config)
            results.append(Discovery((labels + 1).numpy().astype(np.uint8), segments, img.numpy()))
    return results[0] if single else results


__all__ = ["load", "Segmenter", "Result", "discover", "Discovery", "text_classes"]
