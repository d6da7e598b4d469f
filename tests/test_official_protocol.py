"""Scores and models as the official NamedMask protocol (issue 13): CoCA as an 81-class mIoU,
the official prompt names, crop padding, each model's position-embedding rule."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from namedmask.config import AugmentConfig
from namedmask.data.augment import IMAGENET_MEAN, IMAGENET_STD, train_transform
from namedmask.data.categories import get_category_set
from namedmask.data.datasets import open_dataset
from namedmask.models.dino import build_vit, forward_tokens, resample_pos_embed
from namedmask.evaluation import evaluate_model

TINY = dict(embed_dim=48, depth=2, num_heads=3)


# ---------------------------------------------------------------- prompt names

def test_voc_prompt_names_are_the_official_strings():
    """NoelShin/namedmask configs/voc_val_n500_cp2_ex.yaml `categories`, in id order."""
    official = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
                "tv/monitor"]
    voc = get_category_set("voc")
    assert [voc.prompt_name(n) for n in voc.names[1:]] == official
    assert voc.names[11] == "diningtable" and voc.names[20] == "tvmonitor"  # display names stay the dataset's
    assert voc.prompt_words("tvmonitor") == ("tv/monitor",)


def test_other_builtin_sets_are_prompted_with_their_official_names():
    """coco2017 / cityscapes / coca configs of the official code use the display names as they are."""
    for name in ("coco-object", "cityscapes-object", "coca"):
        cs = get_category_set(name)
        assert [cs.prompt_name(n) for n in cs.names] == list(cs.names)
    coco = get_category_set("coco-object")
    assert (coco.prompt_name("dining table"), coco.prompt_name("tv"), coco.prompt_name("potted plant")) == \
        ("dining table", "tv", "potted plant")


# ---------------------------------------------------------------- CoCA

class ColourOracle(nn.Module):
    """Predicts class red // 3 of the un-normalised image: a perfect model for images whose red
    channel encodes their label."""

    def forward(self, x):
        red = (x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        cls = (red / 3).round().long().clamp(0, 80)
        return F.one_hot(cls, 81).permute(0, 3, 1, 2).float()


def _coca_folder(root, categories, shift=0):
    names = get_category_set("coca").names
    rng = np.random.default_rng(0)
    for k, cat in enumerate(categories):
        for j in range(2):
            mask = np.zeros((20, 24), np.uint8)
            y, x = rng.integers(0, 10), rng.integers(0, 12)
            mask[y:y + 8, x:x + 10] = 255
            image = np.zeros((20, 24, 3), np.uint8)
            image[..., 0] = np.where(mask > 0, 3 * (names.index(cat) + shift), 0)
            for sub, arr in (("image", image), ("binary", mask)):
                (root / sub / cat).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / sub / cat / f"{j}.png")  # lossless: the oracle reads colours


def test_coca_perfect_prediction_scores_miou_100(tmp_path):
    cats = ["Accordion", "UAV", "teddy bear", "whisk"]
    _coca_folder(tmp_path, cats)
    ds = open_dataset("coca", tmp_path)
    names = list(get_category_set("coca").names)
    report = evaluate_model(ColourOracle(), ds, names, progress=False)
    assert report.metrics.num_classes == 81 and report.metrics.miou == 1.0   # 81-class mIoU, as the official
    assert report.extra["mean_fg_iou"] == 1.0                                 # reported beside it
    scored = [names[i] for i, v in enumerate(report.metrics.per_class_iou) if not math.isnan(v)]
    assert scored == ["background"] + cats
    assert "mean_fg_iou" in report.to_dict() and "mIoU" in report.table()


def test_coca_wrong_category_with_perfect_masks_is_not_a_perfect_score(tmp_path):
    """The old binary collapse scored this 100; as a 81-class mIoU the names must be right."""
    _coca_folder(tmp_path, ["Accordion", "UAV"], shift=1)  # every object predicted as the next category
    report = evaluate_model(ColourOracle(), open_dataset("coca", tmp_path), list(get_category_set("coca").names),
                            progress=False)
    assert report.extra["mean_fg_iou"] == 1.0
    assert report.metrics.miou == pytest.approx(1 / 4)  # background 1, Accordion 0, UAV 0, Yellow duck 0


# ---------------------------------------------------------------- crop padding

def test_padding_side_is_uniform_and_the_fill_is_the_uint8_mean():
    image = torch.zeros((3, 20, 30), dtype=torch.uint8)
    image[0, :10], image[0, 10:] = 10, 11        # red mean 10.5 -> uint8 10 (truncated, as np.astype)
    image[1], image[2] = 200, 7
    label = torch.ones(20, 30, dtype=torch.uint8)
    cfg = AugmentConfig(crop_size=32, scale=(1.0, 1.0), jitter_p=0, grayscale_p=0, blur_p=0, hflip_p=0)
    g = torch.Generator().manual_seed(0)
    corners = Counter()
    draws = 2000
    for _ in range(draws):
        x, y = train_transform(image, label, cfg, g)
        rows, cols = torch.nonzero(y == 1, as_tuple=True)
        corners[(int(rows.min()) == 0, int(cols.min()) == 0)] += 1  # image at the top? at the left?
    # four corners, each 1/4: binomial sd = sqrt(.25 * .75 / 2000) = 0.0097; tolerance 4 sd
    assert len(corners) == 4
    assert all(abs(n / draws - 0.25) < 0.039 for n in corners.values()), corners
    want = (torch.tensor([10, 200, 7]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    pad = x[:, y == 255]
    assert torch.allclose(pad, want[:, None].expand_as(pad), atol=1e-6)


def test_scaled_size_is_truncated_as_the_official_int():
    image = torch.full((3, 43, 29), 50, dtype=torch.uint8)
    label = torch.ones(43, 29, dtype=torch.uint8)
    cfg = AugmentConfig(crop_size=64, scale=(0.5, 0.5), jitter_p=0, grayscale_p=0, blur_p=0, hflip_p=0)
    _, y = train_transform(image, label, cfg, torch.Generator().manual_seed(1))
    assert int((y != 255).sum()) == int(43 * 0.5) * int(29 * 0.5) == 21 * 14  # round() would give 22 x 14


# ---------------------------------------------------------------- position embeddings

def dino_interpolate_pos_encoding(pos_embed, height, width):
    """facebookresearch/dino vision_transformer.py interpolate_pos_encoding, written out here
    (grid sizes in patches; DINO calls the image height `w` and its width `h`)."""
    N = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    if height * width == N and height == width:
        return pos_embed
    w0, h0 = height + 0.1, width + 0.1
    patch = nn.functional.interpolate(
        pos_embed[:, 1:].reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == patch.shape[-2] and int(h0) == patch.shape[-1]
    return torch.cat((pos_embed[:, 0].unsqueeze(0), patch.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)


@pytest.mark.parametrize("grid,size", [(14, (32, 48)), (14, (60, 40)), (28, (64, 64)), (4, (3, 7)), (14, (14, 20))])
def test_dino_rule_equals_dinos_interpolation(grid, size):
    pe = torch.randn(1, 1 + grid * grid, 24, generator=torch.Generator().manual_seed(grid))
    got = resample_pos_embed(pe, size, rule="dino")
    want = dino_interpolate_pos_encoding(pe, *size)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    other = resample_pos_embed(pe, size, rule="size")  # SelfMask's rule is a different function
    assert (other - want).abs().max() > 1e-4


def test_vit_tokens_use_the_dino_rule_and_selfmask_its_own():
    from namedmask.models.saliency.selfmask import SelfMask

    torch.manual_seed(0)
    vit = build_vit("vit_small_patch16_224.dino", **TINY).eval()
    images = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        tokens, grid = forward_tokens(vit, images)
        x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token, x], 1) + dino_interpolate_pos_encoding(vit.pos_embed, *grid)
        want = vit.norm(vit.blocks(x))
    torch.testing.assert_close(tokens, want, rtol=1e-5, atol=1e-5)
    sm = SelfMask(build_vit("vit_small_patch8_224.dino", **TINY), n_queries=3, n_decoder_layers=1).eval()
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        masks, objectness = sm(images)
        tokens, hw = forward_tokens(sm.encoder, images, pos_embed_rule="size")
        want_masks, want_obj = sm.head(tokens, hw)
    assert torch.equal(masks, want_masks) and torch.equal(objectness, want_obj)


def test_unknown_position_embedding_rule():
    with pytest.raises(ValueError, match="rule"):
        resample_pos_embed(torch.randn(1, 17, 4), (2, 3), rule="timm")
