"""COCO-Stuff-164k and PASCAL-Context readers (datasets.open_dataset) on tiny synthetic layouts
written here, and `eval --discover` on them: no ignored background (the zero-guidance evaluation
scores every pixel of these sets but the unlabelled ones)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from namedmask.data.categories import COCO_STUFF, PASCAL_CONTEXT_59
from namedmask.data.datasets import DatasetError, FolderLabeledSet, check_dataset, open_dataset
from namedmask.stages import discover_eval as de


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode).save(path)


def _jpg(path, h=4, w=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


# stuffthingmaps values: id - 1 (0 = person, 91 = banner = id 92), 255 unlabelled
STUFF_MAP = np.array([[0, 0, 0, 0],
                      [0, 0, 0, 0],
                      [91, 91, 255, 255],
                      [91, 91, 255, 255]])


def _coco_stuff(root, maps="stuffthingmaps_trainval2017"):
    _jpg(root / "images" / "val2017" / "000000000001.jpg")
    _png(root / maps / "val2017" / "000000000001.png", STUFF_MAP)
    return root


def test_coco_stuff_ids_and_names(tmp_path):
    root = _coco_stuff(tmp_path / "coco")
    _png(root / "stuffthingmaps_trainval2017" / "val2017" / "000000000001_labelTrainIds.png", STUFF_MAP)  # not read
    ds = open_dataset("coco-stuff", root)
    assert len(ds) == 1 and ds.background is None and ds.ignore_index == 255
    assert len(ds.class_names) == 183 and ds.class_names[0] == "unlabeled"
    assert (ds.class_names[1], ds.class_names[12], ds.class_names[92], ds.class_names[182]) == (
        "person", "street sign", "banner", "wood")
    lab = ds.read_label(ds[0])
    assert lab.tolist() == [[1] * 4, [1] * 4, [92, 92, 255, 255], [92, 92, 255, 255]]
    # labels.txt (cocostuff's "id: name") overrides the built-in names
    (root / "labels.txt").write_text("".join(f"{i}: {n.upper()}\n" for i, n in enumerate(COCO_STUFF)))
    assert open_dataset("coco-stuff", root).class_names[92] == "BANNER"
    (root / "labels.txt").write_text("0: unlabeled\n1: person\n")
    with pytest.raises(DatasetError, match="labels.txt"):
        open_dataset("coco-stuff", root)


def test_coco_stuff_other_layouts_and_errors(tmp_path):
    # mmseg's place for the raw maps, images straight under the root
    root = tmp_path / "mm"
    _jpg(root / "val2017" / "000000000001.jpg")
    _png(root / "annotations" / "val2017" / "000000000001.png", STUFF_MAP)
    assert open_dataset("coco-stuff", root).read_label(open_dataset("coco-stuff", root)[0])[2, 0] == 92
    bare = tmp_path / "bare"
    _jpg(bare / "images" / "val2017" / "000000000001.jpg")
    with pytest.raises(DatasetError, match="stuffthingmaps_trainval2017/val2017"):
        open_dataset("coco-stuff", bare)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="images/val2017"):
        open_dataset("coco-stuff", tmp_path / "empty")
    _png(bare / "stuffthingmaps_trainval2017" / "val2017" / "000000000002.png", STUFF_MAP)
    with pytest.raises(DatasetError, match="no label file"):
        open_dataset("coco-stuff", bare)
    report = check_dataset("coco-stuff", tmp_path / "nothing")
    assert not report.ok and any("stuffthingmaps_trainval2017" in m for m in report.missing)


def _context_png(root):
    voc = root / "VOCdevkit" / "VOC2010"
    _jpg(voc / "JPEGImages" / "2008_000001.jpg")
    _jpg(voc / "JPEGImages" / "2008_000002.jpg")
    _png(voc / "SegmentationClassContext" / "2008_000001.png", [[1, 1], [0, 59]])
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    return voc


def test_pascal_context_59_mmseg_pngs(tmp_path):
    voc = _context_png(tmp_path)
    ds = open_dataset("pascal-context-59", tmp_path)
    assert ds.root == voc and [it.id for it in ds] == ["2008_000001"] and ds.background is None
    assert ds.class_names == PASCAL_CONTEXT_59 and len(ds.class_names) == 60
    assert ds.read_label(ds[0]).tolist() == [[1, 1], [0, 59]]
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(DatasetError, match="SegmentationContext/val.txt"):
        open_dataset("pascal-context-59", tmp_path)


def _context_mat(root, labels_txt=None):
    from scipy.io import savemat

    voc = root / "VOC2010"
    _jpg(voc / "JPEGImages" / "2008_000001.jpg", 2, 3)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000001\n")
    (root / "trainval").mkdir(parents=True)
    # 459 ids: 2 aeroplane, 458 wood, 5 (artillery: no 59-class), 0 unlabelled, 431, 9 bag
    savemat(str(root / "trainval" / "2008_000001.mat"), {"LabelMap": np.array([[2, 458, 5], [0, 431, 9]],
                                                                              dtype=np.uint16)})
    if labels_txt is not None:
        (root / "labels.txt").write_text(labels_txt)
    return voc


def test_pascal_context_59_from_the_original_mat_files(tmp_path):
    _context_mat(tmp_path)
    ds = open_dataset("pascal-context-59", tmp_path)
    lab = ds.read_label(ds[0])
    # the converters' table: 2 -> aeroplane (1), 458 -> wood (59), 9 -> bag (2); others -> 0
    assert lab.tolist() == [[1, 59, 0], [0, 0, 2]]
    assert [ds.class_names[i] for i in (1, 2, 59)] == ["aeroplane", "bag", "wood"]


def test_pascal_context_459(tmp_path):
    names = {i: f"class{i}" for i in range(1, 460)}
    names.update({2: "aeroplane", 431: "unknown", 458: "wood"})
    _context_mat(tmp_path, "".join(f"{i}: {n}\n" for i, n in names.items()))
    ds = open_dataset("pascal-context-459", tmp_path)
    assert len(ds.class_names) == 460 and ds.class_names[2] == "aeroplane" and ds.background is None
    # "unknown" (431) is no class: mapped to 0, which is neither a candidate nor ignored
    assert ds.read_label(ds[0]).tolist() == [[2, 458, 5], [0, 0, 9]]
    (tmp_path / "labels.txt").unlink()
    with pytest.raises(DatasetError, match="labels.txt"):
        open_dataset("pascal-context-459", tmp_path)


def test_pascal_context_missing_labels_named(tmp_path):
    voc = tmp_path / "VOC2010"
    _jpg(voc / "JPEGImages" / "a.jpg")
    with pytest.raises(DatasetError, match="SegmentationClassContext"):
        open_dataset("pascal-context-59", tmp_path)
    with pytest.raises(DatasetError, match="no PASCAL-Context images"):
        open_dataset("pascal-context-59", tmp_path / "VOC2010" / "JPEGImages")
    report = check_dataset("pascal-context-459", tmp_path)
    assert not report.ok and any("labels.txt" in m for m in report.missing)


class _WordClip:
    """encode_texts: one unit vector per listed word (exact text), every other text one shared
    'other' direction."""

    def __init__(self, words):
        self.words = list(words)

    def encode_texts(self, texts):
        out = torch.zeros(len(texts), len(self.words) + 1)
        for i, t in enumerate(texts):
            out[i, self.words.index(t) if t in self.words else len(self.words)] = 1.0
        return out


def _discovered(out, stem, pred, names):
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "segments").mkdir(exist_ok=True)
    (out / "discover.json").write_text(json.dumps({"model": "nm-tiny", "pretrained": None}))
    _png(out / "labels" / f"{stem}.png", np.asarray(pred) + 1)
    (out / "segments" / f"{stem}.json").write_text(json.dumps({"segments": [{"id": i + 1, "name": n}
                                                                           for i, n in enumerate(names)]}))


def test_eval_discover_coco_stuff(tmp_path):
    ds = open_dataset("coco-stuff", _coco_stuff(tmp_path / "coco"))
    out = tmp_path / "disc"
    # seg 0 = the person rows, seg 1 = the lower half (banner + unlabelled) named "car" (not in the image)
    _discovered(out, "000000000001", [[0] * 4, [0] * 4, [1] * 4, [1] * 4], ["person", "car"])
    r = de.evaluate_discovered(out, ds, mode="t-t", clip=_WordClip(["person", "car", "banner"]))
    # person 8/8 = 1; banner (in the image, no segment) 0; car: its 4 banner pixels are not ignored
    # (no background class), the 4 unlabelled ones are -> 0/4 = 0
    assert r["iou_union"] == pytest.approx(1 / 3, abs=1e-6) and r["classes"] == 182
    assert r["recall_union"] == pytest.approx((1 + 100 / 3) / 101, abs=1e-6)


def test_eval_discover_pascal_context_background_scores(tmp_path):
    voc = _context_png(tmp_path)
    _png(voc / "SegmentationClassContext" / "2008_000001.png", [[1, 1], [0, 0]])
    out = tmp_path / "disc"
    _discovered(out, "2008_000001", [[0, 0], [1, 1]], ["aeroplane", "cat"])
    clip = _WordClip(["aeroplane", "cat"])
    ctx = open_dataset("pascal-context-59", tmp_path)
    # cat is absent; its segment lies on the pixels of no 59-class, which PASCAL-Context scores: IoU 0
    assert de.evaluate_discovered(out, ctx, clip=clip)["iou_union"] == pytest.approx(0.5, abs=1e-6)
    # the same maps as a VOC-style folder set (0 = background, ignored for an absent class): cat is NaN
    folder = tmp_path / "folder"
    _jpg(folder / "images" / "2008_000001.jpg")
    _png(folder / "labels" / "2008_000001.png", [[1, 1], [0, 0]])
    voc_like = FolderLabeledSet(folder, list(PASCAL_CONTEXT_59))
    assert de.evaluate_discovered(out, voc_like, clip=clip)["iou_union"] == pytest.approx(1.0, abs=1e-6)


def test_eval_discover_cli_reads_the_new_layouts(tmp_path):
    from click.testing import CliRunner

    from namedmask.cli import cli

    root = _coco_stuff(tmp_path / "coco")
    out = tmp_path / "disc"
    _discovered(out, "000000000001", [[0] * 4, [0] * 4, [1] * 4, [1] * 4], ["person", "car"])
    result = CliRunner().invoke(cli, ["eval", "--discover", str(out), "--dataset", "coco-stuff", "--root", str(root),
                                      "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["classes"] == 182 and metrics["images"] == 1
    # the command gives the library's numbers (the same random tiny CLIP from discover.json)
    assert metrics["iou_union"] == pytest.approx(de.evaluate_discovered(out, open_dataset("coco-stuff", root))[
        "iou_union"], abs=1e-6)
    missing = CliRunner().invoke(cli, ["eval", "--discover", str(out), "--dataset", "pascal-context-59",
                                       "--root", str(tmp_path / "coco")])
    assert missing.exit_code != 0 and "PASCAL-Context" in missing.output and "Traceback" not in missing.output
