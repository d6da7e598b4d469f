"""`namedmask predict` and model-based evaluation on a LabeledSet-like object: label PNGs at
native resolution, overlays with a legend, agreement with the file-based eval, binary sets,
class matching by name."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from namedmask.cli import cli
from namedmask.config import ModelConfig, from_dict, parse_overrides
from namedmask.data.datasets import FolderLabeledSet, LabeledItem
from namedmask.models.deeplab import build_model, save_segmenter
from namedmask.data.classmap import ClassMap, ClassMapError
from namedmask.models.inference import predict_label
from namedmask.report import overlay_image, report_palette
from namedmask.evaluation import evaluate_model
from namedmask.stages.evaluate import evaluate_checkpoint, evaluate_label_maps
from synthetic import one_thread, tiny_model_overrides, write_labeled_folder

NAMES = ["background", "disc", "square", "triangle"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny segmenter with random weights, its head biased so every class appears."""
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, parse_overrides([o.removeprefix("model.") for o in tiny_model_overrides()]))
    model = build_model(cfg, len(NAMES)).eval()
    path = tmp_path_factory.mktemp("run")
    save_segmenter(path, model, NAMES)
    return path, model


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return write_labeled_folder(tmp_path_factory.mktemp("val"), count=6, size=48)


def test_predict_writes_labels_and_overlays(run, val, tmp_path):
    run_dir, model = run
    odd = tmp_path / "odd.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(odd)
    res = CliRunner().invoke(cli, ["predict", "--checkpoint", str(run_dir), str(val / "images"), str(odd),
                                   "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    labels = sorted((tmp_path / "out" / "labels").glob("*.png"))
    assert [p.stem for p in labels] == ["000", "001", "002", "003", "004", "005", "odd"]
    lab = np.array(Image.open(tmp_path / "out" / "labels" / "odd.png"))
    assert lab.shape == (37, 53) and lab.max() < len(NAMES)
    x = torch.from_numpy(np.array(Image.open(odd).convert("RGB")))
    assert np.array_equal(lab, predict_label(model, x, "cpu").numpy())
    overlay = Image.open(tmp_path / "out" / "overlays" / "odd.png")
    assert overlay.height >= 37 and overlay.width > 53  # legend strip on the right
    res = CliRunner().invoke(cli, ["predict", "--checkpoint", str(run_dir), str(tmp_path / "missing.png"),
                                   "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and "missing.png" in res.output
    res = CliRunner().invoke(cli, ["predict", "--checkpoint", str(tmp_path), str(odd), "--out", str(tmp_path / "o3")])
    assert res.exit_code != 0 and "no trained segmenter" in res.output


def test_overlay_legend_lists_present_classes():
    image = torch.full((20, 30, 3), 100, dtype=torch.uint8)
    label = torch.zeros(20, 30, dtype=torch.long)
    label[5:10, 5:10] = 3
    out = np.array(overlay_image(image, label, NAMES))
    colours = report_palette()  # pictures use the report palette; label PNGs keep VOC's
    assert np.array_equal(out[7, 7], ((100 + colours[3].astype(float)) / 2).round().astype(np.uint8))
    assert np.array_equal(out[0, 0], [100, 100, 100])
    legend = out[:, 30:].reshape(-1, 3)
    assert (legend == colours[3]).all(axis=1).any() and not (legend == colours[1]).all(axis=1).any()


def test_model_eval_equals_file_eval_of_its_predictions(run, val, tmp_path):
    run_dir, _ = run
    CliRunner().invoke(cli, ["predict", "--checkpoint", str(run_dir), str(val / "images"), "--out",
                             str(tmp_path), "--device", "cpu", "--no-overlays"])
    from_files = evaluate_label_maps(tmp_path / "labels", val / "labels", len(NAMES), class_names=NAMES,
                                     progress=False)
    from_model = evaluate_checkpoint(run_dir, "folder", val, device="cpu", progress=False)
    assert torch.equal(from_model.confusion, from_files.confusion)
    assert from_model.to_dict().keys() == from_files.to_dict().keys()


class BinarySet:
    """A LabeledSet-like object (CoCA style): one class per image, 255 ignored."""
    binary, ignore_index, class_names = True, 255, NAMES

    def __init__(self, folder):
        self.folder = FolderLabeledSet(folder)

    def __iter__(self):
        return iter(self.folder)

    def read_label(self, item: LabeledItem):
        lab = self.folder.read_label(item).astype(np.uint8)
        lab[:2] = 255
        return lab


def test_binary_set_reports_mean_foreground_iou(run, val):
    _, model = run
    data = BinarySet(val)
    report = evaluate_model(model, data, NAMES, progress=False)
    ious = []
    for item in data:
        gt = torch.from_numpy(data.read_label(item).astype(np.int64))
        pred = predict_label(model, torch.from_numpy(np.array(Image.open(item.image).convert("RGB"))), "cpu") > 0
        valid = gt != 255
        inter, union = (pred & (gt > 0) & valid).sum(), ((pred | (gt > 0)) & valid).sum()
        ious.append(float(inter) / float(union) if union else 1.0)
    assert report.extra["mean_fg_iou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert report.metrics.num_classes == len(NAMES) and "mean_fg_iou" in report.to_dict()  # a (1 + C)-class mIoU


def test_classes_are_matched_by_name():
    assert ClassMap(NAMES, NAMES).lookup.tolist() == [0, 1, 2, 3]
    assert ClassMap(NAMES, ["background", "triangle", "x", "disc", "square"]).lookup.tolist() == [0, 3, 4, 1]
    with pytest.raises(ClassMapError, match="triangle"):
        ClassMap(NAMES, ["background", "disc", "square"])


def test_eval_cli_unknown_or_missing_dataset_is_a_clean_error(run, tmp_path):
    run_dir, _ = run
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run_dir), "--dataset", "voc", "--root",
                                   str(tmp_path / "nowhere"), "--device", "cpu"])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run_dir), "--dataset", "folder", "--root",
                                   str(tmp_path / "nowhere"), "--device", "cpu"])
    assert res.exit_code != 0 and "nowhere/images" in res.output


# ------------------------------------------------------------- two-stage open vocabulary (--proposals)

TINY_CLIP = ["--model", "nm-tiny", "--pretrained", "random", "--templates", "simple"]


def _hand_labels(clip, image, masks, classes, background=("background",), threshold=None):
    """The two-stage rule written out: masked-crop embedding per region, softmax over the
    background + class prompts of scale x cosine, summed per label, argmax; threshold -> 0.
    classes: per class, its words."""
    import torch.nn.functional as F
    from namedmask.models import zero_guidance as zg
    from namedmask.models.maskclip import ensemble_text_embeddings
    from namedmask.models.prompts import get_templates

    text = ensemble_text_embeddings(clip, classes, get_templates("simple"))
    bg = ensemble_text_embeddings(clip, [(w,) for w in background], get_templates("simple"))
    crops, cms = zg.masked_crops(image, masks, clip.image_size, clip.mean)
    emb = F.normalize(zg.clip_forward(clip, zg.normalise(clip, crops)).float(), dim=-1)
    scale = float(clip.model.logit_scale.detach().exp().clamp(max=100))
    p = (scale * emb @ torch.cat([bg, text]).T).softmax(1)
    scores = torch.cat([p[:, :len(bg)].sum(1, keepdim=True), p[:, len(bg):]], 1)
    labels = scores.argmax(1)
    if threshold is not None:
        labels[scores[:, 1:].amax(1) < threshold] = 0
    out = torch.zeros(image.shape[-2:], dtype=torch.int64)
    for m, c in zip(masks, labels.tolist()):
        out[m] = c
    return out, scores


def test_classify_segments_follows_the_dense_rule():
    from namedmask.models import zero_guidance as zg

    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=-1)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bg = torch.tensor([[0.6, 0.8]])
    labels, scores = zg.classify_segments(emb, text, bg, logit_scale=10.0)
    assert labels.tolist() == [1, 2, 0]
    expected = (10 * emb @ torch.cat([bg, text]).T).softmax(1)
    assert torch.allclose(scores, expected, atol=1e-6)
    # no background prompt: the threshold alone decides; 0.9 leaves only the clear cases (0.88 < 0.9)
    labels, scores = zg.classify_segments(emb, text, None, logit_scale=10.0, threshold=0.9)
    assert labels.tolist() == [1, 2, 0] and torch.allclose(scores.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        zg.classify_segments(emb, text, None)


def test_predict_proposals_segmenter_names_each_segmenter_region(run, val, tmp_path):
    from namedmask.models.clip import load_clip

    run_dir, model = run
    res = CliRunner().invoke(cli, ["predict", "--checkpoint", str(run_dir), str(val / "images"), "--out",
                                   str(tmp_path / "o"), "--device", "cpu", "--text", "disc, square|box, triangle",
                                   "--proposals", "segmenter", *TINY_CLIP])
    assert res.exit_code == 0, res.output
    clip = load_clip("nm-tiny", "random")
    for path in sorted((val / "images").glob("*.png"))[:3]:
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
        seg = predict_label(model, image, "cpu")
        ids = [c for c in seg.unique().tolist() if c]
        masks = seg[None] == torch.tensor(ids).view(-1, 1, 1)
        expected, _ = _hand_labels(clip, image.permute(2, 0, 1), masks, [("disc",), ("square", "box"), ("triangle",)])
        got = np.array(Image.open(tmp_path / "o" / "labels" / f"{path.stem}.png"))
        assert got.shape == tuple(seg.shape) and np.array_equal(got, expected.numpy())
        assert (got[seg.numpy() == 0] == 0).all()   # the segmenter's background is never a proposal


def test_predict_proposals_discover_equals_its_parts(tmp_path):
    """--proposals discover: each DINO segment gets one label, the hand rule's; the CLI run
    writes labels of the same kind (DINO has random weights there: values are not compared)."""
    from namedmask.stages.predict import TwoStageConfig, two_stage

    a = np.zeros((40, 56, 3), np.uint8)
    a[:, 28:] = 220
    a[:12, :, 2] = 255
    cfg = TwoStageConfig("discover", model="nm-tiny", pretrained="random", templates="simple", threshold=0.3, dino="vit_tiny_patch16_224",
                         random_dino=True, size=32, k=4)
    label_of, names = two_stage(cfg, [("cat", ("cat", "kitty")), ("sky", ("sky",))])
    assert names == ["background", "cat", "sky"]
    image = torch.from_numpy(a)
    got = label_of(image)
    img, masks = label_of.propose(image)
    assert masks.sum(0).eq(1).all()                 # disjoint and covering: every pixel in one region
    expected, _ = _hand_labels(label_of.clip, img, masks, [("cat", "kitty"), ("sky",)], threshold=0.3)
    expected = torch.nn.functional.interpolate(expected[None, None].float(), size=a.shape[:2], mode="nearest")
    assert torch.equal(got, expected[0, 0].long())
    Image.fromarray(a).save(tmp_path / "two.png")
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "two.png"), "--out", str(tmp_path / "o"), "--device", "cpu",
                                   "--text", "cat|kitty, sky", "--proposals", "discover", "--dino",
                                   "vit_tiny_patch16_224", "--random-dino", "--size", "32", "--k", "4", *TINY_CLIP])
    assert res.exit_code == 0, res.output
    lab = np.array(Image.open(tmp_path / "o" / "labels" / "two.png"))
    assert lab.shape == (40, 56) and lab.max() <= 2


@pytest.mark.parametrize("extra, message", [
    (["--proposals", "segmenter"], "give --checkpoint RUN"),
    (["--proposals", "discover", "--embed", "attention", "--mask-prompts", "x.safetensors"], "work on masked crops"),
    (["--proposals", "discover", "--no-background-prompt"], "no background prompt and no --background-threshold"),
    (["--mask-prompts", "x.safetensors"], "go with --proposals"),
])
def test_predict_proposals_bad_options_one_line(tmp_path, extra, message):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--text", "cat",
                                   *TINY_CLIP, *extra])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
