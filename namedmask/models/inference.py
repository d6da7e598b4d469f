"""Inference with a trained segmenter: one uint8 image in, one label map out (native
resolution, single scale, argmax), the protocol every stage that predicts shares. (The object
`namedmask.load` returns is namedmask.api.Segmenter.)"""
from __future__ import annotations

from pathlib import Path

import torch

from namedmask.data.augment import eval_input
from namedmask.models.deeplab import ModelError

RUN_FILES = ("checkpoint.pt", "model.safetensors", "model.json")


@torch.no_grad()
def predict_label(model, image: torch.Tensor, device, amp: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] image -> int64 [H, W] argmax class ids at native resolution, single scale."""
    x = eval_input(image).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    return logits.float().argmax(1)[0].cpu()


def resolve_run_dir(path: str | Path) -> Path:
    """A trained run's folder from the folder itself (or a `namedmask run` folder: its train/),
    its checkpoint.pt, model.safetensors or model.json (any of them names the same model)."""
    path = Path(path)
    if path.is_file() and (path.name in RUN_FILES or path.suffix == ".safetensors"):
        return path.parent
    if path.is_dir():  # a `namedmask run` folder holds its model in train/
        return path / "train" if not (path / "model.json").is_file() and (path / "train" / "model.json").is_file() \
            else path
    raise ModelError(f"{path}: not found; give a run folder written by `namedmask train`, its checkpoint.pt "
                     f"or its model.safetensors")
