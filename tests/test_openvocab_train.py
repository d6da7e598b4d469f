"""`train.head: text` end to end on the procedural world: the run trains with diversified names
and distillation, its checkpoint answers its own classes and new text, bad options fail."""
import json

import numpy as np
import pytest
import torch

from namedmask.config import ConfigError, TrainConfig, load_config
from namedmask.models.deeplab import OpenVocabSegmenter, TextDeepLabV3Plus, load_segmenter
from namedmask.stages.evaluate import evaluate_checkpoint
from namedmask.models.openvocab import OpenVocabError, open_vocab_segmenter, text_classes
from namedmask.training import train
from synthetic import CLASSES, one_thread, tiny_train_overrides, write_archive, write_labeled_folder

TEXT = ["head=text", "text.clip_model=nm-tiny", "text.clip_pretrained=random", "text.templates=simple"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    archive, masks, _ = write_archive(root, per_class=4)
    names = root / "names.txt"
    names.write_text("".join(f"{n} | {n}ish, {n}-like\n" for n in CLASSES))
    return {"root": root, "archive": archive, "masks": masks, "val": write_labeled_folder(root / "val", 4),
            "names": names}


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(TrainConfig, overrides=tiny_train_overrides(3, 2, 32) + TEXT + [
        f"text.names={world['names']}", "text.distill_weight=0.5", "text.diversify=mix"],
        archive=str(world["archive"]), masks=str(world["masks"]), out=str(out))
    with one_thread():
        train(cfg, progress=False)
    return out


def test_text_run_round_trips(trained, world):
    model, meta = load_segmenter(trained)
    assert isinstance(model, TextDeepLabV3Plus) and meta["head"] == "text" and meta["embed_dim"] == 64
    assert meta["clip"] == {"name": "nm-tiny", "pretrained": "random"} and meta["distill_weight"] == 0.5
    first = list(CLASSES)[0]
    assert meta["class_words"][0] == [first, f"{first}ish", f"{first}-like"]
    # its own classes need no CLIP; new names go through the run's CLIP text tower
    own, names = open_vocab_segmenter(trained)
    assert names == meta["class_names"] and own is not None
    seg, names = open_vocab_segmenter(trained, text_classes("zebra, tiger|big cat"))
    assert isinstance(seg, OpenVocabSegmenter) and names == ["background", "zebra", "tiger"]
    with torch.no_grad():
        assert seg(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    # a text-head run is scored like any checkpoint
    report = evaluate_checkpoint(trained, "folder", world["val"], device="cpu", progress=False)
    assert 0.0 <= report.metrics.miou <= 1.0


def test_closed_set_run_refuses_new_text(tmp_path, world):
    cfg = load_config(TrainConfig, overrides=tiny_train_overrides(1, 2, 32), archive=str(world["archive"]),
                      masks=str(world["masks"]), out=str(tmp_path / "closed"))
    with one_thread():
        train(cfg, progress=False)
    with pytest.raises(OpenVocabError, match="closed-set run"):
        open_vocab_segmenter(tmp_path / "closed", [("zebra", ("zebra",))])


def test_bad_text_options(tmp_path, world):
    runs = iter(range(100))

    def cfg(*extra):
        return load_config(TrainConfig, overrides=tiny_train_overrides(1, 2, 32) + list(extra),
                           archive=str(world["archive"]), masks=str(world["masks"]),
                           out=str(tmp_path / f"r{next(runs)}"))
    with pytest.raises(ConfigError, match="head must be one of linear, text"):  # refused when the config is built
        cfg("head=texts")
    with pytest.raises(OpenVocabError, match="records no CLIP model"):
        train(cfg("head=text"), progress=False)
    other = tmp_path / "other.txt"
    other.write_text("zebra\n")
    with pytest.raises(OpenVocabError, match="no entry for categories"):
        train(cfg(*TEXT, f"text.names={other}"), progress=False)
    with pytest.raises(ConfigError, match="text.diversify must be one of sample, mix, none, got 'shuffle'"):
        train(cfg(*TEXT, "text.diversify=shuffle"), progress=False)
    with pytest.raises(ConfigError, match="text.teacher_recipe must be one of value, maskclip"):
        train(cfg(*TEXT, "text.teacher_recipe=clearclip"), progress=False)
    with pytest.raises(OpenVocabError, match="either"):
        text_classes("a", "voc")
    voc = text_classes(None, "voc")
    assert len(voc) == 20 and voc[10] == ("diningtable", ("dining table",))
    assert text_classes("cat|kitten, dog") == [("cat", ("cat", "kitten")), ("dog", ("dog",))]


def test_evaluate_open_zero_shot_and_text_run(trained, world):
    from namedmask.stages.evaluate import evaluate_open

    names = ", ".join(CLASSES)
    zs = evaluate_open("folder", world["val"], zero_shot={"model": "nm-tiny", "pretrained": "random",
                                                          "templates": "simple", "threshold": 0.5},
                       text=names, device="cpu", progress=False)
    assert zs.num_images == 4 and 0.0 <= zs.metrics.miou <= 1.0
    # the text-head run with the same names as text: the same classes, so scored on all of them
    own = evaluate_open("folder", world["val"], run_dir=trained, text=names, device="cpu", progress=False)
    assert own.class_names == ["background", *CLASSES]
    with pytest.raises(OpenVocabError, match="does not name its classes"):
        evaluate_open("folder", world["val"], zero_shot={"model": "nm-tiny", "pretrained": "random",
                                                         "threshold": 0.5}, device="cpu", progress=False)
    with pytest.raises(OpenVocabError, match="not both"):
        evaluate_open("folder", world["val"], run_dir=trained, zero_shot={"model": "nm-tiny"}, text="a",
                      device="cpu", progress=False)


def test_cli_predict_text_and_eval_zero_shot(trained, world, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from namedmask.cli import cli

    images = world["val"] / "images"
    # unseen names on a text-head run: labels 0..2 and an overlay legend with the new names
    res = CliRunner().invoke(cli, ["predict", str(images), "--checkpoint", str(trained), "--out", str(tmp_path / "p"),
                                   "--text", "zebra, tiger|big cat", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    labels = sorted((tmp_path / "p" / "labels").glob("*.png"))
    assert len(labels) == 4 and all(int(np.asarray(Image.open(p)).max()) <= 2 for p in labels)
    # zero-shot dense CLIP, no checkpoint
    res = CliRunner().invoke(cli, ["predict", str(images), "--out", str(tmp_path / "z"), "--text", "disc, square",
                                   "--model", "nm-tiny", "--pretrained", "random", "--templates", "simple",
                                   "--background-threshold", "0.6", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["eval", "--zero-shot", "--model", "nm-tiny", "--pretrained", "random",
                                   "--dataset", "folder", "--root", str(world["val"]), "--text", ", ".join(CLASSES),
                                   "--templates", "simple", "--device", "cpu"])
    assert res.exit_code == 0 and "mIoU" in res.output, res.output
    # bad combinations: one line each
    for args, message in ((["predict", str(images), "--out", str(tmp_path / "x")], "--checkpoint RUN"),
                          (["predict", str(images), "--out", str(tmp_path / "x"), "--model", "nm-tiny"],
                           "needs class names"),
                          (["predict", str(images), "--out", str(tmp_path / "x"), "--checkpoint", str(trained),
                            "--model", "nm-tiny", "--text", "a"], "not both"),
                          (["eval", "--zero-shot", "--dataset", "folder", "--root", str(world["val"])], "--model")):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0 and message in res.output, (args, res.output)
