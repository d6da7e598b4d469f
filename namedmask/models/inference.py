"""Inference with a trained segmenter: one uint8 image in, one label map out (native
resolution, single scale, argmax), the protocol every stage that predicts shares."""
from __future__ import annotations

import torch

from namedmask.data.augment import eval_input


@torch.no_grad()
def predict_label(model, image: torch.Tensor, device, amp: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] image -> int64 [H, W] argmax class ids at native resolution, single scale."""
    x = eval_input(image).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    return logits.float().argmax(1)[0].cpu()
