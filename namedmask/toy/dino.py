"""Tiny DINO for the toy world: a timm ViT (patch 8 at 96 px, width 128, 4 layers, 4 heads)
trained with the DINO objective (Caron et al. 2021): student and EMA teacher, a projection head
with a weight-normalised last layer, centring and sharpening of the teacher output, multi-crop
(2 global 96 px + 2 local 48 px views; the teacher sees only the global ones).

The loss is our own twenty lines rather than lightly's DINOLoss: lightly pulls in its own
training stack (pytorch-lightning, its API client) for two small functions, and the official
loss is short and exact enough to write down.

Written in the official DINO layouts, so `namedmask saliency --dino-weights FILE` loads it as it
would dino_deitsmall8_pretrain.pth:
    <dir>/dino_toy_pretrain.pth   flat teacher-backbone state dict (the released-weights layout)
    <dir>/checkpoint.pth          the training checkpoint: {"student": module.backbone./module.head.,
                                  "teacher": backbone./head., "optimizer", "step", "dino_loss"}
checkpoint.pth is also the resume state."""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from namedmask import io
from namedmask.data.augment import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

VIT_NAME = "vit_small_patch8_224"
VIT_KWARGS = {"img_size": 96, "embed_dim": 128, "depth": 4, "num_heads": 4}
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # what the saliency stage feeds the ViT


@dataclass
class DinoTrainConfig:
    steps: int = 100
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup: int = 10
    out_dim: int = 256
    teacher_temp: float = 0.02     # the probe: 0.04 collapsed to a uniform output at this scale
    student_temp: float = 0.1
    center_momentum: float = 0.9
    ema: float = 0.99              # teacher momentum at step 0, cosine to 1
    local_crops: int = 2
    save_every: int = 20
    seed: int = 0


class DinoHead(nn.Module):
    """DINO's projection head: 3-layer MLP -> L2-normalised bottleneck -> weight-normalised
    linear layer with its norm fixed to 1."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 256, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DinoNet(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list):
        # Crops of equal size share a forward pass, as in DINO's MultiCropWrapper.
        out, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            out.append(self.backbone(torch.cat(crops[i:j])))
            i = j
        return self.head(torch.cat(out))


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_crops: int,
              t_temp: float, s_temp: float) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher distribution of each global view
    and the student distribution of every other view, averaged over pairs."""
    s = (student / s_temp).chunk(n_crops)
    t = F.softmax((teacher - center) / t_temp, dim=-1).detach().chunk(2)
    total, pairs = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def build_backbone():
    from namedmask.models.dino import build_vit

    # dynamic_img_size: the same ViT sees 96 px global and 48 px local crops
    return build_vit(VIT_NAME, dynamic_img_size=True, **VIT_KWARGS)


def _views(images: torch.Tensor, gen: torch.Generator, n: int, size: int, scale: tuple) -> torch.Tensor:
    """n-independent DINO views of uint8 [B, 3, H, W] -> normalised float [B, 3, size, size]:
    random resized crop (aspect 3/4..4/3), flip, colour jitter (p 0.8: brightness, contrast,
    saturation 0.4), grayscale (p 0.2). Batched torch ops: torchvision's per-image v2 pipeline
    took ~45 ms a crop here, more than the ViT's forward and backward."""
    b, _, h, w = images.shape
    u = torch.rand(b, 8, generator=gen)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
    ch = (torch.sqrt(area / ratio) * h).clamp(8, h).long()
    cw = (torch.sqrt(area * ratio) * w).clamp(8, w).long()
    y0 = ((h - ch) * u[:, 2]).long()
    x0 = ((w - cw) * u[:, 3]).long()
    x = torch.stack([F.interpolate(images[i:i + 1, :, y0[i]:y0[i] + ch[i], x0[i]:x0[i] + cw[i]].float(),
                                   size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
                     for i in range(b)]) / 255
    flip = u[:, 4] < 0.5
    x[flip] = x[flip].flip(-1)
    jitter = (u[:, 5] < 0.8).float().view(b, 1, 1, 1)
    f = 1 + 0.4 * (2 * torch.rand(b, 3, generator=gen) - 1) * jitter.view(b, 1)
    x = (x * f[:, 0].view(b, 1, 1, 1)).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1].view(b, 1, 1, 1) + mean).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = ((x - gray) * f[:, 2].view(b, 1, 1, 1) + gray).clamp(0, 1)
    x = torch.where((u[:, 6] < 0.2).view(b, 1, 1, 1), gray.expand_as(x), x)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _augment(images: torch.Tensor, gen: torch.Generator, local_crops: int) -> list:
    """DINO's multi-crop: [global 96 px, global 96 px, local 48 px x local_crops]."""
    return ([_views(images, gen, 1, 96, (0.35, 1.0)) for _ in range(2)]
            + [_views(images, gen, 1, 48, (0.1, 0.35)) for _ in range(local_crops)])


def train_dino(images: torch.Tensor, out: str | Path, cfg: DinoTrainConfig, progress: bool = True) -> Path:
    """images: uint8 [N, 3, 96, 96]. Returns the flat backbone file (out/dino_toy_pretrain.pth)."""
    from tqdm.auto import tqdm

    out = Path(out)
    final, state = out / "dino_toy_pretrain.pth", out / "checkpoint.pth"
    meta = out / "train.json"
    if final.exists() and meta.exists() and io.read_json(meta, ValueError, "")["config"] == asdict(cfg):
        return final
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        student = DinoNet(build_backbone(), DinoHead(VIT_KWARGS["embed_dim"], cfg.out_dim))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    center = torch.zeros(1, cfg.out_dim)
    step = 0
    if state.exists():
        saved = torch.load(state, map_location="cpu", weights_only=True)
        if saved.get("config") == asdict(cfg):
            student.load_state_dict({k.removeprefix("module."): v for k, v in saved["student"].items()})
            teacher.load_state_dict(saved["teacher"])
            opt.load_state_dict(saved["optimizer"])
            center, step = saved["dino_loss"]["center"], saved["step"]
            log.info("tiny DINO: resuming at step %d", step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    n_crops = 2 + cfg.local_crops
    student.train()
    teacher.train()
    loss = None
    bar = tqdm(total=cfg.steps, initial=step, desc="tiny DINO", unit="step", disable=not progress)
    while step < cfg.steps:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        views = _augment(images[idx], gen, cfg.local_crops)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        s_out = student(views)
        with torch.no_grad():
            t_out = teacher(views[:2])
        loss = dino_loss(s_out, t_out, center, n_crops, cfg.teacher_temp, cfg.student_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad():
            m = 1 - (1 - cfg.ema) * (math.cos(math.pi * step / cfg.steps) + 1) / 2
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            center = center * cfg.center_momentum + t_out.mean(0, keepdim=True) * (1 - cfg.center_momentum)
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt = {"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                    "teacher": teacher.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "dino_loss": {"center": center}, "config": asdict(cfg)}
            with io.atomic_path(state) as tmp:
                torch.save(ckpt, tmp)
    bar.close()
    with io.atomic_path(final) as tmp:
        torch.save(teacher.backbone.state_dict(), tmp)
    io.write_json(meta, {"config": asdict(cfg), "vit": VIT_NAME, "vit_kwargs": VIT_KWARGS,
                         "final_loss": None if loss is None else float(loss.item()),
                         "ln_out_dim": math.log(cfg.out_dim)})
    return final
