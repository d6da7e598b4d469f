"""`namedmask run`: every stage on a tiny generated configuration; every artifact exists and is
well formed; a rerun does no work twice; a stage whose output is gone runs again."""
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.data.archive import load_archive
from namedmask.data.pseudo_masks import load_manifest
from namedmask.data.synthetic import CLASSES, write_dataset
from namedmask import pipeline
from namedmask.config import ConfigError
from namedmask.pipeline import load_run_config, run_pipeline

TINY_DEEPLAB = {"backbone": "resnet10t", "backbone_args": {"channels": [8, 16, 32, 64], "stem_width": 8},
                "aspp_channels": 16, "low_level_channels": 8, "aspp_rates": [1, 2, 3]}
TINY_TRAIN = {"batch_size": 2, "num_workers": 0, "device": "cpu", "log_every": 2, "checkpoint_every": 4,
              "augment": {"crop_size": 48, "scale": [0.8, 1.0]}, "model": TINY_DEEPLAB}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    data = write_dataset(tmp_path_factory.mktemp("data"), pool_per_class=3, eval_images=3)
    out = tmp_path_factory.mktemp("run")
    cfg = load_run_config(None, {
        "out": str(out), "demo": False, "pool": str(data / "pool"), "categories": str(data / "categories.txt"),
        "eval_dataset": "folder", "eval_root": str(data / "eval"),
        "predict_images": [str(data / "eval" / "images" / "0000.jpg")],
        "archive": {"model": "nm-tiny", "pretrained": "random", "k": 3, "batch_size": 8, "shard_size": 16},
        "saliency": {"random_weights": True, "dino": None, "dino_weights": None, "short_side": 64, "batch_size": 4,
                     "refine": "none",
                     "vit_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2}},
        "experts": {"enabled": True, "train": {**TINY_TRAIN, "iterations": 2}},
        "train": {**TINY_TRAIN, "iterations": 4},
    })
    return cfg


@pytest.fixture(scope="module")
def first_run(tiny_config):
    torch.set_num_threads(1)
    return run_pipeline(tiny_config, progress=False)


def test_every_artifact_exists_and_is_well_formed(tiny_config, first_run):
    run = first_run.parent
    html = first_run.read_text()
    assert "RANDOM WEIGHTS" in html and "<img" in html
    archive = load_archive(run / "archive")
    assert archive.class_names == ["background", *CLASSES]
    assert all(len(entries) == 3 for entries in archive.archives.values())
    for folder in ("saliency", "refined"):
        manifest = load_manifest(run / folder)
        assert set(manifest["masks"]) == set(archive.images())
        for entry in manifest["masks"].values():
            mask = np.array(Image.open(run / folder / entry["mask"]))
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert (run / "train" / "model.safetensors").is_file() and (run / "train" / "curves.png").is_file()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and len(metrics["per_class_iou"]) == 4 and 0.0 <= metrics["miou"] <= 1.0
    assert (run / "eval" / "per_class_iou.png").is_file()
    label = np.array(Image.open(run / "predict" / "labels" / "0000.png"))
    assert label.shape == (160, 224) and label.max() < 4
    assert (run / "predict" / "overlays" / "0000.png").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["archive"]["k"] == 3
    for section in ("Category archives", "Saliency", "Refined", "Training", "Evaluation", "Predictions",
                    "Stage timings"):
        assert section in html, section
    # validation on the run's evaluation set, every iterations // 5, drawn beside the loss
    val = [r["iteration"] for r in map(json.loads, (run / "train" / "metrics.jsonl").read_text().splitlines())
           if "val_miou" in r]
    assert val == [1, 2, 3, 4] and "validation mIoU on the run" in html
    assert "TOY MODELS" not in html  # random nm-tiny weights: the random-weights warning says it
    for stage in ("archive", "saliency", "experts", "train", "eval", "predict"):
        assert json.loads((run / ".stages" / f"{stage}.json").read_text())["seconds"] >= 0


def test_rerun_does_no_work_twice(tiny_config, first_run, monkeypatch):
    run = first_run.parent
    calls = []
    monkeypatch.setattr(pipeline, "build_archive", lambda *a, **k: calls.append("archive"))
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: calls.append("train"))
    mtime = (run / "train" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(tiny_config, progress=False)
    assert calls == [] and (run / "train" / "model.safetensors").stat().st_mtime_ns == mtime
    assert "none (all done before)" in first_run.read_text()


def test_a_stage_whose_output_is_gone_runs_again(tiny_config, first_run):
    run = first_run.parent
    (run / "eval" / "metrics.json").unlink()
    run_pipeline(tiny_config, progress=False)
    assert (run / "eval" / "metrics.json").is_file()
    assert "eval" in first_run.read_text().split("stages run now</td><td>")[1].split("<")[0]


def test_bad_configs_say_which_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown config key 'pools'"):
        load_run_config(None, {"pools": "x"})
    with pytest.raises(ConfigError, match="unknown config key 'train.optim.lr'"):
        load_run_config(None, ["train.optim.lr=1"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_run_config(None, {"stages": ["archive", "dance"]})
    monkeypatch.delenv("IMAGENET_TRAIN", raising=False)
    with pytest.raises(ConfigError, match="IMAGENET_TRAIN"):
        load_run_config("voc")
    bad = tmp_path / "bad.yaml"
    bad.write_text("archive: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_run_config(bad)
    res = CliRunner().invoke(cli, ["run", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0 and "missing.yaml" in res.output


def test_paper_configs_load_with_their_variables(monkeypatch):
    for var in ("IMAGENET_TRAIN", "VOC_ROOT", "COCO_ROOT", "COCA_ROOT", "CITYSCAPES_ROOT",
                "SELFMASK_CHECKPOINT", "DINO_RESNET50"):
        monkeypatch.setenv(var, f"/data/{var.lower()}")
    for name in ("voc", "coco-object", "coca", "cityscapes-object"):
        cfg = load_run_config(name)
        assert cfg.eval_dataset == name and cfg.archive.model == "ViT-L-14-336" and cfg.archive.k == 500
        assert cfg.saliency.method == "selfmask" and cfg.train.model.pretrained == "/data/dino_resnet50"
        assert cfg.experts.enabled and cfg.experts.train.iterations == 5000
    assert "demo" in pipeline.builtin_configs()


def test_one_config_path_with_deep_merge(tmp_path, caplog):
    """defaults ⊕ YAML ⊕ --set, merged deeply: a nested --set keeps the YAML's siblings."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {iterations: 7, optim: {lr_head: 0.5}}\nexperts: {enabled: true, groups: 2}\n")
    cfg = load_run_config(path, ["train.optim.lr_backbone=0.25", "experts.train.batch_size=4"])
    assert (cfg.train.iterations, cfg.train.optim.lr_head, cfg.train.optim.lr_backbone) == (7, 0.5, 0.25)
    assert cfg.train.optim.weight_decay == 2e-4 and cfg.train.batch_size == 16   # defaults stay
    assert (cfg.experts.groups, cfg.experts.train.batch_size, cfg.experts.train.iterations) == (2, 4, 5000)
    res = CliRunner().invoke(cli, ["config", "show", "--config", str(path), "--set", "train.optim.lr_backbone=0.25"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown["train"]["optim"] == {**shown["train"]["optim"], "lr_head": 0.5, "lr_backbone": 0.25}
    assert shown["experts"]["groups"] == 2 and shown["stages"] == list(pipeline.STAGES)
    res = CliRunner().invoke(cli, ["config", "show", "--for", "train", "--set", "iterations=3"])
    assert res.exit_code == 0 and yaml.safe_load(res.output)["iterations"] == 3


def test_old_refine_section_still_loads(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("refine: {method: experts, groups: 3}\nstages: [archive, refine, train]\n")
    with caplog.at_level("WARNING"):
        cfg = load_run_config(path)
    assert cfg.experts.enabled and cfg.experts.groups == 3 and cfg.stages == ["archive", "experts", "train"]
    assert "deprecated" in caplog.text
    path.write_text("refine: {method: bilateral}\n")
    with pytest.raises(ConfigError, match="refine.method"):
        load_run_config(path)
