"""`namedmask eval --discover`: the zero-guidance paper's metric (eval_openvocab.py) on hand-made
label maps with numbers worked out by hand."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from namedmask.stages import discover_eval as de

GT = torch.tensor([[1, 1, 2, 2],
                   [1, 1, 2, 2],
                   [1, 1, 2, 2],
                   [0, 0, 255, 255]])
PRED = torch.tensor([[0, 0, 1, 1],
                     [2, 2, 1, 1],
                     [2, 2, 4, 4],
                     [3, 3, 4, 4]])
NAN = float("nan")
SIM = torch.tensor([[0.9, 0.1, 0.0],     # seg 0 -> class 1
                    [0.2, 0.8, 0.1],     # seg 1 -> class 2
                    [0.7, 0.0, 0.0],     # seg 2 -> class 1
                    [0.1, 0.2, 0.6],     # seg 3 -> class 3 (not in the image; all on background)
                    [0.0, 0.3, 0.55],    # seg 4 -> class 3 (on class 2 and ignored pixels)
                    [NAN, NAN, NAN]])    # seg 5: no name, never matched


def test_threshold_grid_is_the_official_one():
    assert len(de.IOU_THRESHOLDS) == 101 and de.IOU_THRESHOLDS[0] == 0.0 and abs(de.IOU_THRESHOLDS[-1] - 1) < 1e-12


def test_metric_by_hand():
    s = de.score_image(PRED, GT, SIM, 0.5, class_ids=[1, 2, 3])
    # union: class 1 = segs 0+2 = its 6 pixels (IoU 1); class 2 = seg 1, 4 of its 6 pixels (2/3);
    # class 3 (absent): background and 255 leave segs 3+4 two pixels on class 2 -> IoU 0
    assert s.classes["union"] == {1: 1.0, 2: 4 / 6, 3: 0.0}
    assert s.iou["union"] == pytest.approx(5 / 9, abs=1e-12)
    # recall: t = 0 all three; 0.01..0.66 two; 0.67..1.00 one  ->  (3 + 66*2 + 34) / 303
    assert s.recall["union"] == pytest.approx(169 / 303, abs=1e-12)
    # argmax: class 1 -> seg 0 (0.9 > 0.7): 2/6; class 3 -> seg 3 (0.6 > 0.55): empty after ignoring -> NaN
    c = s.classes["argmax"]
    assert c[1] == 2 / 6 and c[2] == 4 / 6 and np.isnan(c[3])
    assert s.iou["argmax"] == pytest.approx(0.5, abs=1e-12)
    # NaN is a miss: t <= 0.33 two of three, 0.34..0.66 one, above none -> (34*2 + 33) / 303
    assert s.recall["argmax"] == pytest.approx(101 / 303, abs=1e-12)
    # allseg: best single segment per class: 1 -> max(1/3, 2/3); 2 -> 2/3; 3 -> max(NaN, 0) = NaN (as the
    # official's Python max) -> 67 thresholds at 2/3
    assert s.recall["allseg"] == pytest.approx(134 / 303, abs=1e-12)


def test_threshold_and_no_match():
    # above every similarity: nothing matched; the image's classes score IoU 0 (a hit only at t = 0)
    s = de.score_image(PRED, GT, SIM, 0.95, class_ids=[1, 2, 3])
    assert s.classes["union"] == {1: 0.0, 2: 0.0} and s.iou["union"] == 0.0
    assert s.recall["union"] == pytest.approx(1 / 101, abs=1e-12)
    assert s.recall["allseg"] == 0.0          # no segment: -1, a miss even at 0


def test_argmax_ties_go_to_the_larger_segment():
    sim = torch.tensor([[0.9, 0.0], [0.0, 0.9], [0.9, 0.0], [0.0, 0.0], [0.0, 0.0]])
    s = de.score_image(PRED, GT, sim, 0.5, class_ids=[1, 2])
    assert s.classes["argmax"][1] == 4 / 6     # seg 2 (4 px) beats seg 0 (2 px) at equal score


def test_aggregate_skips_nan():
    a = de.score_image(PRED, GT, SIM, 0.5, class_ids=[1, 2, 3])
    b = de.score_image(PRED, GT, SIM, 0.95, class_ids=[1, 2, 3])
    agg = de.aggregate([a, b])
    assert agg["iou_union"] == pytest.approx((5 / 9 + 0) / 2, abs=1e-6)
    assert agg["images"] == 2


class _OneHotClip:
    """encode_texts: a fixed unit vector per word (the class words and their prompted forms)."""
    words = ["cat", "dog", "car"]

    def encode_texts(self, texts):
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            hit = [j for j, w in enumerate(self.words) if w in t]
            out[i, hit[0] if hit else 3] = 1.0
        return out


def test_evaluate_discovered_folder(tmp_path):
    from namedmask.data.datasets import FolderLabeledSet

    ds = tmp_path / "set"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(ds / "images" / "a.png")
    Image.fromarray(GT.numpy().astype(np.uint8)).save(ds / "labels" / "a.png")
    out = tmp_path / "disc"
    (out / "labels").mkdir(parents=True)
    (out / "segments").mkdir()
    (out / "embeddings").mkdir()
    (out / "discover.json").write_text(json.dumps({"model": "nm-tiny", "pretrained": None}))
    Image.fromarray((PRED + 1).numpy().astype(np.uint8)).save(out / "labels" / "a.png")
    names = ["cat", "dog", "a cat", "car", "car", None]
    (out / "segments" / "a.json").write_text(json.dumps({"segments": [{"id": i + 1, "name": n} for i, n in
                                                                      enumerate(names)]}))
    from safetensors.torch import save_file

    emb = torch.eye(4)[[0, 1, 0, 2, 2, 3]]
    save_file({"image": emb.clone(), "text": emb.clone()}, str(out / "embeddings" / "a.safetensors"))
    labeled = FolderLabeledSet(ds, ["background", "cat", "dog", "car"])
    r = de.evaluate_discovered(out, labeled, mode="t-t", clip=_OneHotClip())
    # names match exactly (cosine 1): seg 0 and 2 -> cat, 1 -> dog, 3 and 4 -> car: the union case above
    assert r["iou_union"] == pytest.approx(5 / 9, abs=1e-6) and r["images"] == 1
    assert r["matching"] == "CLIP text-text"
    r = de.evaluate_discovered(out, labeled, mode="i-t", clip=_OneHotClip())
    assert r["iou_union"] == pytest.approx(5 / 9, abs=1e-6) and r["matching"] == "CLIP image-text"
    with pytest.raises(ValueError, match="discover-mode"):
        de.evaluate_discovered(out, labeled, mode="x", clip=_OneHotClip())
