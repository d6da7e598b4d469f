"""The Python API: `namedmask.load(...)` -> `.predict(image) -> label map`, `.class_names`;
the README's example runs as written on a model trained here."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import namedmask
from namedmask.config import TrainConfig, load_config
from namedmask.errors import NamedMaskError
from namedmask.models.deeplab import load_segmenter
from namedmask.models.inference import predict_label
from namedmask.training import train
from synthetic import CLASSES, one_thread, tiny_train_overrides, write_archive

README = Path(__file__).resolve().parents[1] / "README.md"


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
    for source in (run, run / "checkpoint.pt", run / "model.safetensors", str(run)):
        seg = namedmask.load(source, device="cpu")
        for img in (trained / "photo.jpg", Image.open(trained / "photo.jpg"), image, torch.from_numpy(image.copy())):
            assert np.array_equal(seg.predict(img), want)


def test_bad_inputs_are_named_mask_errors(trained, tmp_path):
    with pytest.raises(NamedMaskError, match="nowhere"):
        namedmask.load(tmp_path / "nowhere")
    with pytest.raises(NamedMaskError, match="no trained segmenter"):
        namedmask.load(tmp_path)
    seg = namedmask.load(trained / "runs" / "demo" / "train", device="cpu")
    with pytest.raises(NamedMaskError, match="uint8"):
        seg.predict(np.zeros((4, 4), np.float32))


def test_the_api_surface():
    for name in ("load", "Segmenter", "ops", "train", "build_archive", "run_saliency", "refine_folder",
                 "refine_with_experts", "evaluate_checkpoint", "predict", "run_pipeline", "load_config",
                 "NamedMaskError"):
        assert name in dir(namedmask) and getattr(namedmask, name) is not None
    assert namedmask.ops.miou is not None
    with pytest.raises(AttributeError):
        namedmask.does_not_exist
