"""The toy world and its tiny foundation models, through the real loading paths: a tiny CLIP
trained briefly on the reduced (ci) world must retrieve the right categories far above chance
via `namedmask build-archive --model nm-toy --pretrained FILE`, so a swapped id or a broken
prompt path fails here; the tiny DINO's checkpoints must load via `saliency --dino-weights`."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.toy import world as toyworld
from namedmask.data.archive import load_archive
from namedmask.toy import ToyWorldConfig, build_toy_world, clip_tower_to_dino_layout, quality, saliency_settings
from namedmask.toy.clip import load_images
from namedmask.toy.dino import (VIT_KWARGS, VIT_NAME, DinoTrainConfig, build_backbone, dino_loss, patch_loss,
                                 train_dino)

CI_CLIP_STEPS = 120


@pytest.fixture(scope="module")
def toy(tmp_path_factory, ci_world):
    """The ci world with a tiny CLIP trained for CI_CLIP_STEPS steps (no DINO)."""
    out = tmp_path_factory.mktemp("toy")
    (out / "seed-0").mkdir()
    (out / "seed-0" / "world").symlink_to(ci_world)  # the session's ci world (conftest), written once
    return build_toy_world(ToyWorldConfig(str(out), seed=0, size="ci", clip={"steps": CI_CLIP_STEPS},
                                          dino={"steps": 0}), progress=False)


def test_render_is_deterministic_and_labels_what_is_visible():
    a = toyworld._scene(np.random.default_rng([3, 1]), 3, toyworld.CATEGORIES)
    b = toyworld._scene(np.random.default_rng([3, 1]), 3, toyworld.CATEGORIES)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    img, lab, cats = a
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and lab.shape == (96, 96)
    assert set(np.unique(lab)) <= set(range(len(cats) + 1)) and (lab > 0).any() and (lab == 0).any()
    c = toyworld._scene(np.random.default_rng([4, 1]), 3, toyworld.CATEGORIES)
    assert not np.array_equal(a[0], c[0])


def test_world_layout_and_held_out_categories(toy):
    world = toy / "world"
    names = [line.split("|")[0].strip() for line in (world / "categories.txt").read_text().splitlines()]
    assert names == [c.name for c in toyworld.NAMED] and not set(names) & set(toyworld.HELD_OUT)
    n = toyworld.SIZES["ci"]
    assert len(list((world / "pool").glob("*.jpg"))) == n["pool"] == len(list((world / "pool_labels").glob("*.png")))
    pairs = toyworld.read_captions(world)
    assert len(pairs) == n["pretrain"] and all(p.is_file() for p, _ in pairs[:5])
    vocabulary = {w for c in toyworld.CATEGORIES for w in toyworld.names_of(c)}
    assert all(any(w in text.split() or w + "." in text for w in vocabulary) for _, text in pairs)
    for split in ("single", "multi"):
        labels = sorted((world / "eval" / split / "labels").glob("*.png"))
        assert len(labels) == n[split]
        counts = [len(set(np.unique(np.asarray(Image.open(p)))) - {0}) for p in labels]
        assert all(1 <= c <= len(toyworld.NAMED) for c in counts)
        assert max(counts) == 1 if split == "single" else min(counts) >= 2
    assert len(list((world / "eval" / "all" / "images").glob("*.jpg"))) == n["single"] + n["multi"]
    # Same seed, same size: left as it is; another seed in the same folder: a clear error.
    assert toyworld.write_world(world, 0, "ci", progress=False) == world
    with pytest.raises(ValueError, match="seed 0"):
        toyworld.write_world(world, 1, "ci", progress=False)


def test_tiny_clip_archive_through_build_archive_is_far_above_chance(toy, tmp_path):
    world = toy / "world"
    out = tmp_path / "archive"
    res = CliRunner().invoke(cli, ["build-archive", "--pool", str(world / "pool"), "--categories",
                                   str(world / "categories.txt"), "--out", str(out), "--model", "nm-toy",
                                   "--pretrained", str(toy / "clip" / "nm-toy.pt"), "--k", "10"])
    assert res.exit_code == 0, res.output
    archive = load_archive(out / "archive.json")
    assert archive.class_names == ["background", *(c.name for c in toyworld.NAMED)]
    prec = quality.archive_precision(out / "archive.json", world)
    chance = quality.chance_precision(world)
    assert 0.05 < chance < 0.15
    # Measured at 120 steps: see the README's toy-world section; a swapped id gives ~chance.
    assert np.mean(list(prec.values())) >= 0.5, prec
    acc = quality.zero_shot_accuracy("nm-toy", str(toy / "clip" / "nm-toy.pt"), world / "eval" / "single")
    assert acc >= 3 / len(toyworld.NAMED), acc


def test_clip_tower_converts_to_the_dino_layout_saliency_loads(toy, tmp_path):
    from namedmask.toy import CLIP_TOWER_KWARGS, CLIP_TOWER_VIT

    path = toy / "clip_tower" / "dino_layout.pth"
    assert clip_tower_to_dino_layout(toy / "clip" / "nm-toy.pt", path) == path
    sd = torch.load(path, weights_only=True)
    assert "blocks.0.attn.qkv.weight" in sd and "norm_pre.weight" in sd and not any(k.startswith("head") for k in sd)
    from namedmask.models.dino import create_dino

    vit = create_dino(CLIP_TOWER_VIT, path, **CLIP_TOWER_KWARGS)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_dino_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    s, t, c = torch.randn(3 * 2, 5), torch.randn(2 * 2, 5), torch.randn(1, 5)
    got = dino_loss(s, t, c, n_crops=3, t_temp=0.04, s_temp=0.1)
    tq = torch.softmax((t - c) / 0.04, -1).chunk(2)
    sv = torch.log_softmax(s / 0.1, -1).chunk(3)
    want = sum(-(tq[i] * sv[v]).sum(-1).mean() for i in range(2) for v in range(3) if v != i) / 4
    torch.testing.assert_close(got, want)


def test_patch_loss_matches_a_hand_computation_on_masked_patches_only():
    torch.manual_seed(1)
    s, t, c = torch.randn(2, 6, 5), torch.randn(2, 6, 5), torch.randn(1, 1, 5)
    masks = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = patch_loss(s, t, c, masks, t_temp=0.04, s_temp=0.1)
    q = torch.softmax((t[0] - c[0]) / 0.04, -1)
    ce = -(q * torch.log_softmax(s[0] / 0.1, -1)).sum(-1)
    torch.testing.assert_close(got, (ce[0] + ce[2]) / 2 / 2)  # view 2 has no masked patch: it adds 0


def test_a_short_dino_schedule_learns(toy, tmp_path):
    """The shipped recipe at a CI size (16 steps of batch 8, 64/32 px crops) against the same
    run with lr 0 (same batches, same centring): the DINO loss, which is not monotonic (the
    teacher and the centre move too), ends far lower, and the teacher's TokenCut keys move
    away from the initialisation. Measured: last-8 mean 3.24 vs 4.92 for lr 0."""
    from namedmask.models.dino import create_dino, last_layer_keys
    from namedmask.toy.dino import MEAN, STD

    images = load_images([p for p, _ in toyworld.read_captions(toy / "world")[:128]])
    steps, runs = 16, {}
    for lr in (DinoTrainConfig.lr, 0.0):
        cfg = DinoTrainConfig(steps=steps, batch_size=8, global_size=64, local_size=32, warmup=4, lr=lr,
                              save_every=steps)
        runs[lr] = train_dino(images, tmp_path / f"lr{lr}", cfg, progress=False)
    losses = {lr: json.loads((f.parent / "train.json").read_text())["losses"] for lr, f in runs.items()}
    assert all(len(v) == steps for v in losses.values())
    trained, control = (np.mean(v[-8:]) for v in losses.values())
    assert trained < control - 0.5, losses
    x = (images[:4].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        before = last_layer_keys(build_backbone().eval(), x)[0]
    after = last_layer_keys(create_dino(VIT_NAME, runs[DinoTrainConfig.lr], **VIT_KWARGS), x)[0]
    assert ((after - before).norm() / before.norm()).item() > 0.01


def test_ibot_patch_loss_option_trains_and_loads(toy, tmp_path):
    """patch_weight > 0 (iBOT's masked-patch loss): its extra heads and mask token are saved
    under head.*, so both official layouts still load into the plain ViT."""
    from namedmask.models.dino import create_dino

    images = load_images([p for p, _ in toyworld.read_captions(toy / "world")[:16]])
    flat = train_dino(images, tmp_path / "dino", DinoTrainConfig(steps=2, batch_size=4, global_size=64, local_size=32,
                                                                 patch_weight=1.0, mask_ratio=0.5, save_every=1),
                      progress=False)
    ckpt = torch.load(tmp_path / "dino" / "checkpoint.pth", weights_only=True)
    assert "head.mask_token" in ckpt["teacher"] and any(k.startswith("head.patch.") for k in ckpt["teacher"])
    a = create_dino(VIT_NAME, flat, **VIT_KWARGS)
    b = create_dino(VIT_NAME, tmp_path / "dino" / "checkpoint.pth", **VIT_KWARGS)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dino_checkpoints_load_through_the_saliency_command(toy, tmp_path):
    """A few DINO steps; both official layouts (flat backbone, training checkpoint) load."""
    pairs = toyworld.read_captions(toy / "world")[:16]
    flat = train_dino(load_images([p for p, _ in pairs]), tmp_path / "dino",
                      DinoTrainConfig(steps=2, batch_size=4, local_crops=2, save_every=1), progress=False)
    ckpt = torch.load(tmp_path / "dino" / "checkpoint.pth", weights_only=True)
    assert {"student", "teacher", "optimizer", "step"} <= set(ckpt) and ckpt["step"] == 2
    assert any(k.startswith("module.backbone.") for k in ckpt["student"])
    assert any(k.startswith("head.") for k in ckpt["teacher"])
    from namedmask.models.dino import create_dino

    a, b = create_dino(VIT_NAME, flat, **VIT_KWARGS), create_dino(VIT_NAME, tmp_path / "dino" / "checkpoint.pth",
                                                                   **VIT_KWARGS)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # Through the CLI on an archive of the ci world.
    archive = tmp_path / "archive"
    world = toy / "world"
    res = CliRunner().invoke(cli, ["build-archive", "--pool", str(world / "pool"), "--categories",
                                   str(world / "categories.txt"), "--out", str(archive), "--model", "nm-toy",
                                   "--pretrained", str(toy / "clip" / "nm-toy.pt"), "--k", "2",
                                   "--templates", "simple"])
    assert res.exit_code == 0, res.output
    from namedmask.stages.saliency import SaliencyConfig, run_saliency

    result = run_saliency(SaliencyConfig(archive=str(archive / "archive.json"), out=str(tmp_path / "masks"),
                                         dino=VIT_NAME, dino_weights=str(flat), vit_kwargs=dict(VIT_KWARGS),
                                         short_side=96, refine="none"))
    assert not result.failed and 0 < result.total <= 2 * len(toyworld.NAMED)
    manifest = json.loads((tmp_path / "masks" / "manifest.json").read_text())
    assert manifest["config"]["dino_weights"] == str(flat.resolve())


def test_full_chain_on_the_ci_world_segments_and_names_objects(toy, tmp_path):
    """namedmask run on the ci world with the toy models (the demo config's schedule, K 12):
    retrieval far above chance and a final multi-object mIoU well above the
    all-background level."""
    import yaml

    from namedmask.pipeline import load_run_config, run_pipeline

    cfg = yaml.safe_load((toy / "run.yaml").read_text())
    cfg.update(out=str(tmp_path / "run"), predict_images=[])
    cfg["archive"]["k"] = 12
    cfg["experts"]["train"]["iterations"] = 30
    # saliency on the random-initialised tiny-DINO ViT (the fixture trains no DINO): on the full
    # world it scored 0.636 refined IoU vs 0.594 for the demo's CLIP tower and 0.627 for the
    # trained tiny DINO (README, toy world), and it does not depend on the 120-step CLIP
    cfg["saliency"].update(saliency_settings(toy, "dino"), dino_weights=None, random_weights=True)
    cfg["train"]["iterations"] = 200
    cfg["threads"] = 2  # the numbers below were measured with 2 threads (recorded in .stages/*.json)
    run_pipeline(load_run_config(None, cfg), progress=False)
    prec = quality.archive_precision(tmp_path / "run" / "archive" / "archive.json", toy / "world")
    assert np.mean(list(prec.values())) >= 0.5, prec
    miou = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["miou"]
    floor = quality.all_background_miou(toy / "world" / "eval" / "multi")
    print(f"full chain (ci world): precision {np.mean(list(prec.values())):.3f}, mIoU {miou:.3f}, "
          f"all-background {floor:.3f}")
    assert miou >= floor + 0.1, (miou, floor)
