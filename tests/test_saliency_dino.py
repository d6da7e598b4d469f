"""DINO weights: files in the official DINO layouts (flat backbone file and full training
checkpoint) and timm's layout load into timm's ViT; shape mismatches and offline hubs give
clear errors; random weights only on request."""
import argparse
import logging

import pytest
import torch

from namedmask.models.dino import (DinoWeightsError, build_vit, create_dino, dino_to_timm, read_checkpoint,
                                   resample_pos_embed)

NAME = "vit_small_patch16_224.dino"
TINY = dict(embed_dim=48, depth=2, num_heads=2)


def official_backbone(depth=2, dim=48, patch=16, grid=14, seed=0) -> dict:
    """A random state dict with the keys and shapes of dino_deitsmall16_pretrain.pth
    (written out here from the official vision_transformer.py, not taken from timm)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


def dino_head(seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"head.mlp.0.weight": torch.randn(64, 48, generator=g), "head.last_layer.weight_g": torch.ones(10, 1),
            "head.last_layer.weight_v": torch.randn(10, 8, generator=g)}


def assert_loaded(model, sd):
    own = model.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def test_flat_official_backbone_file_loads(tmp_path):
    sd = official_backbone()
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    model = create_dino(NAME, tmp_path / "dino_deitsmall16_pretrain.pth", **TINY)
    assert_loaded(model, sd)


def test_full_training_checkpoint_loads_the_teacher(tmp_path):
    teacher, student = official_backbone(seed=0), official_backbone(seed=5)
    ckpt = {"teacher": {**{"backbone." + k: v for k, v in teacher.items()}, **dino_head()},
            "student": {**{"module.backbone." + k: v for k, v in student.items()},
                        **{"module." + k: v for k, v in dino_head().items()}},
            "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16)}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    model = create_dino(NAME, tmp_path / "checkpoint.pth", **TINY)
    assert_loaded(model, teacher)
    assert set(dino_to_timm({"student": ckpt["student"]})) == set(student)  # DDP prefixes stripped, head dropped


def test_timm_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = build_vit(NAME, **TINY)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    model = create_dino(NAME, tmp_path / "model.safetensors", **TINY)
    assert_loaded(model, src.state_dict())


def test_position_embedding_is_resampled_to_the_model_grid(tmp_path):
    sd = official_backbone(grid=14)
    torch.save(sd, tmp_path / "w.pth")
    model = create_dino(NAME, tmp_path / "w.pth", img_size=112, **TINY)  # 7x7 grid
    torch.testing.assert_close(model.pos_embed, resample_pos_embed(sd["pos_embed"], (7, 7)))


def test_wrong_checkpoint_names_file_and_keys(tmp_path):
    torch.save(official_backbone(depth=3), tmp_path / "deeper.pth")
    with pytest.raises(DinoWeightsError, match=r"deeper\.pth.*unexpected \[blocks\.2\."):
        create_dino(NAME, tmp_path / "deeper.pth", **TINY)
    with pytest.raises(DinoWeightsError, match="not found"):
        create_dino(NAME, tmp_path / "missing.pth", **TINY)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DinoWeightsError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")


def test_offline_hub_is_a_clear_error_not_a_random_model(monkeypatch):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: never contact the hub
    with pytest.raises(DinoWeightsError, match="--random-weights"):
        create_dino(NAME, **TINY)


def test_random_weights_only_when_asked(caplog):
    with caplog.at_level(logging.WARNING, logger="namedmask.models.dino"):
        model = create_dino("dino_vits16", random_weights=True, **TINY)
    assert "RANDOM weights" in caplog.text
    assert model.patch_embed.patch_size == (16, 16) and model.embed_dim == 48
