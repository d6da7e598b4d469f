"""`namedmask saliency` end to end on real pool photos with random tiny models: output
format (pseudo-mask schema), resumption (a rerun does no work, an interrupted run
continues and ends identical to an uninterrupted one), failures listed, stale settings
refused, the bilateral-solver contract, the CLI and the overlay report."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from namedmask import io, ops
from namedmask.cli import cli
from namedmask.data.archive import Archive
from namedmask.data.pseudo_masks import load_manifest, mask_paths
from namedmask.stages import saliency as stage
from namedmask.stages.saliency import SaliencyConfig, SaliencyError, mask_entry, run_saliency

TINY = dict(embed_dim=48, depth=2, num_heads=2)
HAS_SOLVER = hasattr(ops, "bilateral_solve")


@pytest.fixture
def archive(tmp_path, pool_dir):
    """An archive.json over 5 real pool photos in two categories (one image in both)."""
    photos = sorted(p.name for p in pool_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:5]
    assert len(photos) == 5
    arch = Archive(pool_dir, {"cat": 1, "dog": 2},
                   {"cat": [{"path": p, "score": 0.3} for p in photos[:3]],
                    "dog": [{"path": p, "score": 0.2} for p in photos[2:]]},
                   {p: ("cat" if i < 3 else "dog") for i, p in enumerate(photos)})
    path = tmp_path / "archive" / "archive.json"
    io.write_json(path, arch.to_dict())
    return path


def config(archive, out, **kw) -> SaliencyConfig:
    base = dict(refine="none", short_side=48, batch_size=2, random_weights=True, vit_kwargs=TINY)
    return SaliencyConfig(str(archive), str(out), **{**base, **kw})


def read_masks(out) -> dict:
    return {k: np.array(Image.open(p)) for k, p in mask_paths(out).items()}


def test_tokencut_writes_the_pseudo_mask_schema(archive, tmp_path, pool_dir):
    out = tmp_path / "masks"
    result = run_saliency(config(archive, out))
    assert result.computed == 5 and not result.failed
    manifest = load_manifest(out)
    assert manifest["method"] == "tokencut" and manifest["refine"] == "none"
    assert manifest["archive"] == os.path.join("..", "archive", "archive.json")
    assert manifest["config"]["dino"] == "vit_small_patch16_224.dino"
    assert json.loads((out / "config.json").read_text())["short_side"] == 48
    masks = read_masks(out)
    assert len(masks) == 5
    for rel, mask in masks.items():
        with Image.open(pool_dir / rel) as img:
            native = img.size
        with Image.open(out / manifest["masks"][rel]["mask"]) as png:
            assert png.mode == "L"
        assert mask.dtype == np.uint8 and (mask.shape[1], mask.shape[0]) == native
        assert set(np.unique(mask)) <= {0, 1}
        entry = manifest["masks"][rel]
        assert entry == mask_entry(rel, mask)
        assert entry["mask"] == f"masks/{rel.rsplit('.', 1)[0]}.png"


def test_mask_flags():
    assert mask_entry("a.jpg", np.zeros((4, 5), np.uint8))["flag"] == "empty"
    assert mask_entry("a.jpg", np.ones((4, 5), np.uint8))["flag"] == "full"
    e = mask_entry("d/a.JPEG", np.array([[0, 1], [1, 1]], np.uint8))
    assert e == {"mask": "masks/d/a.png", "fg_fraction": 0.75, "flag": None}


def test_rerun_does_no_work(archive, tmp_path, monkeypatch):
    out = tmp_path / "masks"
    run_saliency(config(archive, out))
    stamps = {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}

    def no_model(cfg):
        raise AssertionError("a finished folder must not even load the model")

    monkeypatch.setattr(stage, "build_model", no_model)
    result = run_saliency(config(archive, out))
    assert result.computed == 0 and result.total == 5 and not result.failed
    assert {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == stamps


def test_interrupted_run_continues_to_the_same_result(archive, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_saliency(config(archive, reference, batch_size=1))

    out = tmp_path / "interrupted"
    real_build = stage.build_model
    calls = {"n": 0}

    def build_flaky(cfg):
        model = real_build(cfg)
        predict = model.predict

        def predict_then_die(x):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # Ctrl-C / kill in the middle of the run
            return predict(x)

        model.predict = predict_then_die
        return model

    monkeypatch.setattr(stage, "build_model", build_flaky)
    with pytest.raises(KeyboardInterrupt):
        run_saliency(config(archive, out, batch_size=1))
    assert len(load_manifest(out)["masks"]) == 2
    # A kill between writing a mask and the manifest: the mask is on disk, not listed.
    manifest = load_manifest(out)
    dropped = sorted(manifest["masks"])[0]
    del manifest["masks"][dropped]
    io.write_json(out / "manifest.json", manifest)

    monkeypatch.setattr(stage, "build_model", real_build)
    result = run_saliency(config(archive, out, batch_size=1))
    assert result.computed == 3 and result.recovered == 1 and not result.failed
    got, want = read_masks(out), read_masks(reference)
    assert sorted(got) == sorted(want)
    for rel in want:
        np.testing.assert_array_equal(got[rel], want[rel], err_msg=rel)


def test_undecodable_image_is_listed_and_retried(archive, tmp_path):
    data = json.loads(archive.read_text())
    data["archives"]["dog"].append({"path": "missing_photo.jpg", "score": 0.1})
    io.write_json(archive, data)
    out = tmp_path / "masks"
    result = run_saliency(config(archive, out))
    assert [f["path"] for f in result.failed] == ["missing_photo.jpg"]
    assert load_manifest(out)["failed"][0]["path"] == "missing_photo.jpg"
    assert len(load_manifest(out)["masks"]) == 5
    again = run_saliency(config(archive, out))  # failures are retried, finished masks are not
    assert again.computed == 0 and [f["path"] for f in again.failed] == ["missing_photo.jpg"]


def test_other_settings_are_refused(archive, tmp_path):
    out = tmp_path / "masks"
    run_saliency(config(archive, out))
    with pytest.raises(SaliencyError, match="short_side: 48 -> 64"):
        run_saliency(config(archive, out, short_side=64))
    with pytest.raises(SaliencyError, match="corner_rule: False -> True"):
        run_saliency(config(archive, out, corner_rule=True))
    # a manifest written before corner_rule existed was made without it: resuming is allowed
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["corner_rule"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    run_saliency(config(archive, out))
    with pytest.raises(SaliencyError, match="corner_rule: False -> True"):
        run_saliency(config(archive, out, corner_rule=True))


def test_selfmask_from_a_checkpoint(archive, tmp_path):
    from namedmask.models.dino import build_vit
    from namedmask.models.saliency import SelfMask, save_selfmask

    torch.manual_seed(0)
    save_selfmask(SelfMask(build_vit("vit_small_patch8_224.dino", **TINY), 4, 1), tmp_path / "sm.pt",
                  encoder_kwargs=TINY)
    out = tmp_path / "sm_masks"
    result = run_saliency(config(archive, out, method="selfmask", checkpoint=str(tmp_path / "sm.pt"),
                                 random_weights=False, vit_kwargs={}))
    assert result.computed == 5
    assert all(set(np.unique(m)) <= {0, 1} for m in read_masks(out).values())
    with pytest.raises(SaliencyError, match="--checkpoint"):
        run_saliency(config(archive, tmp_path / "other", method="selfmask", random_weights=False))


@pytest.mark.skipif(HAS_SOLVER, reason="namedmask.ops.bilateral_solve exists: the refined path is tested instead")
def test_bilateral_solver_default_needs_the_op(archive, tmp_path):
    with pytest.raises(SaliencyError, match="bilateral_solve.*--refine none"):
        run_saliency(config(archive, tmp_path / "m", refine="bilateral-solver"))


@pytest.mark.skipif(not HAS_SOLVER, reason="namedmask.ops.bilateral_solve is not on this branch yet")
def test_bilateral_solver_refinement(archive, tmp_path):
    out = tmp_path / "refined"
    result = run_saliency(config(archive, out, refine="bilateral-solver"))
    assert result.computed == 5 and not result.failed
    assert all(set(np.unique(m)) <= {0, 1} for m in read_masks(out).values())


def test_bilateral_refiner_calls_the_op_contract(monkeypatch):
    seen = {}

    def fake_solve(image, target, confidence=None, *, preset="namedmask"):
        seen.update(image=image, target=target, preset=preset)
        return np.where(target.numpy() > 0, 0.7, 0.2).astype(np.float32)

    monkeypatch.setattr(ops, "bilateral_solve", fake_solve, raising=False)
    refine = stage.bilateral_refiner("bilateral-solver")
    image = torch.zeros(4, 6, 3, dtype=torch.uint8)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1:3, 2:5] = True
    out = refine(image, mask)
    assert seen["preset"] == "namedmask" and seen["target"].dtype == torch.float32
    assert seen["image"].shape == (4, 6, 3) and seen["image"].dtype == torch.uint8
    assert torch.equal(out, mask)  # threshold 0.5


def test_cli_with_report(archive, tmp_path):
    out = tmp_path / "cli_masks"
    runner = CliRunner()
    res = runner.invoke(cli, ["saliency", "--archive", str(archive.parent), "--out", str(out), "--refine", "none",
                              "--random-weights", "--short-side", "32", "--report"])
    assert res.exit_code == 0, res.output
    assert "5 images: 5 computed" in res.output
    sheets = sorted(p.name for p in (out / "report").iterdir())
    assert sheets == ["0001_cat.png", "0002_dog.png"]
    with Image.open(out / "report" / "0001_cat.png") as sheet:
        assert sheet.mode == "RGB" and sheet.height == 46 + 160  # title and legend lines over 160 px tiles
    bad = runner.invoke(cli, ["saliency", "--archive", str(archive), "--out", str(tmp_path / "x"),
                              "--method", "selfmask", "--refine", "none"])
    assert bad.exit_code != 0 and "--checkpoint" in bad.output


def test_images_sharing_a_mask_path_are_listed_not_overwritten(archive, tmp_path, pool_dir):
    import shutil

    photo = json.loads(archive.read_text())["archives"]["cat"][0]["path"]
    twin_root = tmp_path / "pool"
    twin_root.mkdir()
    shutil.copy(pool_dir / photo, twin_root / "same.jpg")
    Image.open(pool_dir / photo).save(twin_root / "same.png")
    arch = Archive(twin_root, {"cat": 1}, {"cat": [{"path": "same.jpg", "score": 1.0}, {"path": "same.png", "score": 0.5}]})
    io.write_json(tmp_path / "twin.json", arch.to_dict())
    result = run_saliency(config(tmp_path / "twin.json", tmp_path / "twin_masks"))
    assert result.computed == 1
    assert [f["path"] for f in result.failed] == ["same.png"] and "same.jpg" in result.failed[0]["reason"]
    assert list(load_manifest(tmp_path / "twin_masks")["masks"]) == ["same.jpg"]
