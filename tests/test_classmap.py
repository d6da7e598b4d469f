"""Model classes -> dataset classes (namedmask.data.classmap), and its use by `eval` and
`predict`: names paired through normalisation and synonyms, unmapped ground truth is an error
naming file and id (or, --ignore-unmapped, unscored and counted), the report says what was
scored."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.config import ModelConfig, from_dict, parse_overrides
from namedmask.data.categories import VOC, get_category_set, voc_palette
from namedmask.data.classmap import ClassMap, ClassMapError, category_words
from namedmask.models.deeplab import build_model, save_segmenter
from namedmask.models.inference import predict_label
from synthetic import one_thread, tiny_model_overrides



def write_png(path, arr, palette=True):
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8))
    if palette:
        img = img.convert("P")
        img.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------------------ the map itself

def test_identity_and_names_paired_by_normalised_words():
    assert ClassMap(list(VOC), list(VOC)).is_identity
    model = ["background", "tv/monitor", "dining table", "Potted Plant", "cat"]
    cmap = ClassMap(model, list(VOC))
    assert cmap.model_to_dataset == [0, 20, 11, 16, 8]
    assert cmap.scored == [0, 8, 11, 16, 20]
    assert cmap.describe()["scored_classes"] == ["background", "cat", "diningtable", "pottedplant", "tvmonitor"]


def test_synonyms_on_either_side_and_ambiguity():
    words = category_words("voc")
    assert words["tvmonitor"] == ("tv/monitor",) and words["cat"] == ("cat",)
    cmap = ClassMap(["background", "kitty", "airplane"], list(VOC), model_words={"kitty": ("cat",)},
                    dataset_words={"aeroplane": ("airplane",)})
    assert cmap.model_to_dataset == [0, 8, 1]
    with pytest.raises(ClassMapError, match="several dataset classes"):
        ClassMap(["background", "pet"], ["background", "cat", "dog"], model_words={"pet": ("cat", "dog")})


def test_model_class_the_dataset_lacks():
    with pytest.raises(ClassMapError, match=r"\['unicorn'\].*--ignore-unmapped"):
        ClassMap(["background", "cat", "unicorn"], list(VOC))
    cmap = ClassMap(["background", "cat", "unicorn"], list(VOC), ignore_unmapped=True)
    assert cmap.map_prediction(torch.tensor([0, 1, 2])).tolist() == [0, 8, 0]  # scored as background
    assert cmap.describe()["unmapped_model_classes_scored_as_background"] == ["unicorn"]


def test_ground_truth_ids_nothing_maps_to():
    cmap = ClassMap(["background", "cat", "dog"], list(VOC))
    gt = torch.tensor([[0, 8, 12], [15, 255, 15]], dtype=torch.uint8)
    with pytest.raises(ClassMapError, match=r"a\.png: ground-truth id\(s\) 15 \(person\)"):
        cmap.map_ground_truth(gt, "a.png")
    loose = ClassMap(["background", "cat", "dog"], list(VOC), ignore_unmapped=True)
    out = loose.map_ground_truth(gt, "a.png")
    assert out.tolist() == [[0, 8, 12], [255, 255, 255]] and out.dtype == torch.uint8
    assert loose.describe()["unmapped_ground_truth_pixels"] == {"person": 2}
    assert "scored 3 of 21 classes: background, cat, dog; unscored ground-truth pixels: 2" == loose.summary()
    # a value outside the declared classes, and predictions the model cannot make
    two = ClassMap(["0", "1"], ["0", "1"])
    with pytest.raises(ClassMapError, match=r"g\.png: .*10 \(not one of the 2 declared classes\)"):
        two.map_ground_truth(torch.tensor([0, 1, 10, 255]), "g.png")
    with pytest.raises(ClassMapError, match=r"p\.png: value\(s\) \[5\]"):
        two.map_prediction(torch.tensor([0, 5]), "p.png")


def test_ground_truth_check_without_sorting_agrees_with_the_sorted_one():
    """map_ground_truth's check by min/max passes (no torch.unique) decides as the value list
    does, on uint8 and int64 maps, with the ignore value above, inside and below the classes,
    scored ids contiguous or not: the map comes back unchanged exactly when every value is
    scored or ignored, else the same error names the same values."""
    rng = np.random.default_rng(0)
    cases = [(list(VOC), list(VOC), 255), (["background", "cat", "dog"], list(VOC), 255),
             (["0", "1", "2"], ["0", "1", "2"], 1), (["0", "1", "2"], ["0", "1", "2"], -1)]
    for model, dataset, ignore in cases:
        cmap = ClassMap(model, dataset, ignore_index=ignore)
        allowed = set(cmap.scored) | {ignore}
        for dtype in (torch.uint8, torch.int64):
            for trial in range(40):
                values = sorted(allowed | {int(v) for v in rng.integers(-2, 258, 2)}) if trial % 2 else sorted(allowed)
                values = [v for v in values if dtype == torch.int64 or 0 <= v <= 255]
                gt = torch.tensor(rng.choice(values, (5, 7)), dtype=dtype)
                bad = sorted(v for v in set(gt.tolist()[0] + sum(gt.tolist()[1:], [])) if v not in allowed)
                if not bad:
                    assert cmap.map_ground_truth(gt) is gt
                else:
                    with pytest.raises(ClassMapError, match=rf"ground-truth id\(s\) {bad[0]} "):
                        cmap.map_ground_truth(gt)
    # the identity map hands a uint8 prediction back as it is (confusion_matrix's uint8 path)
    pred = torch.tensor([[0, 3, 20]], dtype=torch.uint8)
    assert ClassMap(list(VOC), list(VOC)).map_prediction(pred) is pred


# ------------------------------------------------------------------------------ eval on files

@pytest.fixture
def voc_pairs(tmp_path):
    """Ground truth in VOC ids (background, cat, dog, person, ignore); predictions in the ids of
    a 3-class file `cats.txt` (dog = 1, cat = 2)."""
    rng = np.random.default_rng(0)
    names = tmp_path / "cats.txt"
    names.write_text("dog\ncat | kitty\n")
    model_of = {0: 0, 12: 1, 8: 2}
    gts, preds = [], []
    for i in range(3):
        gt = rng.choice([0, 8, 12], (20, 30))
        gt[:2] = 255
        gt[5, 5:9] = 15  # a person: no class of cats.txt
        pred = np.vectorize(lambda v: model_of.get(int(v), 0))(np.where(rng.random(gt.shape) < 0.8, gt, 0))
        write_png(tmp_path / "gt" / f"{i}.png", gt)
        write_png(tmp_path / "pred" / f"{i}.png", pred, palette=False)
        gts.append(gt), preds.append(pred)
    return tmp_path, names, gts, preds


def test_eval_files_maps_by_name_and_fails_loudly_on_unmapped_ids(voc_pairs):
    root, names, gts, preds = voc_pairs
    base = ["eval", "--pred", str(root / "pred"), "--gt", str(root / "gt"), "--class-names", str(names)]
    res = CliRunner().invoke(cli, base)  # without --gt-classes: ids 8, 12, 15 are outside the 3 classes
    assert res.exit_code != 0 and "0.png" in res.output and "8 (not one of the 3 declared classes)" in res.output
    res = CliRunner().invoke(cli, base + ["--gt-classes", "voc"])
    assert res.exit_code != 0 and "15 (person)" in res.output and "--ignore-unmapped" in res.output
    out = root / "m.json"
    res = CliRunner().invoke(cli, base + ["--gt-classes", "voc", "--ignore-unmapped", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "scored 3 of 21 classes: background, cat, dog" in res.output
    data = json.loads(out.read_text())
    assert data["scored_classes"] == ["background", "cat", "dog"]
    assert data["model_to_dataset"] == {"background": "background", "dog": "dog", "cat": "cat"}
    assert data["unmapped_ground_truth_pixels"] == {"person": 12}
    # the oracle: predictions translated to VOC ids by hand, persons and 255 unscored
    to_voc = np.array([0, 12, 8])
    cm = np.zeros((21, 21), np.int64)
    for g, p in zip(gts, preds):
        k = (g != 255) & (g != 15)
        cm += np.bincount(g[k] * 21 + to_voc[p[k]], minlength=441).reshape(21, 21)
    assert np.array_equal(np.array(data["confusion_matrix"]), cm)
    iou = [cm[c, c] / (cm[c].sum() + cm[:, c].sum() - cm[c, c]) for c in (0, 8, 12)]
    assert data["miou"] == pytest.approx(np.mean(iou), abs=1e-12)


def test_eval_num_classes_rejects_ground_truth_outside_them(tmp_path):
    gt = np.zeros((6, 7), np.uint8)
    gt[1, 1], gt[2, 2], gt[3, 3], gt[0] = 1, 10, 15, 255
    write_png(tmp_path / "gt" / "x.png", gt)
    write_png(tmp_path / "pred" / "x.png", np.minimum(gt, 1), palette=False)
    res = CliRunner().invoke(cli, ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                                   "--num-classes", "2"])
    assert res.exit_code != 0 and "x.png" in res.output and "10 (not one of the 2 declared classes)" in res.output
    assert "15 (not one" in res.output and "mIoU" not in res.output


# ------------------------------------------------------------------------------ a model on VOC

MODEL_NAMES = ["background", "cat", "dog", "car"]


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    """A tiny 4-class segmenter (random weights) and a VOC2012 tree of generated images."""
    root = tmp_path_factory.mktemp("vocrun")
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, parse_overrides([o.removeprefix("model.") for o in tiny_model_overrides()]))
    model = build_model(cfg, len(MODEL_NAMES)).eval()
    save_segmenter(root / "run", model, MODEL_NAMES)
    voc = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(1)
    ids = []
    (voc / "JPEGImages").mkdir(parents=True)
    for i in range(3):
        ids.append(f"2007_00000{i}")
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{ids[-1]}.jpg")
        gt = rng.choice([0, 8, 12, 7], (24, 32)).astype(np.uint8)
        gt[10:14, 10:20] = 15  # person
        gt[0] = 255
        write_png(voc / "SegmentationClass" / f"{ids[-1]}.png", gt)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root, model


def test_eval_checkpoint_on_voc_scores_the_mapped_classes_and_says_so(voc_run):
    root, _ = voc_run
    with one_thread():
        base = ["eval", "--checkpoint", str(root / "run"), "--dataset", "voc", "--root", str(root / "VOCdevkit"),
                "--device", "cpu"]
        res = CliRunner().invoke(cli, base)
        assert res.exit_code != 0 and "15 (person)" in res.output and "2007_000000.png" in res.output
        out = root / "m.json"
        res = CliRunner().invoke(cli, base + ["--ignore-unmapped", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "scored 4 of 21 classes: background, car, cat, dog" in res.output
    data = json.loads(out.read_text())
    assert data["scored_classes"] == ["background", "car", "cat", "dog"]
    assert data["unmapped_ground_truth_pixels"] == {"person": 3 * 40}
    iou = np.array(data["per_class_iou"], dtype=float)
    assert np.isnan(iou[[i for i in range(21) if i not in (0, 7, 8, 12)]]).all()
    assert data["miou"] == pytest.approx(np.nanmean(iou), abs=1e-12)


def test_predict_writes_dataset_ids_when_given_a_class_set(voc_run, tmp_path):
    root, model = voc_run
    image = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    with one_thread():
        res = CliRunner().invoke(cli, ["predict", "--checkpoint", str(root / "run"), str(image), "--out",
                                       str(tmp_path / "voc"), "--classes", "voc", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        want = predict_label(model, torch.from_numpy(np.array(Image.open(image).convert("RGB"))), "cpu")
    got = np.array(Image.open(tmp_path / "voc" / "labels" / "2007_000001.png"))
    assert np.array_equal(got, np.array([0, 8, 12, 7])[want.numpy()])
    assert set(np.unique(got)) <= {0, 7, 8, 12}
    res = CliRunner().invoke(cli, ["predict", "--checkpoint", str(root / "run"), str(image), "--out",
                                   str(tmp_path / "coca"), "--classes", "coca", "--device", "cpu"])
    assert res.exit_code != 0 and "'cat'" in res.output and "--ignore-unmapped" in res.output


def test_category_line_without_a_name_is_an_error(tmp_path):
    f = tmp_path / "cats.txt"
    f.write_text("dog\n| kitty\n")
    with pytest.raises(ValueError, match=r"cats\.txt:2: empty category name"):
        get_category_set(str(f))


def test_imagenet_s_classes_are_prompted_with_their_wordnet_lemmas(tmp_path):
    """A category line that is a WordNet id keeps the id as its class name (it pairs with
    ImageNet-S's classes by identity) and is prompted with its lemmas (timm's ImageNet lemma file:
    n01443537 = goldfish, Carassius auratus); a model trained on plain names pairs with
    ImageNet-S's ids through the same lemmas."""
    from namedmask.data.categories import synset_words, wordnet_lemmas

    assert wordnet_lemmas()["n01443537"] == ("goldfish", "Carassius auratus")
    assert synset_words("n01443537") == ("n01443537", "goldfish", "Carassius auratus") and synset_words("cat") == ()
    path = tmp_path / "imagenet_s.txt"
    path.write_text("n01443537\nn03126707 | construction crane\n")
    cs = get_category_set(str(path))
    assert cs.names == ("background", "n01443537", "n03126707")
    assert cs.prompt_words("n01443537") == ("goldfish", "Carassius auratus")
    assert cs.prompt_words("n03126707") == ("crane", "construction crane")
    dataset = ["background", "n01443537", "n02012849", "n03126707"]  # goldfish, crane (bird), crane (machine)
    assert ClassMap(list(cs.names), dataset, ignore_unmapped=True).model_to_dataset == [0, 1, 3]
    named = ["background", "goldfish"]
    cmap = ClassMap(named, dataset, dataset_words=category_words("imagenet-s3", dataset), ignore_unmapped=True)
    assert cmap.model_to_dataset == [0, 1]
    with pytest.raises(ClassMapError, match="matches several dataset classes"):  # two synsets called 'crane'
        ClassMap(["background", "crane"], dataset, dataset_words=category_words("imagenet-s3", dataset))
    bad = tmp_path / "bad.txt"
    bad.write_text("n00000001\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: n00000001 is not an ImageNet-21k WordNet id"):
        get_category_set(str(bad))
