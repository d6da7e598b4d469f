"""`namedmask train`: config layering, augmentation, labels from archive ids, a learning-signal
test on a procedural world, resumption after interruption, copy-paste, model-based eval."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from namedmask import ops
from namedmask.cli import cli
from namedmask.config import AugmentConfig, ConfigError, ExpertsConfig, TrainConfig, load_config, to_dict
from namedmask.data.augment import IMAGENET_MEAN, IMAGENET_STD, train_transform
from namedmask.data.labelmaps import read_label_map
from namedmask.models.deeplab import load_segmenter
from namedmask.data.training import TrainError, TrainSamples, archive_items
from namedmask.report import read_metrics
from namedmask.stages.evaluate import evaluate_checkpoint
from namedmask.training import apply_copy_paste, state_digest, train
from synthetic import CLASSES, one_thread, tiny_train_overrides, write_archive, write_labeled_folder

HAS_COPY_PASTE = hasattr(ops, "random_copy_paste")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    archive, masks, truth = write_archive(root)
    val = write_labeled_folder(root / "val")
    return {"root": root, "archive": archive, "masks": masks, "truth": truth, "val": val}


def config(world, out, iterations, *extra, batch=8, crop=40) -> TrainConfig:
    return load_config(TrainConfig, overrides=tiny_train_overrides(iterations, batch, crop) + list(extra),
                       archive=str(world["archive"]), masks=str(world["masks"]), out=str(out))


# ------------------------------------------------------------------------------------ config

def test_defaults_are_namedmask_recipe():
    c = TrainConfig()
    assert (c.iterations, c.batch_size, c.augment.crop_size, c.augment.scale) == (20000, 16, 384, (0.1, 1.0))
    assert (c.optim.lr_head, c.optim.lr_backbone, c.optim.weight_decay, c.optim.poly_power) == (5e-4, 5e-5, 2e-4, 0.9)
    assert (c.copy_paste.p, c.model.backbone, c.model.output_stride, c.model.bn_momentum) == (0.5, "resnet50", 8, 0.01)
    assert c.augment.jitter == (0.8, 0.8, 0.8, 0.2) and (c.augment.jitter_p, c.augment.grayscale_p) == (0.8, 0.2)
    e = ExpertsConfig()
    assert (e.train.iterations, e.train.batch_size, e.train.copy_paste.p, e.groups) == (5000, 8, 0.0, None)


def test_config_file_then_overrides_then_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iterations: 100\noptim: {lr_head: 1.0e-3, lr_backbone: 2e-4}\naugment: {scale: [0.5, 1.0]}\n")
    c = load_config(TrainConfig, path, ["optim.lr_head=3e-3", "copy_paste.p=0"], iterations=7, out=None)
    assert c.iterations == 7 and c.optim.lr_head == 3e-3 and c.optim.lr_backbone == 2e-4
    assert c.augment.scale == (0.5, 1.0) and c.copy_paste.p == 0.0 and c.optim.weight_decay == 2e-4
    assert load_config(ExpertsConfig, overrides=["train.batch_size=4"]).train.iterations == 5000
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr'"):
        load_config(TrainConfig, overrides=["optim.lr=1"])
    with pytest.raises(ConfigError, match="iterations: expected int"):
        load_config(TrainConfig, overrides=["iterations=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, overrides=["iterations"])


# ------------------------------------------------------------------------------ augmentation

def test_train_transform_pads_crops_and_is_deterministic():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    image = torch.full((3, 40, 30), 200, dtype=torch.uint8)
    image[0] = 10
    label = torch.zeros(40, 30, dtype=torch.uint8)
    label[10:20, 5:15] = 2
    cfg = AugmentConfig(crop_size=64, scale=(0.5, 0.5), jitter_p=0, grayscale_p=0, blur_p=0, hflip_p=0)
    x, y = train_transform(image, label, cfg, g())
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.shape == (64, 64) and y.dtype == torch.uint8
    assert set(torch.unique(y).tolist()) == {0, 2, 255}
    assert int((y != 255).sum()) == 20 * 15                      # the scaled image, the rest is pad
    pad = x[:, y == 255]                                          # mean colour, ImageNet-normalised
    want = (torch.tensor([10, 200, 200]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(pad, want[:, None].expand_as(pad), atol=1e-5)
    full = AugmentConfig(crop_size=24)
    a, b = train_transform(image, label, full, g()), train_transform(image, label, full, g())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(torch.unique(a[1]).tolist()) <= {0, 2, 255}


def test_labels_use_the_archive_ids(world, tmp_path):
    items, names = archive_items(world["archive"], world["masks"])
    assert names == ["background", "disc", "square", "triangle"]
    assert {it.class_id for it in items if "/square/" in str(it.image)} == {CLASSES["square"]}
    cfg = config(world, tmp_path, 1, "augment.scale=[1.0, 1.0]", "augment.blur_p=0", "augment.hflip_p=0", crop=64)
    samples = TrainSamples(items, cfg)
    image, label, index = samples[5]
    item = items[index]
    mask = torch.from_numpy(np.array(Image.open(item.mask)))
    assert torch.equal(label, torch.where(mask == 1, item.class_id, 0).to(torch.uint8))
    binary, names = archive_items(world["archive"], world["masks"], categories=["square"], binary=True)
    assert names == ["background", "foreground"] and {it.class_id for it in binary} == {1} and len(binary) == 12


# --------------------------------------------------------------------------- learning signal

@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = config(world, out, 60, "val.dataset=folder", f"val.root={world['val']}", "val.every=30")
    train(cfg, progress=False)
    return out


def chance_mious(val_root, n=4, seed=0) -> dict:
    """mIoU of predictors that know nothing about the image: uniform random labels, all background."""
    rng = np.random.default_rng(seed)
    out = {"random": np.zeros((n, n), np.int64), "background": np.zeros((n, n), np.int64)}
    for path in sorted((val_root / "labels").glob("*.png")):
        gt = read_label_map(path).astype(np.int64)
        for name, pred in (("random", rng.integers(0, n, gt.shape)), ("background", np.zeros_like(gt))):
            out[name] += np.bincount(gt.ravel() * n + pred.ravel(), minlength=n * n).reshape(n, n)
    return {k: ops.miou(torch.from_numpy(v)).miou for k, v in out.items()}


def test_learning_signal_far_above_chance(trained, world):
    """60 iterations of a tiny DeepLabv3+ on 36 archive images with true masks, scored on 12
    held-out images. Chance (measured): uniform random labels ~0.09 mIoU, all-background ~0.2.
    Required: mIoU >= 0.5 and every object class IoU >= 0.3 (needs shape/colour, not priors)."""
    report = evaluate_checkpoint(trained, "folder", world["val"], device="cpu", progress=False)
    chance = chance_mious(world["val"])
    assert chance["random"] < 0.15 and chance["background"] < 0.25
    assert report.num_images == 12 and report.class_names == ["background", "disc", "square", "triangle"]
    assert report.metrics.miou >= 0.5, (report.table(), chance)
    assert min(report.metrics.per_class_iou[1:]) >= 0.3, report.table()
    losses = [r["loss"] for r in read_metrics(trained) if "loss" in r]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_logged_loss_is_the_mean_over_its_window(world, tmp_path):
    """metrics.jsonl's loss is the mean of the iterations since the last log or checkpoint:
    the same 8 iterations logged every iteration and every 4 (training is identical: logging
    does not touch it), and with a checkpoint at 2 the window restarts there."""
    every = {}
    for log_every, ckpt in ((1, 8), (4, 8), (4, 2)):
        out = tmp_path / f"log{log_every}_ckpt{ckpt}"
        train(config(world, out, 8, f"log_every={log_every}", f"checkpoint_every={ckpt}"), progress=False)
        every[log_every, ckpt] = [(r["iteration"], r["loss"]) for r in read_metrics(out) if "loss" in r]
    per_step = dict(every[1, 8])
    assert [i for i, _ in every[4, 8]] == [4, 8]
    for it, loss in every[4, 8]:
        assert loss == pytest.approx(np.mean([per_step[i] for i in range(it - 3, it + 1)]), rel=1e-5)
    # checkpoints at 2, 4, 6, 8: the window at each log (4, 8) holds the 2 iterations after a checkpoint
    for it, loss in every[4, 2]:
        assert loss == pytest.approx(np.mean([per_step[it - 1], per_step[it]]), rel=1e-5)


def test_run_directory_contents(trained):
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["iterations"] == 60 and cfg["model"]["backbone"] == "resnet10t" and cfg["copy_paste"]["p"] == 0.0
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 60 and set(state) >= {"model", "optimizer", "scheduler", "rng", "config"}
    assert state["scheduler"]["last_epoch"] == 60
    meta = json.loads((trained / "model.json").read_text())
    assert meta["class_names"] == ["background", "disc", "square", "triangle"] and meta["iteration"] == 60
    records = read_metrics(trained)
    assert [r["iteration"] for r in records if "loss" in r] == list(range(1, 61))
    assert [r["iteration"] for r in records if "val_miou" in r] == [30, 60]
    assert (trained / "curves.png").stat().st_size > 1000 and (trained / "model.safetensors").is_file()
    lr = [r["lr_head"] for r in records if "loss" in r]
    assert lr[0] == pytest.approx(1e-2 * (1 - 1 / 60) ** 0.9) and lr[-1] == pytest.approx(1e-6)
    assert json.loads((trained / "summary.json").read_text())["world_size"] == 1


def test_eval_cli_with_checkpoint(trained, world, tmp_path):
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(trained), "--dataset", "folder", "--root",
                                   str(world["val"]), "--device", "cpu", "--out", str(out),
                                   "--overlays", str(tmp_path / "ov")])
    assert res.exit_code == 0, res.output
    assert "triangle" in res.output and "mIoU" in res.output
    data = json.loads(out.read_text())
    assert set(data) >= {"miou", "pixel_acc", "mean_acc", "per_class_iou", "per_class_acc", "num_images",
                         "num_classes", "class_names", "skipped", "confusion_matrix"}
    assert data["num_images"] == 12 and np.array(data["confusion_matrix"]).sum() == 12 * 64 * 64
    assert len(list((tmp_path / "ov").glob("*.png"))) == 4
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(trained)])
    assert res.exit_code != 0 and "--dataset" in res.output


# ------------------------------------------------------------------------------- resumption

class Killed(Exception):
    pass


def test_resume_after_interruption_continues_identically(world, tmp_path):
    """Run B is killed after iteration 5 (last checkpoint at 4) and resumed; it must restart at
    iteration 5, see the same images as the uninterrupted run A, and end bit-identical."""
    extra = ("checkpoint_every=2", "model.dropout=0.5")
    train(config(world, tmp_path / "a", 7, *extra, batch=2, crop=32), progress=False)

    def kill(i):
        if i == 5:
            raise Killed

    with pytest.raises(Killed):
        train(config(world, tmp_path / "b", 7, *extra, batch=2, crop=32), on_iteration=kill, progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    train(config(world, tmp_path / "b", 7, *extra, batch=2, crop=32), progress=False)

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["iteration"] for r in b] == list(range(1, 8))  # iteration 5 redone once, log reads as one run
    for ra, rb in zip(a, b):
        assert rb["images"] == ra["images"] and rb["loss"] == ra["loss"]
    from safetensors.torch import load_file
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a finished run is not retrained; a different config in the same folder is refused
    train(config(world, tmp_path / "b", 7, *extra, batch=2, crop=32), progress=False)
    assert len(read_metrics(tmp_path / "b")) == 7
    with pytest.raises(TrainError, match="different config"):
        train(config(world, tmp_path / "b", 7, "checkpoint_every=2", batch=2, crop=32), progress=False)


@pytest.mark.parametrize("stopped_in", ["save_segmenter", "save_torch"])
def test_a_stop_inside_the_last_checkpoint_step_resumes_identically(world, tmp_path, monkeypatch, stopped_in):
    """A stop between the final weights and the final checkpoint (a kill there made the rerun say
    "already trained" and keep the previous iteration's weights) ends like an uninterrupted run."""
    import namedmask.training as training
    cfg = lambda out: config(world, out, 4, "checkpoint_every=1", batch=2, crop=32)  # noqa: E731
    train(cfg(tmp_path / "whole"), progress=False)
    write = getattr(training.io, stopped_in) if stopped_in == "save_torch" else training.save_segmenter
    calls = []

    def stop_on_last(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:   # the last iteration's write: stop there
            raise Killed
        return write(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(training.io if stopped_in == "save_torch" else training, stopped_in, stop_on_last)
        with pytest.raises(Killed):
            train(cfg(tmp_path / "stopped"), progress=False)
    train(cfg(tmp_path / "stopped"), progress=False)
    untimed = lambda run: [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]  # noqa: E731
    assert untimed(tmp_path / "stopped") == untimed(tmp_path / "whole")
    assert (tmp_path / "stopped" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_bad_inputs(world, tmp_path):
    with pytest.raises(TrainError, match="at least 2"):
        train(config(world, tmp_path / "r", 1, batch=1), progress=False)
    with pytest.raises(ValueError, match="none: not found"):
        train(dataclasses.replace(config(world, tmp_path / "r2", 1), masks=str(tmp_path / "none")), progress=False)
    with pytest.raises(TrainError, match="loss is (nan|inf)"):
        train(config(world, tmp_path / "r3", 5, "optim.lr_head=1e30", "optim.lr_backbone=1e30", batch=2, crop=32),
              progress=False)
    with pytest.raises(TrainError, match="not in"):
        archive_items(world["archive"], world["masks"], categories=["zebra"])
    if not HAS_COPY_PASTE:
        images, labels = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.uint8)
        with pytest.raises(TrainError, match="copy_paste.p=0"):
            apply_copy_paste(images, labels, TrainConfig().copy_paste, torch.Generator())


@pytest.mark.skipif(not HAS_COPY_PASTE, reason="namedmask.ops.random_copy_paste not on this branch yet")
def test_copy_paste_makes_multi_object_samples(world, tmp_path):
    cfg = config(world, tmp_path / "cp", 3, "copy_paste.p=1.0", "augment.scale=[0.3, 0.5]", crop=48)
    items, _ = archive_items(world["archive"], world["masks"])
    samples = TrainSamples(items, cfg)
    batch = [samples[k] for k in range(8)]
    images, labels = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    before = [set(torch.unique(lab).tolist()) - {0, 255} for lab in labels]
    assert all(len(s) == 1 for s in before)
    _, pasted = apply_copy_paste(images, labels, cfg.copy_paste, torch.Generator().manual_seed(0))
    after = [set(torch.unique(lab).tolist()) - {0, 255} for lab in pasted]
    assert sum(len(s) >= 2 for s in after) >= 2, after
    train(cfg, progress=False)  # the training loop runs with it
    assert (tmp_path / "cp" / "summary.json").is_file()


def test_training_calls_copy_paste_on_every_batch(world, tmp_path, monkeypatch):
    """The wiring to the copy-paste op (a stand-in here until the op lands): every batch goes
    through it with the configured options and a generator seeded by (seed, iteration, rank)."""
    calls = []

    def fake(images, labels, *, p, max_objects, scale, hflip, generator):
        calls.append((tuple(images.shape), p, max_objects, scale, hflip, int(torch.randint(1000, (), generator=generator))))
        return images, labels

    monkeypatch.setattr(ops, "random_copy_paste", fake, raising=False)
    cfg = config(world, tmp_path / "r", 3, "copy_paste.p=0.5", "copy_paste.max_objects=2", "copy_paste.hflip=true",
                 batch=2, crop=32)
    train(cfg, progress=False)
    assert [c[:5] for c in calls] == [((2, 3, 32, 32), 0.5, 2, None, True)] * 3
    assert len({c[5] for c in calls}) == 3  # a different draw each iteration
    first = list(calls)
    calls.clear()
    train(dataclasses.replace(cfg, out=str(tmp_path / "r2")), progress=False)
    assert calls == first  # ... and the same draws when rerun


def test_resume_after_sigkill(world, tmp_path):
    """`namedmask train` killed with SIGKILL after a checkpoint, rerun: it continues from the
    checkpoint and ends with the same weights and data order as an uninterrupted run."""
    sets = tiny_train_overrides(60, batch=2, crop=32) + ["checkpoint_every=5"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "namedmask", "-q", "train", "--archive", str(world["archive"]), "--masks",
           str(world["masks"]), "--out", str(out)] + [a for o in sets for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    assert 5 <= killed_at < 60
    train(config(world, out, 60, "checkpoint_every=5", batch=2, crop=32), progress=False)
    train(config(world, tmp_path / "whole", 60, "checkpoint_every=5", batch=2, crop=32), progress=False)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(out)
    assert [r["iteration"] for r in b] == list(range(1, 61))
    assert [r["images"] for r in b] == [r["images"] for r in a]
    assert state_digest(load_segmenter(out)[0]) == state_digest(load_segmenter(tmp_path / "whole")[0])


def test_train_cli_with_config_file(world, tmp_path):
    """`namedmask train --config FILE --set ...`: the file, then --set, then options; the
    resolved config lands in the run directory."""
    path = tmp_path / "tiny.yaml"
    cfg = config(world, None, 50, batch=2, crop=32)
    path.write_text(yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k not in ("archive", "masks", "out")}))
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--config", str(path), "--archive", str(world["archive"]), "--masks",
                                   str(world["masks"]), "--out", str(out), "--iterations", "2",
                                   "--set", "optim.lr_head=2e-3"])
    assert res.exit_code == 0, res.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["iterations"] == 2 and written["optim"]["lr_head"] == 2e-3 and written["augment"]["crop_size"] == 32
    assert written["archive"] == str(world["archive"])
    res = CliRunner().invoke(cli, ["train", "--config", str(path), "--set", "optim.nope=1"])
    assert res.exit_code != 0 and "optim.nope" in res.output


def test_training_flops_counts_the_architecture_only(tmp_path):
    """The tiny-model rule builds the model on the meta device: a backbone weights file is never
    read (a missing one is no error) nor copied into meta tensors (torch warned once per tensor)."""
    import warnings

    from namedmask.config import from_dict
    from namedmask.training import training_flops

    small = dict(batch_size=2, augment={"crop_size": 64})
    plain = training_flops(from_dict(TrainConfig, small))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training_flops(from_dict(TrainConfig, {**small, "model": {"pretrained": str(tmp_path / "none.pth")}})) \
            == plain > 0
