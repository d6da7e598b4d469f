"""From your own photos to named masks (issue 25): `namedmask run --pool DIR --categories ...
--preset cpu` on real photos, with weight files built here in the real layouts (an open_clip
state dict of the tiny test CLIP, an official-layout DINO ViT file, a timm ResNet state dict)
loaded through the same code as real weights; model provenance and its warning; `namedmask
weights` with nothing present, everything present and offline."""
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import namedmask
from namedmask.cli import cli

PHOTOS = 5
CATEGORIES = "dog, cat|kitten, traffic light"
TINY_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 2}
TINY_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}


def write_weights(folder: Path) -> dict:
    """Random weights in the real file layouts: open_clip state dict (nm-tiny), the official DINO
    ViT-S/16 file layout (flat state dict, as dino_deitsmall16_pretrain.pth) at a tiny width, and
    a timm ResNet state dict with its classifier (as torchvision/timm release them)."""
    import timm

    from namedmask.models.clip import load_clip
    from namedmask.models.dino import build_vit

    folder.mkdir(parents=True, exist_ok=True)
    files = {"clip": folder / "nm-tiny.pt", "dino": folder / "dino_deitsmall16_pretrain.pth",
             "backbone": folder / "resnet10t.pth"}
    torch.save(load_clip("nm-tiny", "random").model.state_dict(), files["clip"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save(build_vit("vit_small_patch16_224.dino", **TINY_VIT).state_dict(), files["dino"])
        torch.save(timm.create_model("resnet10t", pretrained=False, **TINY_RESNET).state_dict(), files["backbone"])
    return files


def tiny_run_options(files: dict) -> list:
    """--set options: the cpu preset with the tiny models and few iterations (well under a minute)."""
    sets = {"archive.model": "nm-tiny", "archive.pretrained": str(files["clip"]), "archive.k": 2,
            "archive.batch_size": 8, "saliency.dino_weights": str(files["dino"]),
            "saliency.vit_kwargs": json.dumps(TINY_VIT), "saliency.short_side": 64,
            "train.iterations": 3, "train.batch_size": 2, "train.num_workers": 0, "train.device": "cpu",
            "train.log_every": 1, "train.augment.crop_size": 48, "train.model.backbone": "resnet10t",
            "train.model.backbone_args": json.dumps(TINY_RESNET), "train.model.aspp_channels": 16,
            "train.model.low_level_channels": 8, "train.model.aspp_rates": "[1, 2, 3]",
            "train.model.pretrained": str(files["backbone"])}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def my_run(pool_dir, tmp_path_factory):
    """The one-command route on a folder of real photos."""
    root = tmp_path_factory.mktemp("photos")
    photos = root / "my photos"
    photos.mkdir()
    for src in sorted(pool_dir.glob("*.jpg"))[:PHOTOS]:
        shutil.copy(src, photos / src.name)
    files = write_weights(root / "weights")
    torch.set_num_threads(1)
    res = CliRunner().invoke(cli, ["run", "--pool", str(photos), "--categories", CATEGORIES, "--out",
                                   str(root / "runs" / "mine"), "--preset", "cpu", *tiny_run_options(files)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return root / "runs" / "mine", photos, files, res.output


def test_one_command_from_a_folder_of_photos(my_run):
    run, photos, files, output = my_run
    assert f"report: {run / 'index.html'}" in output.replace(str(run.resolve()), str(run))
    # the categories text became the archive's names file; every photo got a named mask
    assert (run / "categories.txt").read_text() == "dog\ncat | kitten\ntraffic light\n"
    meta = json.loads((run / "train" / "model.json").read_text())
    assert meta["class_names"] == ["background", "dog", "cat", "traffic light"]
    stems = sorted(p.stem for p in photos.glob("*.jpg"))
    assert sorted(p.stem for p in (run / "predict" / "labels").glob("*.png")) == stems
    for stem in stems:
        label = np.array(Image.open(run / "predict" / "labels" / f"{stem}.png"))
        assert label.shape == Image.open(photos / f"{stem}.jpg").size[::-1] and label.max() <= 3
        assert (run / "predict" / "overlays" / f"{stem}.png").is_file()
    html = (run / "index.html").read_text()
    assert "model provenance" in html and "nm-tiny" in html and "RANDOM WEIGHTS" not in html
    # the preset's own settings, with the --set values on top
    config = (run / "config.yaml").read_text()
    assert "output_stride: 16" in config and "k: 2" in config and "iterations: 3" in config


def test_provenance_is_recorded(my_run):
    run, photos, files, _ = my_run
    prov = json.loads((run / "train" / "model.json").read_text())["provenance"]
    sha = hashlib.sha256(files["clip"].read_bytes()).hexdigest()
    assert prov["clip"] == {"name": "nm-tiny", "pretrained": str(files["clip"].resolve()),
                            "weights_file": str(files["clip"].resolve()), "sha256": sha}
    assert prov["saliency"]["method"] == "tokencut" and prov["saliency"]["name"] == "vit_small_patch16_224.dino"
    assert prov["saliency"]["sha256"] == hashlib.sha256(files["dino"].read_bytes()).hexdigest()
    assert prov["category_words"] == {"dog": ["dog"], "cat": ["cat", "kitten"], "traffic light": ["traffic light"]}
    assert prov["image_size"] == 48 and prov["toy"] is False and prov["random_weights"] is False
    assert prov["world"] == str(photos.resolve())


def test_own_model_does_not_warn_a_toy_model_does(my_run, pool_dir, tmp_path, caplog):
    run, photos, _, _ = my_run
    photo = sorted(photos.glob("*.jpg"))[0]
    with caplog.at_level(logging.WARNING, logger="namedmask"):
        result = namedmask.load(run, device="cpu").predict(photo)
    assert result.class_names == ["background", "dog", "cat", "traffic light"]
    assert not [r for r in caplog.records if "model trained only on" in r.getMessage()]

    # the same weights, recorded as a toy-world model: a real photo is outside its world
    toy = tmp_path / "toy"
    shutil.copytree(run / "train", toy)
    meta = json.loads((toy / "model.json").read_text())
    world = tmp_path / "toyworld"
    (world / "pool").mkdir(parents=True)
    meta["provenance"].update(toy=True, world=str(world))
    (toy / "model.json").write_text(json.dumps(meta))
    caplog.clear()
    seg = namedmask.load(toy, device="cpu")
    with caplog.at_level(logging.WARNING, logger="namedmask"):
        seg.predict(photo)
        seg.predict([photo, sorted(pool_dir.glob("*.jpg"))[-1]])   # warned once, not per image
    warned = [r.getMessage() for r in caplog.records if "model trained only on" in r.getMessage()]
    assert len(warned) == 1 and "TOY model" in warned[0] and str(photo) in warned[0] and str(world) in warned[0]
    assert "TOY MODEL" in seg.provenance
    # an image of its own world does not warn
    inside = world / "pool" / "x.png"
    Image.open(photo).save(inside)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="namedmask"):
        namedmask.load(toy, device="cpu").predict(inside)
    assert not [r for r in caplog.records if "model trained only on" in r.getMessage()]
    # the predict command warns too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="namedmask"):
        res = CliRunner().invoke(cli, ["predict", str(photo), "--checkpoint", str(toy), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert len([r for r in caplog.records if "model trained only on" in r.getMessage()]) == 1


def test_toy_and_random_flags_come_from_the_archive():
    from namedmask.models.provenance import training_provenance, untrusted

    toy = training_provenance({"model": {"name": "nm-toy", "pretrained": "/nowhere/nm-toy.pt"}}, "/w/pool",
                              {"method": "tokencut"}, {"ball": ["ball"]}, 96)
    assert toy["toy"] is True and toy["world"] == "/w" and untrusted({"provenance": toy}) == "toy"
    rnd = training_provenance({"model": {"name": "nm-tiny", "pretrained": "random"}}, "/photos",
                              {"method": "tokencut"}, {}, 48)
    assert (rnd["toy"], rnd["random_weights"], rnd["world"]) == (False, True, "/photos")
    assert untrusted({"provenance": rnd}) == "random-weight" and untrusted({}) is None


def test_inline_categories_and_presets_need_no_yaml_or_imagenet(tmp_path, monkeypatch):
    from namedmask.pipeline import PipelineError, categories_file, load_run_config

    monkeypatch.delenv("IMAGENET_TRAIN", raising=False)
    for var in ("VOC_ROOT", "SELFMASK_CHECKPOINT", "DINO_RESNET50"):  # still needed by the voc config
        monkeypatch.setenv(var, str(tmp_path))
    cfg = load_run_config("voc", {"pool": str(tmp_path)})     # --pool replaces $IMAGENET_TRAIN
    assert cfg.pool == str(tmp_path)
    for preset, model, k in (("cpu", "ViT-B-16", 50), ("gpu", "ViT-L-14-336", 500), ("paper", "ViT-L-14-336", 500)):
        cfg = load_run_config(preset, {"pool": "p", "categories": CATEGORIES})
        assert (cfg.archive.model, cfg.archive.k) == (model, k)
    assert load_run_config("paper").experts.enabled and load_run_config("paper").saliency.method == "selfmask"
    assert load_run_config("cpu").train.iterations == 2000 and load_run_config("cpu").train.model.backbone == "resnet18"
    assert Path(categories_file("a|b", tmp_path)).read_text() == "a | b\n"
    assert categories_file("voc", tmp_path) == "voc"
    with pytest.raises(PipelineError, match="comma-separated"):
        categories_file("dgo", tmp_path)
    with pytest.raises(PipelineError, match="duplicate"):
        categories_file("dog, dog", tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["run", "--pool", str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "--categories" in res.output
    res = runner.invoke(cli, ["run", "--pool", str(tmp_path), "--config", "voc", "--preset", "cpu"])
    assert res.exit_code != 0 and "not both" in res.output


# ---------------------------------------------------------------------------- namedmask weights

def _cache_env(monkeypatch, tmp_path, offline: bool):
    """Empty HF hub / torch / open_clip caches under tmp_path (HOME too: ~/.cache/clip)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))


def _hub_file(cache: Path, repo: str, filename: str, data: bytes) -> Path:
    """A file in the Hugging Face hub cache layout (models--org--name/snapshots/<rev>/file, refs/main)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    rev = hashlib.sha1(repo.encode()).hexdigest()
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    path = root / "snapshots" / rev / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


NOTHING = [
    "CLIP ViT-B-16/openai: missing (not in {hf}, ~/.cache/clip){why}; download "
    "https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_pytorch_model.bin and pass "
    "it: namedmask run --set archive.pretrained=FILE --set archive.model=ViT-B-16-quickgelu (or build-archive "
    "--pretrained FILE)",
    "DINO vit_small_patch16_224.dino: missing (not in {hf}, {torch}){why}; download "
    "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth and pass it: "
    "namedmask run --set saliency.dino_weights=FILE (or saliency --dino-weights FILE)",
    "backbone resnet18: missing (no file given){why}; download https://download.pytorch.org/models/resnet18-f37072fd.pth "
    "and pass it: namedmask run --set train.model.pretrained=FILE (or train --set model.pretrained=FILE) "
    "(optional: without it training starts from random weights)",
]


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_weights_with_nothing_present(tmp_path, monkeypatch, offline):
    _cache_env(monkeypatch, tmp_path, offline)
    res = CliRunner().invoke(cli, ["weights", "--preset", "cpu"])
    assert res.exit_code == 1
    why = "; offline (HF_HUB_OFFLINE is set)" if offline else ""
    want = [line.format(hf=tmp_path / "hf", torch=tmp_path / "torch" / "hub" / "checkpoints", why=why)
            for line in NOTHING]
    assert res.output.splitlines() == want


def test_weights_with_everything_present(tmp_path, monkeypatch):
    _cache_env(monkeypatch, tmp_path, offline=True)
    from safetensors.torch import save

    blob = save({"w": torch.zeros(1)})
    clip = _hub_file(tmp_path / "hf", "timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors", blob)
    dino = _hub_file(tmp_path / "hf", "timm/vit_small_patch16_224.dino", "model.safetensors", blob)
    backbone = tmp_path / "resnet18.pth"
    backbone.write_bytes(b"x")
    res = CliRunner().invoke(cli, ["weights", "--preset", "cpu", "--set", f"train.model.pretrained={backbone}"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"CLIP ViT-B-16/openai: present ({clip})",
                                       f"DINO vit_small_patch16_224.dino: present ({dino})",
                                       f"backbone resnet18: present ({backbone})"]
    # the paper preset: SelfMask and DINO ResNet-50 (experts and final model) have no hub
    res = CliRunner().invoke(cli, ["weights", "--preset", "paper"])
    lines = res.output.splitlines()
    assert res.exit_code == 1 and lines[0].startswith("CLIP ViT-L-14-336/openai: missing")
    assert lines[1].startswith("SelfMask selfmask_nq20: missing (no file given); offline (HF_HUB_OFFLINE is set); "
                               "download https://github.com/NoelShin/selfmask/releases/download/v1.0.0/selfmask_nq20.pt")
    assert "--set saliency.checkpoint=FILE" in lines[1]
    assert "--set experts.train.model.pretrained=FILE" in lines[2] and "dino_resnet50_pretrain.pth" in lines[2]
    assert "--set train.model.pretrained=FILE" in lines[3]


def test_missing_weights_fail_run_at_once_with_one_line(pool_dir, tmp_path, monkeypatch):
    _cache_env(monkeypatch, tmp_path, offline=True)
    res = CliRunner().invoke(cli, ["run", "--pool", str(pool_dir), "--categories", CATEGORIES, "--out",
                                   str(tmp_path / "run"), "--preset", "cpu"])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and res.output.startswith("Error: CLIP ViT-B-16/openai: missing")
    assert "namedmask run --set archive.pretrained=FILE" in res.output
    assert not (tmp_path / "run" / "archive").exists()


def test_dino_without_weights_offline_is_one_fast_line(tmp_path, monkeypatch):
    from namedmask.models.dino import DinoWeightsError, create_dino

    _cache_env(monkeypatch, tmp_path, offline=True)
    with pytest.raises(DinoWeightsError) as info:
        create_dino("vit_small_patch16_224.dino")
    message = str(info.value)
    assert "\n" not in message and "--dino-weights FILE" in message and "saliency.dino_weights=FILE" in message
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth" in message


def test_known_weights_tables_match_open_clip_and_timm():
    """`namedmask weights` answers without importing open_clip or timm for the presets' models:
    its tables must say what those libraries say."""
    import open_clip
    import timm

    from namedmask.models import weights

    assert (weights.OPEN_CLIP_WEIGHTS, weights.OPEN_CLIP_SAFE_WEIGHTS) == (
        open_clip.constants.HF_WEIGHTS_NAME, open_clip.constants.HF_SAFE_WEIGHTS_NAME)
    for (name, tag), known in weights.KNOWN_CLIP.items():
        cfg = open_clip.get_pretrained_cfg(name, tag)
        assert {k: cfg.get(k) for k in known} == known
    for name, known in weights.KNOWN_DINO.items():
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert {k: cfg.get(k) for k in known} == known and cfg.get("hf_hub_filename") is None


def test_weights_lists_without_torch(tmp_path):
    """The listing imports no torch (the reason it takes about a second)."""
    import subprocess
    import sys

    code = ("import sys; from namedmask.cli import main; sys.argv = ['namedmask', 'weights', '--preset', 'cpu']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'")
    env = {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "t"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("missing") == 3


def test_eta_is_logged_once_from_the_first_steps(caplog):
    from namedmask.runtime import Eta, format_duration

    log = logging.getLogger("namedmask.test_eta")
    eta = Eta(log, "train x", total=100, start=0)
    eta.clock = iter([10.0, 20.0]).__next__          # after step 1 (the warm-up), after step 6
    with caplog.at_level(logging.INFO, logger="namedmask.test_eta"):
        for done in range(1, 101):
            eta.step(done)
    assert [r.getMessage() for r in caplog.records] == [
        "train x: 2.00 s per step over steps 2-6 -> about 3 min 08 s for the remaining 94 iterations"]
    resumed = Eta(log, "train x", total=100, start=97)   # too few steps left to be worth a line
    assert resumed.done
    assert [format_duration(s) for s in (7.25, 95, 3725)] == ["7.2 s", "1 min 35 s", "1 h 02 min"]
