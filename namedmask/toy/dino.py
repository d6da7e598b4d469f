"""Tiny DINO for the toy world: a timm ViT (patch 8 at 96 px, width 128, 4 layers, 4 heads)
trained with the DINO objective (Caron et al. 2021): student and EMA teacher, a projection head
with a weight-normalised last layer, centring and sharpening of the teacher output, multi-crop
(2 global 96 px + 2 local 48 px views; the teacher sees only the global ones).
Options tried for the saliency it gives (README, toy world; none beat the ViT's own random
initialisation in budget, so the demo runs TokenCut on the tiny CLIP's image tower): crop sizes,
colour-augmentation strength, and iBOT's masked-image-modelling loss on the patch tokens
(Zhou et al. 2022; `patch_weight`), which DINO's class-token loss alone barely shapes.

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
from namedmask.errors import InputError
from namedmask.models.dino import patch_size
from namedmask.runtime import restore_rng, rng_snapshot
from namedmask.toy.clip import warn_thread_change

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
    global_size: int = 96          # crop sides in px (multiples of the patch, 8); the ViT is
    local_size: int = 48           # evaluated at 96 px, timm resamples its position embedding
    jitter: float = 0.4            # colour jitter strength (brightness, contrast, saturation; p 0.8)
    grayscale_p: float = 0.2
    patch_weight: float = 0.0      # iBOT's masked-patch loss (0: DINO's class-token loss only)
    mask_ratio: float = 0.3        # largest fraction of a global view's patches the student sees masked
    save_every: int = 20
    seed: int = 0

    def __post_init__(self):
        # The student groups its crops by size and takes the first group as the global crops,
        # whose masked patches the iBOT loss scores: equal sizes would mix locals into it.
        if self.patch_weight and self.global_size == self.local_size:
            raise InputError(f"patch_weight needs global crops larger than local ones, got global_size = "
                             f"local_size = {self.global_size}")


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


class PatchHeads(nn.Module):
    """iBOT's heads: DINO's class-token head, a second head for the patch tokens and the
    learnt embedding of a masked patch. Training-only, so all under `head.` in the checkpoint
    (the DINO loader drops `head.*`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.cls, self.patch = DinoHead(dim, out_dim), DinoHead(dim, out_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))


class DinoNet(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """timm's forward_features [B, 1 + N, C], with the patches where mask [B, h, w] is
        True replaced by the mask token before the position embedding (iBOT)."""
        b = self.backbone
        x = b.patch_embed(x)  # [B, h, w, C] (dynamic_img_size)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.head.mask_token.to(x.dtype), x)
        return b.norm(b.blocks(b.norm_pre(b.patch_drop(b._pos_embed(x)))))

    def forward(self, crops: list, masks: list | None = None):
        """Class-token outputs of all crops [n_crops * B, out_dim]; with PatchHeads also the
        patch outputs of the first len(masks) (global) crops [len(masks) * B, N, out_dim]."""
        # Crops of equal size share a forward pass, as in DINO's MultiCropWrapper.
        cls, patches, i = [], [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            m = None if masks is None or i >= len(masks) else torch.cat(masks[i:j])
            t = self.tokens(torch.cat(crops[i:j]), m)
            cls.append(t[:, 0])
            if isinstance(self.head, PatchHeads) and i < 2:
                patches.append(t[:, 1:])
            i = j
        if not isinstance(self.head, PatchHeads):
            return self.head(torch.cat(cls))
        return self.head.cls(torch.cat(cls)), self.head.patch(torch.cat(patches))


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


def patch_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, masks: torch.Tensor,
               t_temp: float, s_temp: float) -> torch.Tensor:
    """iBOT's masked-image-modelling loss: per view, the cross-entropy between the centred,
    sharpened teacher distribution of each patch (the teacher saw the whole view) and the
    student's distribution at that patch (the student saw it masked), averaged over the masked
    patches of the view, then over views. student, teacher [V, N, K], masks bool [V, N]."""
    q = F.softmax((teacher - center) / t_temp, dim=-1).detach()
    ce = torch.sum(-q * F.log_softmax(student / s_temp, dim=-1), dim=-1)
    m = masks.float()
    return ((ce * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def _masks(b: int, grid: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """iBOT's masking of one global view: half the images unmasked, the others with a random
    fraction in [0.1, ratio] of their patches masked, as one random axis-aligned block plus
    random single patches up to that count. Bool [b, grid, grid]."""
    u = torch.rand(b, 4, generator=gen)
    out = torch.zeros(b, grid, grid, dtype=torch.bool)
    for i in range(b):
        if u[i, 0] < 0.5:
            continue
        n = int(round((0.1 + (ratio - 0.1) * u[i, 1].item()) * grid * grid))
        side = max(1, int(math.sqrt(n)))
        y, x = int(u[i, 2] * (grid - side + 1)), int(u[i, 3] * (grid - side + 1))
        out[i, y:y + side, x:x + side] = True
        rest = n - int(out[i].sum())
        if rest > 0:
            free = (~out[i]).flatten().nonzero().flatten()
            out[i].view(-1)[free[torch.randperm(len(free), generator=gen)[:rest]]] = True
    return out


def build_backbone():
    from namedmask.models.dino import build_vit

    # dynamic_img_size: the same ViT sees 96 px global and 48 px local crops
    return build_vit(VIT_NAME, dynamic_img_size=True, **VIT_KWARGS)


def _views(images: torch.Tensor, gen: torch.Generator, n: int, size: int, scale: tuple, strength: float = 0.4,
           grayscale_p: float = 0.2) -> torch.Tensor:
    """n-independent DINO views of uint8 [B, 3, H, W] -> normalised float [B, 3, size, size]:
    random resized crop (aspect 3/4..4/3), flip, colour jitter (p 0.8: brightness, contrast,
    saturation by `strength`), grayscale (p `grayscale_p`). Batched torch ops: torchvision's per-image v2 pipeline
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
    f = 1 + strength * (2 * torch.rand(b, 3, generator=gen) - 1) * jitter.view(b, 1)
    x = (x * f[:, 0].view(b, 1, 1, 1)).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1].view(b, 1, 1, 1) + mean).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = ((x - gray) * f[:, 2].view(b, 1, 1, 1) + gray).clamp(0, 1)
    x = torch.where((u[:, 6] < grayscale_p).view(b, 1, 1, 1), gray.expand_as(x), x)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _augment(images: torch.Tensor, gen: torch.Generator, cfg: DinoTrainConfig) -> list:
    """DINO's multi-crop: [global, global, local x local_crops]."""
    colour = (cfg.jitter, cfg.grayscale_p)
    return ([_views(images, gen, 1, cfg.global_size, (0.35, 1.0), *colour) for _ in range(2)]
            + [_views(images, gen, 1, cfg.local_size, (0.1, 0.35), *colour) for _ in range(cfg.local_crops)])


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
        dim = VIT_KWARGS["embed_dim"]
        student = DinoNet(build_backbone(), PatchHeads(dim, cfg.out_dim) if cfg.patch_weight else
                          DinoHead(dim, cfg.out_dim))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    center = torch.zeros(1, cfg.out_dim)
    patch_center = torch.zeros(1, 1, cfg.out_dim)
    step, losses = 0, []  # losses: one per step (train.json), kept across resumes
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    threads = torch.get_num_threads()
    if state.exists():
        saved = torch.load(state, map_location="cpu", weights_only=True)
        if saved.get("config") == asdict(cfg) and "rng" in saved:  # older states (no rng) restart
            student.load_state_dict({k.removeprefix("module."): v for k, v in saved["student"].items()})
            teacher.load_state_dict(saved["teacher"])
            opt.load_state_dict(saved["optimizer"])
            center, step = saved["dino_loss"]["center"], saved["step"]
            patch_center = saved["dino_loss"].get("patch_center", patch_center)
            losses = list(saved.get("losses", []))
            restore_rng(saved["rng"], gen)  # continues the very random stream an uninterrupted run draws
            warn_thread_change("tiny DINO", saved.get("threads"), threads)
            log.info("tiny DINO: resuming at step %d", step)
    n_crops = 2 + cfg.local_crops
    patch = patch_size(student.backbone)
    student.train()
    teacher.train()
    loss = None
    bar = tqdm(total=cfg.steps, initial=step, desc="tiny DINO", unit="step", disable=not progress)
    while step < cfg.steps:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        views = _augment(images[idx], gen, cfg)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        if cfg.patch_weight:
            grid = cfg.global_size // patch
            masks = [_masks(cfg.batch_size, grid, cfg.mask_ratio, gen) for _ in range(2)]
            s_out, s_patch = student(views, masks)
            with torch.no_grad():
                t_out, t_patch = teacher(views[:2])
        else:
            s_out = student(views)
            with torch.no_grad():
                t_out = teacher(views[:2])
        loss = dino_loss(s_out, t_out, center, n_crops, cfg.teacher_temp, cfg.student_temp)
        if cfg.patch_weight:
            loss = loss + cfg.patch_weight * patch_loss(s_patch, t_patch, patch_center, torch.cat(masks).flatten(1),
                                                        cfg.teacher_temp, cfg.student_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad():
            m = 1 - (1 - cfg.ema) * (math.cos(math.pi * step / cfg.steps) + 1) / 2
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            center = center * cfg.center_momentum + t_out.mean(0, keepdim=True) * (1 - cfg.center_momentum)
            if cfg.patch_weight:
                patch_center = (patch_center * cfg.center_momentum
                                + t_patch.mean((0, 1), keepdim=True) * (1 - cfg.center_momentum))
        step += 1
        losses.append(round(loss.item(), 4))
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt = {"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                    "teacher": teacher.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "dino_loss": {"center": center, "patch_center": patch_center}, "losses": losses,
                    "config": asdict(cfg), "rng": rng_snapshot(gen), "threads": threads}
            io.save_torch(ckpt, state)
    bar.close()
    io.save_torch(teacher.backbone.state_dict(), final)
    io.write_json(meta, {"config": asdict(cfg), "vit": VIT_NAME, "vit_kwargs": VIT_KWARGS, "threads": threads,
                         "final_loss": None if loss is None else float(loss.item()),
                         "ln_out_dim": math.log(cfg.out_dim), "losses": losses})
    return final
