"""Inference with a trained segmenter: one uint8 image in, one label map out (native
resolution, single scale, argmax), the protocol every stage that predicts shares; and
`Segmenter`, the object `namedmask.load` returns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from namedmask.data.augment import eval_input
from namedmask.data.decode import load_image
from namedmask.models.deeplab import ModelError, load_segmenter
from namedmask.runtime import resolve_device

RUN_FILES = ("checkpoint.pt", "model.safetensors", "model.json")


@torch.no_grad()
def predict_label(model, image: torch.Tensor, device, amp: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] image -> int64 [H, W] argmax class ids at native resolution, single scale."""
    x = eval_input(image).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    return logits.float().argmax(1)[0].cpu()


def resolve_run_dir(path: str | Path) -> Path:
    """A trained run's folder from the folder itself, its checkpoint.pt, model.safetensors or
    model.json (any of them names the same model)."""
    path = Path(path)
    if path.is_file() and (path.name in RUN_FILES or path.suffix == ".safetensors"):
        return path.parent
    if path.is_dir():
        return path
    raise ModelError(f"{path}: not found; give a run folder written by `namedmask train`, its checkpoint.pt "
                     f"or its model.safetensors")


class Segmenter:
    """A trained segmenter, ready to name the pixels of any image:

        seg = namedmask.load("runs/x/train")
        labels = seg.predict("photo.jpg")       # H x W numpy array, seg.class_names[id] per pixel
    """

    def __init__(self, model, class_names: list, device: torch.device):
        self.model, self.class_names, self.device = model, list(class_names), device

    def __repr__(self) -> str:
        return f"Segmenter({len(self.class_names)} classes on {self.device})"

    def predict(self, image) -> np.ndarray:
        """image: a path, a PIL image, or an H x W x 3 uint8 array / tensor -> H x W class ids
        (uint8 while there are at most 256 classes, else int32) at the image's resolution."""
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif not isinstance(image, (np.ndarray, torch.Tensor)):  # PIL
            image = np.asarray(image.convert("RGB"))
        if not isinstance(image, torch.Tensor):
            image = torch.tensor(np.asarray(image))  # a copy: arrays of PIL images are read-only
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ModelError(f"predict takes an H x W x 3 uint8 image, got {image.dtype} {tuple(image.shape)}")
        label = predict_label(self.model, image, self.device, amp=self.device.type == "cuda").numpy()
        return label.astype(np.uint8 if len(self.class_names) <= 256 else np.int32)


def load(path: str | Path, device: str = "auto") -> Segmenter:
    """The segmenter trained in `path` (a run folder, its checkpoint.pt or model.safetensors)."""
    dev = resolve_device(device)
    model, meta = load_segmenter(resolve_run_dir(path), dev)
    return Segmenter(model, meta["class_names"], dev)
