"""Tiny CLIP for the toy world: open_clip's `nm-toy` config (ViT-16 image tower at 96 px, width
96, 3 layers; text width 64, 2 layers, context 24; open_clip's BPE tokenizer), trained with
open_clip's ClipLoss on the world's captioned pretraining split for a fixed number of steps.

The result is an ordinary open_clip state dict (`<dir>/nm-toy.pt`) that
`namedmask build-archive --model nm-toy --pretrained <dir>/nm-toy.pt` loads like any other
checkpoint. Resumable: `<dir>/train_state.pt` (model, optimiser, step) is written every
`save_every` steps; a finished run is not repeated."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from namedmask import io
from namedmask.models.clip import TOY_MODEL as MODEL
from namedmask.runtime import restore_rng, rng_snapshot

log = logging.getLogger(__name__)



@dataclass
class ClipTrainConfig:
    steps: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    save_every: int = 100
    seed: int = 0


def load_images(paths: list) -> torch.Tensor:
    """uint8 [N, 3, H, W] of equally sized images."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)


def _lr(cfg: ClipTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def warn_thread_change(what: str, saved: int | None, now: int) -> None:
    """A training resumed with another torch thread count continues on other bits (float sums in
    another order): allowed, but said."""
    if saved is not None and saved != now:
        log.warning("%s: resuming with %d torch threads, the run so far had %d; the result will differ in its "
                    "last bits from an uninterrupted run (pin them with --threads %d)", what, now, saved, saved)


def train_clip(pairs: list, out: str | Path, cfg: ClipTrainConfig, progress: bool = True) -> Path:
    """pairs: [(image path, caption)]. Returns the checkpoint path (out/nm-toy.pt)."""
    import open_clip
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from namedmask.models.clip import register_configs

    out = Path(out)
    final = out / f"{MODEL}.pt"
    meta = out / "train.json"
    if final.exists() and meta.exists() and io.read_json(meta, ValueError, "")["config"] == asdict(cfg):
        return final
    register_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(MODEL)
    tokenizer = open_clip.get_tokenizer(MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    step, state = 0, out / "train_state.pt"
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    threads = torch.get_num_threads()
    if state.exists():
        saved = torch.load(state, map_location="cpu", weights_only=True)
        if saved["config"] == asdict(cfg) and "rng" in saved:  # older states (no rng) restart
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            step = saved["step"]
            restore_rng(saved["rng"], gen)  # continues the very random stream an uninterrupted run draws
            warn_thread_change("tiny CLIP", saved.get("threads"), threads)
            log.info("tiny CLIP: resuming at step %d", step)
    images = load_images([p for p, _ in pairs])
    tokens = tokenizer([t for _, t in pairs])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    loss_fn = ClipLoss()
    model.train()
    loss = None
    bar = tqdm(total=cfg.steps, initial=step, desc="tiny CLIP", unit="step", disable=not progress)
    while step < cfg.steps:
        idx = torch.randint(len(pairs), (cfg.batch_size,), generator=gen)
        x = images[idx].float().div_(255)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        img_f = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt_f = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            io.save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                           "config": asdict(cfg), "rng": rng_snapshot(gen), "threads": threads}, state)
    bar.close()
    io.save_torch(model.state_dict(), final)
    io.write_json(meta, {"config": asdict(cfg), "model": MODEL, "final_loss": None if loss is None else float(loss.item()),
                         "threads": threads})
    state.unlink(missing_ok=True)
    return final
