"""`namedmask eval` on folders of prediction / ground-truth PNGs."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.data.categories import voc_palette


def write_png(path, arr, palette=True):
    img = Image.fromarray(arr.astype(np.uint8))
    if palette:
        img = img.convert("P")
        img.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for i in range(4):
        gt = rng.integers(0, 21, (37 + i, 53))
        gt[:3] = 255
        pred = np.where(rng.random(gt.shape) < 0.7, gt % 255, rng.integers(0, 21, gt.shape))
        pred[gt == 255] = 0
        write_png(tmp_path / "gt" / f"img{i}.png", gt, palette=True)
        write_png(tmp_path / "pred" / f"img{i}.png", pred, palette=(i % 2 == 0))  # palette and grayscale
        gts.append(gt), preds.append(pred)
    return tmp_path, gts, preds


def oracle_miou(gts, preds, n=21):
    cm = np.zeros((n, n), np.int64)
    for g, p in zip(gts, preds):
        k = g < n
        cm += np.bincount(g[k] * n + p[k], minlength=n * n).reshape(n, n)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    return np.nanmean(np.where(union > 0, inter / np.maximum(union, 1), np.nan)), cm


def test_eval_writes_metrics(pairs):
    root, gts, preds = pairs
    out = root / "m.json"
    res = CliRunner().invoke(cli, ["eval", "--pred", str(root / "pred"), "--gt", str(root / "gt"),
                                   "--class-names", "voc", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "aeroplane" in res.output and "mIoU" in res.output
    data = json.loads(out.read_text())
    want, cm = oracle_miou(gts, preds)
    assert data["miou"] == pytest.approx(want, abs=1e-12)
    assert data["num_images"] == 4 and data["num_classes"] == 21 and len(data["per_class_iou"]) == 21
    assert np.array_equal(np.array(data["confusion_matrix"]), cm)
    for key in ("pixel_acc", "mean_acc"):
        assert 0 < data[key] < 1


def test_eval_reports_bad_pairs_by_name(pairs):
    root, _, _ = pairs
    (root / "pred" / "img1.png").unlink()                       # missing prediction
    write_png(root / "pred" / "img2.png", np.zeros((5, 5)))      # size mismatch
    (root / "pred" / "img3.png").write_bytes(b"not a png")       # unreadable
    res = CliRunner().invoke(cli, ["eval", "--pred", str(root / "pred"), "--gt", str(root / "gt"),
                                   "--num-classes", "21"])
    assert res.exit_code != 0
    for name in ("img1", "img2.png", "img3.png"):
        assert name in res.output
    out = root / "m.json"
    res = CliRunner().invoke(cli, ["eval", "--pred", str(root / "pred"), "--gt", str(root / "gt"),
                                   "--num-classes", "21", "--skip-bad", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["num_images"] == 1 and len(data["skipped"]) == 3


def test_eval_rejects_out_of_range_prediction(pairs):
    root, _, _ = pairs
    write_png(root / "pred" / "img0.png", np.full((37, 53), 40), palette=False)
    res = CliRunner().invoke(cli, ["eval", "--pred", str(root / "pred"), "--gt", str(root / "gt"),
                                   "--num-classes", "21"])
    assert res.exit_code != 0 and "40" in res.output and "img0" in res.output


def test_eval_on_real_voc_masks(voc_mini, tmp_path):
    """GT against itself: mIoU 1 over the classes present; pixel accuracy 1."""
    gt_dir = voc_mini / "SegmentationClass"
    for p in sorted(gt_dir.glob("*.png")):
        arr = np.array(Image.open(p))
        arr[arr == 255] = 0
        write_png(tmp_path / "pred" / p.name, arr)
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(gt_dir),
                                   "--class-names", "voc", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["miou"] == 1.0 and data["pixel_acc"] == 1.0 and data["num_images"] == 30


def test_info_lists_backends():
    res = CliRunner().invoke(cli, ["info"])
    assert res.exit_code == 0, res.output
    assert "confusion_matrix" in res.output and "cpp" in res.output
    res = CliRunner().invoke(cli, ["info", "--json"])
    data = json.loads(res.output)
    assert data["ops"]["confusion_matrix"]["torch"] == "live"
