"""Inference with a trained segmenter: one uint8 image in, one label map out (native
resolution, single scale, argmax), the protocol every stage that predicts shares. (The object
`namedmask.load` returns is namedmask.api.Segmenter.)"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from namedmask.data.augment import eval_input
from namedmask.models.deeplab import ModelError
from namedmask.runtime import one_thread

RUN_FILES = ("checkpoint.pt", "model.safetensors", "model.json")


# A forward pass below this many floating-point operations runs on one thread on a CPU: its
# operators are too short to share (the toy segmenter on a 96x128 image, ~0.07 GFLOP: 5.5-7.5 ms
# on 1 thread, 11-17 ms on 2 with other jobs on the machine). A ResNet-50 DeepLab on a VOC image
# (~140 GFLOP) keeps every thread.
TINY_FORWARD_FLOPS = 1e9
_PROBE_SIDE = 64


def forward_flops(model, x: torch.Tensor) -> float:
    """Floating-point operations of model(x) in its convolutions and linear layers (2 per
    multiply-add; the rest of a CNN is a few per cent), counted with forward hooks: works on the
    meta device (no memory, no data) and costs one forward pass. (torch's FlopCounterMode
    imports torch._dynamo on first use: 1.4 s, more than a toy evaluation.)"""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            total[0] += 2 * output.numel() * module.in_features
        else:
            total[0] += 2 * output.numel() * (module.in_channels // module.groups) * int(
                torch.tensor(module.kernel_size).prod())

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return float(total[0])


def forward_flops_per_pixel(model) -> float | None:
    """forward_flops per input pixel, counted once on a 64x64 zero image and kept on the model;
    None when the model cannot be counted that way."""
    cached = getattr(model, "_namedmask_flops_per_pixel", False)
    if cached is not False:
        return cached
    try:
        device = next(model.parameters()).device
        value = forward_flops(model, torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE, device=device)) / _PROBE_SIDE ** 2
    except Exception:  # noqa: BLE001  a model with other input rules keeps its threads
        value = None
    try:
        model._namedmask_flops_per_pixel = value
    except AttributeError:
        pass
    return value


def inference_threads(model, height: int, width: int, device) -> contextlib.AbstractContextManager:
    """One torch thread for a tiny forward pass on a CPU (see TINY_FORWARD_FLOPS), else as set.
    A function of the model and the image size, never of the load; the label maps were measured
    equal on 1 and 2 threads (docs/reproducibility.md)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        return contextlib.nullcontext()
    per_pixel = forward_flops_per_pixel(model)
    if per_pixel is None or per_pixel * height * width >= TINY_FORWARD_FLOPS:
        return contextlib.nullcontext()
    return one_thread()


def vit_forward_flops(model, side: int, stride: int | None = None) -> float | None:
    """Floating-point operations of a ViT's forward pass on a side x side image (patches `stride`
    px apart; None: the patch size), estimated without running it as 2 x parameters x tokens: its
    linear layers, all but the attention products, cost two per parameter per token (within 5 % of
    forward_flops for the toy DINO). None for a model without a patch size (not a ViT)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None) or getattr(model, "patch_size", None)
    if patch is None:
        return None
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    per_side = (side - patch) // (stride or patch) + 1
    return 2.0 * sum(p.numel() for p in model.parameters()) * (per_side ** 2 + 1)


def tiny_forwards_threads(device, *flops) -> contextlib.AbstractContextManager:
    """One torch thread on a CPU while the forward passes counted in `flops` (None: unknown)
    together stay under TINY_FORWARD_FLOPS, else as set: for a stage that runs a few small models
    per image (discover: the DINO and CLIP towers). A function of the models and sizes, never of
    the load."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1 or any(f is None for f in flops) \
            or sum(flops) >= TINY_FORWARD_FLOPS:
        return contextlib.nullcontext()
    return one_thread()


@torch.no_grad()
def predict_label(model, image: torch.Tensor, device, amp: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] image -> int64 [H, W] argmax class ids at native resolution, single scale."""
    x = eval_input(image).to(device)
    with inference_threads(model, x.shape[-2], x.shape[-1], device), \
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
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
