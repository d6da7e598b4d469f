"""The Python API: `namedmask.load(...)` -> `.predict(image) -> label map`, `.class_names`;
the README's example runs as written on a model trained here."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import namedmask
from namedmask.config import TrainConfig, load_config
from namedmask.data.augment import normalize
from namedmask.errors import NamedMaskError
from namedmask.models.deeplab import load_segmenter
from namedmask.models.inference import predict_label
from namedmask.training import train
from synthetic import CLASSES, one_thread, tiny_train_overrides, write_archive

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny segmenter trained for a few iterations at runs/demo/train, and a photo.jpg,
    the paths the README example uses."""
    root = tmp_path_factory.mktemp("api")
    archive, masks, _ = write_archive(root / "world", per_class=3, size=48)
    cfg = load_config(TrainConfig, overrides=tiny_train_overrides(3, batch=2, crop=32), archive=str(archive),
                      masks=str(masks), out=str(root / "runs" / "demo" / "train"))
    with one_thread():
        train(cfg, progress=False)
    photo = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "photo.jpg", quality=95)
    return root


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 5
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    seg, labels = scope["seg"], scope["labels"]
    assert seg.class_names == ["background", *CLASSES]
    assert labels.shape == (37, 53) and labels.dtype == np.uint8
    printed = capsys.readouterr().out
    assert all(seg.class_names[i] in printed for i in np.unique(labels))


def test_predict_is_the_pipelines_prediction(trained):
    run = trained / "runs" / "demo" / "train"
    image = np.asarray(Image.open(trained / "photo.jpg").convert("RGB"))
    model, _ = load_segmenter(run, "cpu")
    want = predict_label(model, torch.from_numpy(image.copy()), "cpu").numpy()
    with torch.no_grad():
        probs = model(normalize(torch.from_numpy(image.copy()).permute(2, 0, 1))[None]).softmax(1)[0].numpy()
    png = (trained / "photo.jpg").read_bytes()
    for source in (run, run.parent, run / "checkpoint.pt", run / "model.safetensors", str(run)):
        seg = namedmask.load(source, device="cpu")
        for img in (trained / "photo.jpg", str(trained / "photo.jpg"), Image.open(trained / "photo.jpg"), image,
                    torch.from_numpy(image.copy()), png):
            result = seg.predict(img)
            assert np.array_equal(result.labels, want) and np.array_equal(result, want)
            assert result.scores.shape == (4, 37, 53) and result.scores.dtype == np.float32
            assert np.allclose(result.scores, probs, atol=1e-5)
            assert np.allclose(result.scores.sum(0), 1, atol=1e-5)
            assert np.array_equal(result.scores.argmax(0), want)
    assert result.class_names == seg.class_names and result.palette.shape == (4, 3)
    # a list gives a list, same-size images batched: the same labels as one at a time
    flipped = image[:, ::-1]
    results = seg.predict([image, flipped, image[:20, :30], image])
    assert [r.labels.shape for r in results] == [(37, 53), (37, 53), (20, 30), (37, 53)]
    assert all(np.array_equal(a.labels, b) for a, b in zip(results, [want, seg.predict(flipped.copy()).labels,
                                                                     seg.predict(image[:20, :30].copy()).labels,
                                                                     want]))
    assert seg.predict([]) == []


def test_result_overlay_and_save(trained, tmp_path):
    seg = namedmask.load(trained / "runs" / "demo" / "train", device="cpu")
    result = seg.predict(trained / "photo.jpg")
    overlay = result.overlay()
    assert overlay.size[1] >= 37 and overlay.size[0] > 53   # the photo, then the legend (may be taller)
    assert np.array_equal(np.array(overlay)[:37, :53][result.labels == 0], result.image[result.labels == 0])
    paths = result.save(tmp_path)
    assert paths["labels"] == tmp_path / "labels" / "photo.png"
    assert np.array_equal(np.array(Image.open(paths["labels"])), result.labels)
    assert Image.open(paths["labels"]).mode == "P" and Image.open(paths["overlay"]).size == overlay.size
    assert np.array_equal(np.load(paths["scores"]), result.scores)
    assert set(result.present) <= set(result.class_names) and repr(result).startswith("Result(37x53")


def test_sixteen_bit_pil_images_read_as_the_cli_reads_them(trained, tmp_path):
    """A 16-bit grey PNG opened with PIL (mode I;16) gives the labels of the same file given by path
    (its top 8 bits), not a saturated white image."""
    seg = namedmask.load(trained / "runs" / "demo" / "train", device="cpu")
    grey = (np.random.default_rng(1).integers(0, 65536, (29, 31))).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    pil = Image.open(path)
    assert pil.mode.startswith("I;16")
    want = seg.predict(path).labels
    assert np.array_equal(seg.predict(pil).labels, want)
    rgb = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(seg.predict(rgb).labels, want)


@pytest.mark.parametrize("bad, match", [
    (123, "got int"), (None, "got NoneType"), ([["a.jpg"]], "nested"), (b"not an image", "not an image"),
    (np.zeros((0, 0, 3), np.uint8), "empty image"), (np.zeros((0, 10, 3), np.uint8), "empty image"),
    (np.zeros((4, 4, 3), np.float32), "uint8"), ("nowhere.jpg", "no such image"),
])
def test_every_bad_input_is_a_named_mask_error(trained, bad, match):
    seg = namedmask.load(trained / "runs" / "demo" / "train", device="cpu")
    with pytest.raises(NamedMaskError, match=match):
        seg.predict(bad)


def test_text_on_a_closed_set_run_names_what_works(trained):
    seg = namedmask.load(trained / "runs" / "demo" / "train", device="cpu")
    with pytest.raises(NamedMaskError, match="closed-set") as info:
        seg.predict(trained / "photo.jpg", text="dog, cat")
    assert "--zero-shot" not in str(info.value).split("predict")[1].split(", eval")[0]
    assert "namedmask.load(zero_shot=" in str(info.value)


def _official_checkpoint(path: Path, num_classes: int) -> Path:
    """An official NamedMask final_model.pt (DeepLabv3+ ResNet-50 state dict) with random weights."""
    from namedmask.config import ModelConfig
    from namedmask.models.deeplab import DeepLabV3Plus

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(DeepLabV3Plus(num_classes, ModelConfig()).state_dict(), path)
    return path


def _tiny_clip_file(path: Path) -> Path:
    from namedmask.models.clip import load_clip

    torch.save(load_clip("nm-tiny", "random").model.state_dict(), path)
    return path


def docs_example() -> str:
    return re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)


def test_docs_example_runs(trained, tmp_path, monkeypatch, capsys):
    """docs/python-api.md's first example as written, in a folder holding what it names: a run
    (runs/mine), an official-layout final_model.pt (VOC's 21 classes), photo.jpg; the zero-shot
    CLIP is the tiny test CLIP from a weights file in open_clip's layout (ViT-B-16's weights
    cannot be downloaded here)."""
    shutil.copytree(trained / "runs" / "demo", tmp_path / "runs" / "mine")
    shutil.copy(trained / "photo.jpg", tmp_path / "photo.jpg")
    _official_checkpoint(tmp_path / "final_model.pt", 21)
    clip = _tiny_clip_file(tmp_path / "nm-tiny.pt")
    code = docs_example()
    assert 'zero_shot="ViT-B-16/openai"' in code and 'text="horse, grass"' in code
    code = code.replace('"ViT-B-16/openai"', f'"nm-tiny/{clip}"')
    monkeypatch.chdir(tmp_path)
    scope = {}
    with one_thread():
        exec(compile(code, str(DOCS), "exec"), scope)
    result, official, zs = scope["result"], scope["official"], scope["clip"]
    assert result.class_names == ["background", *CLASSES] and result.labels.shape == (37, 53)
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "out" / "labels" / "photo.png").is_file()
    assert len(scope["results"]) == 2 and np.array_equal(scope["results"][0].labels, result.labels)
    assert official.class_names[12] == "dog" and len(official.class_names) == 21
    assert zs.class_names == ["background", "dog", "cat", "traffic light"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(result.present) and printed[-1] == str(["background", "horse", "grass"])


def test_official_checkpoint_needs_its_categories(tmp_path):
    path = _official_checkpoint(tmp_path / "final_model.pt", 3)
    with pytest.raises(NamedMaskError, match="categories="):
        namedmask.load(path, device="cpu")
    with pytest.raises(NamedMaskError, match="does not match"):
        namedmask.load(path, categories="voc", device="cpu")
    seg = namedmask.load(path, categories="dog, cat|kitten", device="cpu")
    assert seg.class_names == ["background", "dog", "cat"]
    assert seg.predict(np.zeros((16, 24, 3), np.uint8)).labels.shape == (16, 24)


def test_the_cli_and_load_share_one_factory(trained, tmp_path):
    """`namedmask predict` writes the labels namedmask.load(...).predict returns, for a run and for
    an official checkpoint (--categories)."""
    from click.testing import CliRunner

    from namedmask.cli import cli

    official = _official_checkpoint(tmp_path / "final_model.pt", 4)
    for source, extra in ((trained / "runs" / "demo", []), (official, ["--categories", ", ".join(CLASSES)])):
        out = tmp_path / f"out-{len(extra)}"
        res = CliRunner().invoke(cli, ["predict", str(trained / "photo.jpg"), "--checkpoint", str(source),
                                       "--out", str(out), *extra])
        assert res.exit_code == 0, res.output
        want = namedmask.load(source, categories=", ".join(CLASSES) if extra else None, device="cpu")
        assert np.array_equal(np.array(Image.open(out / "labels" / "photo.png")),
                              want.predict(trained / "photo.jpg").labels)


def test_zero_shot_and_discover_from_python(tmp_path):
    clip = _tiny_clip_file(tmp_path / "nm-tiny.pt")
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    with pytest.raises(NamedMaskError, match="text="):
        namedmask.load(zero_shot=f"nm-tiny/{clip}")
    seg = namedmask.load(zero_shot=f"nm-tiny/{clip}", text="dog, cat", device="cpu")
    result = seg.predict(image)
    assert result.class_names == ["background", "dog", "cat"] and result.scores.shape == (3, 40, 48)
    assert np.array_equal(result.labels, result.scores.argmax(0))
    assert seg.predict(image, text="a, b, c").class_names == ["background", "a", "b", "c"]
    found = namedmask.discover(image, model="nm-tiny", pretrained=str(clip), random_weights=True, size=32, k=3,
                               vocabulary=str(_vocabulary(tmp_path)), refine=False,
                               vit_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2})
    assert found.labels.shape == (40, 48) and found.labels.max() <= len(found.segments)
    assert all("name" in s for s in found.segments)


def _vocabulary(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("dog\ncat\nball\n")
    return path


def test_bad_inputs_are_named_mask_errors(trained, tmp_path):
    with pytest.raises(NamedMaskError, match="nowhere"):
        namedmask.load(tmp_path / "nowhere")
    with pytest.raises(NamedMaskError, match="no trained segmenter"):
        namedmask.load(tmp_path)
    seg = namedmask.load(trained / "runs" / "demo" / "train", device="cpu")
    with pytest.raises(NamedMaskError, match="uint8"):
        seg.predict(np.zeros((4, 4), np.float32))


def test_the_api_surface():
    for name in ("load", "Segmenter", "Result", "discover", "ops", "train", "build_archive", "run_saliency", "refine_folder",
                 "refine_with_experts", "evaluate_checkpoint", "predict", "run_pipeline", "load_config",
                 "NamedMaskError"):
        assert name in dir(namedmask) and getattr(namedmask, name) is not None
    assert namedmask.ops.miou is not None
    with pytest.raises(AttributeError):
        namedmask.does_not_exist
