"""Category sets, dataset readers (VOC on a VOCdevkit tree made from voc_mini; generated CoCA,
Cityscapes and ImageNet-S trees), COCO-Object conversion and image pools."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.data import categories
from namedmask.data.categories import get_category_set
from namedmask.data.coco import prepare_coco_object
from namedmask.data.datasets import (DatasetError, ImagePool, check_dataset, list_pool_images, open_dataset)
from namedmask.data.labelmaps import read_label_map


# ---------------------------------------------------------------------------------------------
# Category sets

def test_builtin_category_sets():
    sizes = {"voc": 21, "coco-object": 81, "cityscapes-object": 15, "coca": 81}
    for name, n in sizes.items():
        cs = get_category_set(name)
        assert cs.num_classes == n and cs.names[0] == "background" and len(set(cs.names)) == n
    coco = get_category_set("coco-object").names
    assert (coco[1], coco[80]) == ("person", "toothbrush")
    assert categories.COCO_ID_TO_CONTIGUOUS[1] == 1 and categories.COCO_ID_TO_CONTIGUOUS[90] == 80
    assert sorted(categories.COCO_ID_TO_CONTIGUOUS.values()) == list(range(1, 81))
    assert 12 not in categories.COCO_ID_TO_CONTIGUOUS  # "street sign" is not a COCO 2017 class
    cs = get_category_set("cityscapes-object").names
    assert cs[1:5] == ("pole", "polegroup", "traffic light", "traffic sign") and cs[14] == "bicycle"
    assert categories.CITYSCAPES_LABEL_ID_TO_OBJECT == {17: 1, 18: 2, 19: 3, 20: 4, 24: 5, 25: 6, 26: 7, 27: 8,
                                                         28: 9, 29: 10, 30: 11, 31: 12, 32: 13, 33: 14}
    coca = get_category_set("coca").names
    assert coca[1] == "Accordion" and coca[80] == "whisk" and list(coca[1:]) == sorted(coca[1:])


def test_category_set_from_text_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my classes\ncat | kitty, feline\n\ndog\n")
    cs = get_category_set(str(f))
    assert cs.names == ("background", "cat", "dog") and cs.synonyms == {"cat": ("kitty", "feline")}
    f.write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="duplicate"):
        get_category_set(str(f))
    with pytest.raises(ValueError, match="unknown category set"):
        get_category_set("no-such-set")


# ---------------------------------------------------------------------------------------------
# VOC on a VOCdevkit tree made from voc_mini

@pytest.fixture
def vocdevkit(voc_mini, tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
        for f in sorted((voc_mini / sub).iterdir()):
            (voc / sub / f.name).symlink_to(f)
    ids = sorted(p.stem for p in (voc_mini / "SegmentationClass").glob("*.png"))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:20]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[20:]) + "\n")
    return tmp_path, ids


def test_voc_reader(vocdevkit, voc_mini):
    root, ids = vocdevkit
    for given in (root, root / "VOCdevkit", root / "VOCdevkit" / "VOC2012"):
        ds = open_dataset("voc", given, "val")
        assert [it.id for it in ds] == ids[20:]
    assert len(open_dataset("voc", root, "train")) == 20
    assert ds.class_names == get_category_set("voc").names and ds.ignore_index == 255 and not ds.binary
    seen = set()
    for item in ds:
        label = ds.read_label(item)
        raw = np.array(Image.open(voc_mini / "SegmentationClass" / f"{item.id}.png"))
        assert label.dtype == np.uint8 and np.array_equal(label, raw)
        assert Image.open(item.image).size[::-1] == label.shape
        seen |= set(np.unique(label).tolist())
    assert seen <= set(range(21)) | {255} and 255 in seen


def test_voc_reader_errors(vocdevkit, tmp_path):
    root, ids = vocdevkit
    with pytest.raises(DatasetError, match="test.txt"):
        open_dataset("voc", root, "test")
    split = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + "2099_999999\n")
    with pytest.raises(DatasetError, match="2099_999999"):
        open_dataset("voc", root, "val")
    with pytest.raises(DatasetError, match="no VOC2012"):
        open_dataset("voc", tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages", "val")
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("pascal", root)


def test_check_command_voc(vocdevkit, voc_mini):
    root, _ = vocdevkit
    result = CliRunner().invoke(cli, ["prepare", "check", "--dataset", "voc", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "10 labelled images ready" in result.output and "MISSING" not in result.output
    # voc_mini itself has no ImageSets: the check names exactly that
    result = CliRunner().invoke(cli, ["prepare", "check", "--dataset", "voc", "--root", str(voc_mini)])
    assert result.exit_code == 1
    assert "MISSING" in result.output and "ImageSets/Segmentation/val.txt" in result.output
    assert "found" in result.output and "30 image files" in result.output


# ---------------------------------------------------------------------------------------------
# COCO-Object conversion

def _poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco_root(tmp_path):
    """Two 40x60 images: image 1 has a big person with a small cup in front (overlap), a crowd
    of people and a dog inside the crowd; image 2 has no annotation."""
    from pycocotools import mask as mask_util

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    for name in ("000000000001.jpg", "000000000002.jpg"):
        Image.new("RGB", (60, 40), (120, 80, 40)).save(root / "val2017" / name)
    crowd = np.zeros((40, 60), np.uint8, order="F")
    crowd[25:40, 30:60] = 1
    rle = mask_util.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    anns = [
        # listed small-first on purpose: the rule (smaller wins) must not depend on json order
        {"id": 1, "image_id": 1, "category_id": 47, "iscrowd": 0, "area": 25.0, "segmentation": _poly(10, 10, 15, 15),
         "bbox": [10, 10, 5, 5]},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 400.0, "segmentation": _poly(5, 5, 25, 25),
         "bbox": [5, 5, 20, 20]},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 450.0, "segmentation": rle,
         "bbox": [30, 25, 30, 15]},
        {"id": 4, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 25.0, "segmentation": _poly(40, 30, 45, 35),
         "bbox": [40, 30, 5, 5]},
    ]
    cats = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in categories.COCO_THINGS]
    images = [{"id": 1, "file_name": "000000000001.jpg", "height": 40, "width": 60},
              {"id": 2, "file_name": "000000000002.jpg", "height": 40, "width": 60}]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _rect_mask(x0, y0, x1, y1):
    """pycocotools' rasterisation of a rectangle polygon (x0,y0)-(x1,y1)."""
    from pycocotools import mask as mask_util
    return mask_util.decode(mask_util.frPyObjects(_poly(x0, y0, x1, y1), 40, 60)).max(-1).astype(bool)


def test_coco_object_conversion(coco_root):
    counts = prepare_coco_object(coco_root, "val", progress=False)
    assert counts == {"images": 2, "written": 2, "kept": 0, "out_dir": str(coco_root / "annotations" / "coco_object_val2017")}
    ds = open_dataset("coco-object", coco_root, "val")
    assert [it.id for it in ds] == ["000000000001", "000000000002"] and ds.num_classes == 81
    label = ds.read_label(ds[0])
    expected = np.zeros((40, 60), np.uint8)
    expected[25:40, 30:60] = 255                          # crowd -> ignore
    expected[_rect_mask(5, 5, 25, 25)] = 1                # person
    expected[_rect_mask(10, 10, 15, 15)] = 47             # cup (COCO id 47 -> 42) drawn over the person
    expected[expected == 47] = categories.COCO_ID_TO_CONTIGUOUS[47]
    expected[_rect_mask(40, 30, 45, 35)] = 18             # dog inside the crowd is kept
    expected[expected == 18] = categories.COCO_ID_TO_CONTIGUOUS[18]
    assert np.array_equal(label, expected)
    assert set(np.unique(label).tolist()) == {0, 1, 42, 17, 255}   # person, cup, dog, ignore
    assert not ds.read_label(ds[1]).any()                 # no annotation: all background


def test_coco_object_resumes_and_cli(coco_root):
    out = coco_root / "annotations" / "coco_object_val2017"
    prepare_coco_object(coco_root, "val", progress=False)
    (out / "000000000002.png").unlink()                   # as if interrupted before the 2nd image
    first = (out / "000000000001.png").stat().st_mtime_ns
    result = CliRunner().invoke(cli, ["prepare", "coco-object", "--root", str(coco_root)])
    assert result.exit_code == 0, result.output
    assert "1 masks written, 1 already there" in result.output
    assert (out / "000000000001.png").stat().st_mtime_ns == first and (out / "000000000002.png").is_file()
    assert not list(out.glob(".*tmp*")), "no temporary files left behind"
    result = CliRunner().invoke(cli, ["prepare", "check", "--dataset", "coco-object", "--root", str(coco_root)])
    assert result.exit_code == 0 and "2 labelled images ready" in result.output


def test_coco_object_missing_inputs(tmp_path, coco_root):
    result = CliRunner().invoke(cli, ["prepare", "coco-object", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "instances_val2017.json" in result.output
    with pytest.raises(DatasetError, match="namedmask prepare coco-object"):
        open_dataset("coco-object", coco_root, "val")
    report = check_dataset("coco-object", coco_root)
    assert not report.ok and any("coco_object_val2017" in m for m in report.missing)


# ---------------------------------------------------------------------------------------------
# CoCA, Cityscapes-object, ImageNet-S on generated trees

def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_coca_reader(tmp_path):
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:7] = 255
    mask[0, 0] = 100                                      # anti-aliased edge value below the threshold
    for cat, stem in (("Accordion", "a1"), ("whisk", "w1"), ("whisk", "w2")):
        _save(tmp_path / "image" / cat / f"{stem}.jpg", np.zeros((8, 10, 3), np.uint8))
        _save(tmp_path / "binary" / cat / f"{stem}.png", mask)
    ds = open_dataset("coca", tmp_path)
    assert ds.binary and ds.num_classes == 81 and [it.id for it in ds] == ["Accordion/a1", "whisk/w1", "whisk/w2"]
    whisk = ds.read_label(ds[1])
    assert whisk.dtype == np.uint8 and set(np.unique(whisk).tolist()) == {0, 80}
    assert np.array_equal(whisk == 80, mask == 255) and ds.read_label(ds[0]).max() == 1
    _save(tmp_path / "image" / "spaceship" / "s.jpg", np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(DatasetError, match="spaceship"):
        open_dataset("coca", tmp_path)


def test_cityscapes_object_reader(tmp_path):
    label_ids = np.array([[0, 7, 17, 18], [24, 26, 33, 34], [1, 19, 20, 31]], np.uint8)
    stem = "frankfurt_000000_000294"
    _save(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", np.zeros((3, 4, 3), np.uint8))
    _save(tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", label_ids)
    _save(tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_color.png", np.zeros((3, 4, 3), np.uint8))
    ds = open_dataset("cityscapes-object", tmp_path, "val")
    assert [it.id for it in ds] == [f"frankfurt/{stem}"] and ds.num_classes == 15
    assert ds.read_label(ds[0]).tolist() == [[0, 0, 1, 2], [5, 7, 14, 0], [0, 3, 4, 12]]


def test_imagenet_s_reader(tmp_path):
    root = tmp_path / "ImageNetS50"
    ids = np.array([[0, 1, 300], [919, 1000, 255]])
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
    for wnid in ("n01443537", "n01491361"):
        _save(root / "validation" / wnid / f"ILSVRC2012_val_{wnid}.JPEG", np.zeros((2, 3, 3), np.uint8), None)
        _save(root / "validation-segmentation" / wnid / f"ILSVRC2012_val_{wnid}.png", rgb)
    _save(root / "validation" / "n09999999" / "ILSVRC2012_val_unlabelled.JPEG", np.zeros((2, 3, 3), np.uint8))
    ds = open_dataset("imagenet-s", root)
    assert ds.name == "imagenet-s2" and ds.class_names == ("background", "n01443537", "n01491361")
    assert len(ds) == 2 and ds.ignore_index == 1000
    label = ds.read_label(ds[0])
    assert label.dtype == np.int32 and np.array_equal(label, ids)


# ---------------------------------------------------------------------------------------------
# Image pools

def test_pool_folder_tree(tmp_path):
    for rel in ("b/2.jpg", "a/1.PNG", "a/sub/3.webp", "c.jpeg", "notes.txt", ".hidden/x.jpg", "a/.x.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    pool = list_pool_images(tmp_path)
    assert isinstance(pool, ImagePool) and pool.root == tmp_path
    assert pool == ["a/1.PNG", "a/sub/3.webp", "b/2.jpg", "c.jpeg"]
    assert pool.absolute(2) == tmp_path / "b" / "2.jpg" and pool.absolute_paths()[2] == pool.absolute(2)


def test_pool_list_file(tmp_path):
    (tmp_path / "list.txt").write_text("# pool\nimgs/b.jpg\nimgs/a.jpg\n\nimgs/a.jpg\n")
    pool = list_pool_images(tmp_path / "list.txt")
    assert pool == ["imgs/a.jpg", "imgs/b.jpg"] and pool.root == tmp_path
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DatasetError, match="no images"):
        list_pool_images(tmp_path / "empty.txt")


def test_pool_imagenet_tree(tmp_path):
    for rel in ("train/n01440764/n01440764_10026.JPEG", "train/n01443537/n01443537_2.JPEG",
                "val/n01440764/ILSVRC2012_val_00000293.JPEG", "test/ILSVRC2012_test_1.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list_pool_images(tmp_path) == ["train/n01440764/n01440764_10026.JPEG", "train/n01443537/n01443537_2.JPEG"]


def test_pool_real_photos(pool_dir):
    pool = list_pool_images(pool_dir)
    assert len(pool) == 265 and pool == sorted(pool) and all(p.endswith(".jpg") for p in pool)
    with pytest.raises(DatasetError):
        list_pool_images(pool_dir / "nope")
