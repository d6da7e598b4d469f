"""`namedmask toy-world`: the generated world (namedmask.toy.world) plus a tiny CLIP and a
tiny DINO trained on it, cached per seed under <out>/seed-<N>/:

    world/                   the splits (see namedmask.toy.world)
    clip/nm-toy.pt           open_clip checkpoint  -> build-archive --model nm-toy --pretrained FILE
    dino/dino_toy_pretrain.pth  official DINO layout -> saliency --dino vit_small_patch8_224
                                --dino-weights FILE (+ the VIT_KWARGS of namedmask.toy.dino)
    clip_tower/dino_layout.pth  the tiny CLIP's image tower in the same flat DINO/timm layout
                                (the documented alternative saliency backbone; on the pool's
                                masks it scores below the tiny DINO, see the README)
    run.yaml                 a `namedmask run` config of the whole pipeline on this world

Every step is skipped when its output exists with the same settings, and the two trainings
resume from their last saved step when interrupted. <out>/seed-<N> is taken like every stage's
output folder (namedmask.io.output_folder: a folder of other files, or one symlinked out of
<out>, is refused; one writer at a time; a killed run's temporaries are removed).
`dino={"steps": 0}` trains no DINO: run.yaml then runs saliency on the CLIP tower."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from namedmask import io
from namedmask.config import ToyWorldConfig
from namedmask.errors import InputError

log = logging.getLogger(__name__)

# timm construction of the tiny CLIP's image tower (nm-toy vision_cfg): CLIP puts a LayerNorm
# before the blocks and has no patch-embedding bias (timm: pre_norm=True).
CLIP_TOWER_VIT = "vit_base_patch16_224"
CLIP_TOWER_KWARGS = {"img_size": 96, "embed_dim": 96, "depth": 3, "num_heads": 3, "pre_norm": True}


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def build_toy_world(cfg: ToyWorldConfig, progress: bool = True) -> Path:
    """Builds (or finds) the world and both models; returns <out>/seed-<N>."""
    from namedmask.toy.world import read_captions, write_world
    from namedmask.toy.clip import ClipTrainConfig, load_images, train_clip
    from namedmask.toy.dino import DinoTrainConfig, train_dino

    from namedmask.runtime import configure_threads

    threads = configure_threads(cfg.threads)  # an explicit setting (default 2): the same bits on every machine
    log.info("toy world: %d torch threads (%s)", threads["intra_op"], threads["source"])
    root = io.inside(cfg.out, seed_dir(".", cfg.seed))  # OUT/seed-N symlinked out of OUT: refused
    with io.output_folder(root, "toy-world", legacy=("run.yaml", "world/world.json")):  # owned, locked, cleaned
        world = write_world(root / "world", cfg.seed, cfg.size, progress)
        pairs = read_captions(world)
        clip_file = train_clip(pairs, root / "clip", ClipTrainConfig(**{"seed": cfg.seed, **cfg.clip}), progress)
        clip_tower_to_dino_layout(clip_file, root / "clip_tower" / "dino_layout.pth")
        if cfg.trains_dino:
            train_dino(load_images([p for p, _ in pairs]), root / "dino",
                       DinoTrainConfig(**{"seed": cfg.seed, **cfg.dino}), progress)
        write_run_config(root, "dino" if cfg.trains_dino else "clip_tower")
    return root


def clip_tower_to_dino_layout(clip_file: Path, out: Path) -> Path:
    """The image tower of an open_clip ViT checkpoint as a flat timm/DINO state dict (timm's own
    OpenAI-CLIP key conversion; the projection to the joint space is dropped like DINO's head)."""
    from timm.models.vision_transformer import _convert_openai_clip

    from namedmask.models.dino import build_vit

    if out.exists() and out.stat().st_mtime >= clip_file.stat().st_mtime:
        return out
    sd = _convert_openai_clip(torch.load(clip_file, map_location="cpu", weights_only=True), None)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    build_vit(CLIP_TOWER_VIT, **CLIP_TOWER_KWARGS).load_state_dict(sd)  # fails loudly if the layout drifts
    io.save_torch(sd, out)
    return out


def saliency_settings(root: Path, backbone: str = "clip_tower") -> dict:
    """The `saliency` section of a run config for one of the toy backbones."""
    from namedmask.toy.dino import VIT_KWARGS, VIT_NAME

    if backbone == "dino":
        return {"dino": VIT_NAME, "dino_weights": str(root / "dino" / "dino_toy_pretrain.pth"),
                "vit_kwargs": dict(VIT_KWARGS)}
    if backbone == "clip_tower":
        return {"dino": CLIP_TOWER_VIT, "dino_weights": str(root / "clip_tower" / "dino_layout.pth"),
                "vit_kwargs": dict(CLIP_TOWER_KWARGS)}
    raise InputError(f"backbone must be dino or clip_tower, got {backbone!r}")


def write_run_config(root: Path, backbone: str | None = None) -> Path:
    """<root>/run.yaml: `namedmask run --config <root>/run.yaml` runs NamedMask on this world;
    saliency on `backbone` (dino | clip_tower; None: the one demo.yaml names)."""
    import yaml
    from importlib import resources

    cfg = yaml.safe_load(resources.files("namedmask.configs").joinpath("demo.yaml").read_text())
    world = root.resolve() / "world"
    cfg.update(out=str(root.resolve() / "run"), pool=str(world / "pool"), categories=str(world / "categories.txt"),
               eval_root=str(world / "eval" / "multi"))
    cfg["archive"]["pretrained"] = str(root.resolve() / "clip" / "nm-toy.pt")
    if backbone is None:
        backbone = "dino" if "dino" in Path(cfg["saliency"]["dino_weights"]).parts else "clip_tower"
    cfg["saliency"].update(saliency_settings(root.resolve(), backbone))
    io.write_text(root / "run.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return root / "run.yaml"
