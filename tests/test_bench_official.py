"""bench/bench_official.py times our stages beside re-implementations of the official loops; a
ratio means something only where both compute the same thing. Each official-style function is
checked here against ours on tiny inputs: exact for integers (rankings, masks, confusion
matrices), stated tolerances for floats, and the deliberate differences stated and tested."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from bench import bench_official as official
from namedmask import ops
from namedmask.config import ModelConfig, TrainConfig, load_config
from namedmask.data.archive import merge_top_k, similarity
from namedmask.data.categories import VOC
from namedmask.data.decode import Resize, iter_image_batches, resize_crop
from namedmask.models.clip import RANDOM, load_clip
from namedmask.models.deeplab import build_model
from namedmask.models.dino import build_vit, last_layer_keys
from namedmask.models.saliency import SelfMask, SelfMaskPredictor, normalize
from namedmask.models.saliency.tokencut import normalized_cut
from namedmask.training import poly_factor

TINY_VIT = dict(embed_dim=48, depth=2, num_heads=2)


# ------------------------------------------------------------------------------ (A) archive

def test_official_ranking_equals_our_top_k():
    """retrieve_images (argsort of text @ images.T, first k) = our streamed merge_top_k of the
    exact fp16 x fp16 scores, on embeddings exact in fp16 with distinct scores."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1).half().float()
    text = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1).half().float()
    names = [f"img{i:02d}.jpg" for i in range(40)]
    ranked = official.official_rank({f"c{c}": text[c] for c in range(3)}, dict(zip(names, images)), k=7)
    scores = similarity(images, text)
    assert all(len(set(scores[:, c].tolist())) == 40 for c in range(3))  # no ties: argsort order is defined
    s, i = merge_top_k(torch.empty(0, 3, dtype=torch.float64), torch.empty(0, 3, dtype=torch.int64),
                       scores[:20], torch.arange(20), 7)
    s, i = merge_top_k(s, i, scores[20:], torch.arange(20, 40), 7)
    for c in range(3):
        assert ranked[f"c{c}"] == [names[j] for j in i[:, c].tolist()]


def _photo(path, size):
    rng = np.random.default_rng(sum(size))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)
    return path


def test_official_clip_preprocessing_and_embeddings_equal_ours_where_the_resize_agrees(tmp_path):
    """ReCo's Resize + CenterCrop + ToTensor + Normalize gives our pixels exactly, also where
    rounding the long side would have differed from torchvision's truncation (148x100 at 64 px:
    94.72 -> 94, as ours now); the embeddings agree to float32 rounding (atol 1e-5)."""
    clip = load_clip("nm-tiny", RANDOM)
    size = clip.image_size
    assert size == 64
    agree = _photo(tmp_path / "agree.jpg", (150, 100))
    differ = _photo(tmp_path / "differ.jpg", (148, 100))
    data = official.OfficialPoolDataset([agree, differ], size, clip.mean, clip.std)
    for path, same in ((agree, True), (differ, True)):
        theirs = data[[agree, differ].index(path)]["img"]
        ours = resize_crop(Image.open(path).convert("RGB"), Resize(size, size, "bicubic")).float() / 255
        ours = (ours - torch.tensor(clip.mean)[:, None, None]) / torch.tensor(clip.std)[:, None, None]
        assert torch.allclose(theirs, ours, atol=1e-6) == same
        assert official._truncated_differs(path, size) == (not same)
    theirs = official.official_image_embeddings(clip, [agree], batch_size=16)["agree.jpg"]
    batch = next(iter_image_batches([agree], 4, resize=Resize(size, size, "bicubic")))
    assert torch.allclose(theirs, clip.encode_images(batch.images)[0], atol=1e-5)


def test_official_text_embeddings_equal_ours(tmp_path):
    """prompt_engineering (per category: encode its prompts, normalise, mean, normalise) = our
    archive stage's _text_embeddings (all prompts in batches of 256): float32, atol 1e-6."""
    from namedmask.data.categories import CategorySet
    from namedmask.models.prompts import get_templates
    from namedmask.stages.archive import _text_embeddings

    clip = load_clip("nm-tiny", RANDOM)
    cats, templates = CategorySet("mini", ("background", "cat", "dining table", "tv/monitor")), \
        get_templates("namedmask")[:7]
    ours = _text_embeddings(clip, cats, templates, tmp_path / "text.safetensors")
    theirs = official.official_text_embeddings(clip, list(cats.names[1:]), templates)
    assert torch.allclose(torch.stack(list(theirs.values())), ours, atol=1e-6)


# ------------------------------------------------------------------------------ (B) bilateral solver

def _solver_image(seed: int = 0) -> tuple:
    """A 40x56 photo-like image (two flat regions + noise) and a blocky target."""
    rng = np.random.default_rng(seed)
    rgb = np.full((40, 56, 3), 60, np.int64)
    rgb[8:30, 12:40] = (200, 90, 40)
    rgb = np.clip(rgb + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    target = np.zeros((40, 56))
    target[8:32, 8:40] = 1.0
    return rgb, target


def _float_cells_equal_integer_cells(rgb, sl=16, sc=8) -> bool:
    """The published float YUV falls in the same grid cells as our exact integer YUV."""
    yuv_f = np.tensordot(rgb, official.scipy_bilateral_solve.__globals__["RGB_TO_YUV"], ([2], [1])) + [0, 128, 128]
    e6 = official.scipy_bilateral_solve.__globals__["RGB_TO_YUV_E6"]
    yuv_i = (rgb.reshape(-1, 3).astype(np.int64) @ e6.T + [0, 128000000, 128000000]).reshape(yuv_f.shape)
    sig = np.array([sl, sc, sc])
    return bool(np.array_equal((yuv_f / sig).astype(np.int64), np.floor_divide(yuv_i, sig * 1000000)))


def test_official_bilateral_solver_equals_ours_and_adds_its_post_processing():
    """The published scipy solver (float YUV, base-255 hash, scipy cg) and our op (preset
    namedmask: 16/16/8, lam 256, 25 PCG iterations) give the same soft output within 1e-3 on an
    image whose float and integer YUV fall in the same cells (checked: on a cell boundary the
    float formula may move a pixel; ours computes YUV exactly, a documented difference). The
    official's binary output = fill holes + the largest component of ours > 0.5 (exact)."""
    rgb, target = _solver_image()
    assert _float_cells_equal_integer_cells(rgb)
    soft, binary = official.official_bilateral_solver_output(rgb, target)
    ours = ops.bilateral_solve(torch.from_numpy(rgb), torch.from_numpy(target).float(), preset="namedmask")
    ours = np.asarray(ours, dtype=np.float64)
    assert np.abs(soft - ours).max() <= 1e-3
    assert np.abs(ours - 0.5).min() > 1e-3  # no pixel at the threshold: both sides cut alike
    filled = ndimage.binary_fill_holes(ours > 0.5)
    labels, count = ndimage.label(filled)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])) if count else np.ones_like(filled)
    assert np.array_equal(binary, largest)


# ------------------------------------------------------------------------------ (B) TokenCut

def test_official_keys_equal_ours():
    """ViTFeat's keys (stopped at the last qkv) = our last_layer_keys, bit for bit."""
    torch.manual_seed(0)
    vit = build_vit("vit_small_patch16_224.dino", **TINY_VIT).eval()
    x = torch.randn(1, 3, 64, 96)
    ours, grid = last_layer_keys(vit, x)
    assert grid == (4, 6)
    assert torch.equal(official.official_keys(vit, x), ours[0].t())


def _two_cluster_features(grid=(6, 8), dim=12, seed=0) -> torch.Tensor:
    """Patch features [N, C]: an object block near one direction, background near another,
    cosines far from tau = 0.2 (no edge flips between float32 and float64)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[1:4, 2:6] = True
    base = torch.zeros(2, dim)
    base[0, 0], base[1, 1] = 1.0, 1.0
    feats = base[obj.reshape(-1).long()] + 0.1 * torch.randn(h * w, dim, generator=g)
    return feats, obj


@pytest.mark.parametrize("solver", ["arpack", "dense"])
def test_official_ncut_mask_equals_ours(solver):
    """object_discovery.ncut (float32 affinity, scipy.linalg.eigh(D - A, D), mean bipartition,
    seed flip, the seed's component) = our normalized_cut, exactly, where no cosine lies within
    float32 rounding of tau. The eigenvectors agree up to sign within 1e-6 (both solvers
    normalise vᵀDv = 1; ARPACK's tolerance is 1e-10)."""
    feats, obj = _two_cluster_features()
    f = torch.nn.functional.normalize(feats.double(), dim=1)
    assert ((f @ f.T - 0.2).abs() > 1e-4).all()
    theirs, v = official.official_ncut(feats.t().contiguous(), obj.shape)
    cut = normalized_cut(feats, obj.shape, solver=solver)
    assert np.array_equal(theirs, cut.mask) and np.array_equal(cut.mask, obj.numpy())
    ours_v = cut.eigenvector.reshape(-1)
    assert min(np.abs(v - ours_v).max(), np.abs(v + ours_v).max()) <= 1e-6


# ------------------------------------------------------------------------------ (B) SelfMask

def test_official_selfmask_forward_equals_our_predictor():
    """SelfMask.forward(inference=True) (every layer normalised and stacked, all queries
    upsampled x4 then the max-objectness one) = our SelfMaskPredictor.predict, bit for bit, on
    an input that needs padding (43x61 -> 48x64)."""
    torch.manual_seed(0)
    model = SelfMask(build_vit("vit_small_patch8_224.dino", **TINY_VIT), n_queries=5, n_decoder_layers=2).eval()
    x = torch.randn(1, 3, 43, 61)
    dt, _ = official.official_selfmask_forward(model, x, bilateral_solver=False)
    ours = SelfMaskPredictor(model).predict(x)[0]
    assert dt.shape == ours.shape == (43, 61)
    assert torch.equal(dt.bool(), ours)


def test_official_selfmask_rebuilds_the_image_by_truncation():
    """The official hands the solver an image rebuilt from the normalised tensor, truncated to
    uint8: at most 1 level below the photo (ours refines on the photo itself)."""
    rgb = torch.randint(0, 256, (9, 11, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    rebuilt = torch.from_numpy(np.array(official.convert_tensor_to_pil_image(normalize([rgb])[0]))).long()
    diff = rgb.long() - rebuilt
    assert diff.min() >= 0 and diff.max() <= 1


# ------------------------------------------------------------------------------ (E) eval

def test_official_running_score_equals_our_scoring():
    """RunningScore.update per image (np.bincount) + get_scores = our ClassMap +
    ops.confusion_matrix + ops.miou: identical confusion matrix, mIoU within 1e-12 (nanmean
    summation order), on uint8 maps with void (255) and classes absent from both sides."""
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for _ in range(5):
        gt = rng.choice([0, 3, 7, 15], (23, 31)).astype(np.uint8)
        gt[:2] = 255
        pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 0, gt), rng.choice([0, 3, 9], gt.shape))
        gts.append(gt), preds.append(pred.astype(np.uint8))
    hist, scores = official.official_eval(gts, preds, 21)
    confusion, metrics = official.our_eval(gts, preds, list(VOC))
    assert np.array_equal(hist.astype(np.int64), confusion.numpy()) and hist.sum() == 5 * 21 * 31
    assert abs(scores["Mean IoU"] - metrics.miou) <= 1e-12
    assert abs(scores["Pixel Acc"] - metrics.pixel_acc) <= 1e-12


# ------------------------------------------------------------------------------ (D) training

def test_official_optimizer_and_schedule_equal_ours():
    """get_optimiser (Adam; backbone 0.1 x lr) and PolyLR = our param groups and poly_factor:
    the same parameters per group, lrs equal within 1e-15 relative over a run (the official's
    PolyLR computes the closed form from the step count, floor min_lr = 1e-6, as ours)."""
    cfg = load_config(TrainConfig, overrides=["iterations=10"])
    model = build_model(ModelConfig(backbone="resnet18"), 3)
    opt = official.official_optimizer(model)
    backbone = {id(p) for n, p in model.named_parameters() if n.startswith("backbone.")}
    assert {id(p) for p in opt.param_groups[0]["params"]} == backbone
    assert [g["lr"] for g in opt.param_groups] == [cfg.optim.lr_backbone, cfg.optim.lr_head]
    assert all(g["betas"] == tuple(cfg.optim.betas) and g["weight_decay"] == cfg.optim.weight_decay
               for g in opt.param_groups)
    sched = official.OfficialPolyLR(opt, cfg.iterations)
    ours = [poly_factor(cfg.optim.lr_backbone, cfg), poly_factor(cfg.optim.lr_head, cfg)]
    for it in range(cfg.iterations):  # (past its last iteration the official's power of a negative base is complex)
        for group, factor, base in zip(opt.param_groups, ours, (cfg.optim.lr_backbone, cfg.optim.lr_head)):
            assert group["lr"] == pytest.approx(base * factor(it), rel=1e-15, abs=0)
        opt.step()
        sched.step()


def test_official_copy_paste_drops_the_last_row_and_column():
    """copy_paste as released: the object's bounding box is sliced [ymin:ymax, xmin:xmax], so
    its last row and column are not pasted (ours pastes the inclusive box: a documented fix)."""
    image, mask = torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.int64)
    other, other_mask = torch.ones(3, 8, 8), torch.zeros(8, 8, dtype=torch.int64)
    other_mask[2:5, 3:7] = 4   # a 3 x 4 object
    random.seed(0)
    out, out_mask = official.official_copy_paste([image, other], [mask, other_mask])
    assert int((out_mask == 4).sum()) == 2 * 3 and float(out[0].sum()) == 6.0


def test_official_train_sample_shapes_and_labels(tmp_path):
    """One sample of the official dataset: a normalised 3 x crop x crop image and a crop x crop
    int64 mask holding only 0, the class id and 255."""
    from namedmask.data.training import TrainItem

    _photo(tmp_path / "a.jpg", (50, 40))
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 10:40] = 1
    Image.fromarray(mask).save(tmp_path / "a.png")
    data = official.OfficialTrainSet([TrainItem(tmp_path / "a.jpg", tmp_path / "a.png", 7)], crop=32)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    for _ in range(4):
        sample = data[0]
        assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)
        assert set(sample["mask"].unique().tolist()) <= {0, 7, 255}


@pytest.mark.parametrize("method", ["tokencut", "selfmask"])
def test_our_saliency_image_is_the_stage_path(tmp_path, method):
    """The bench's per-image path (spelled out to time the network apart) gives the saliency
    stage's mask (_predict_batch), bit for bit, and writes it."""
    from namedmask.data.decode import load_image
    from namedmask.models.saliency import TokenCut
    from namedmask.stages.saliency import _predict_batch, bilateral_refiner

    torch.manual_seed(0)
    if method == "tokencut":
        model = TokenCut(build_vit("vit_small_patch16_224.dino", **TINY_VIT), short_side=48)
    else:
        model = SelfMaskPredictor(SelfMask(build_vit("vit_small_patch8_224.dino", **TINY_VIT), 5, 2), short_side=40)
    path = _photo(tmp_path / "p.jpg", (70, 50))
    refine = bilateral_refiner("bilateral-solver")
    mask, _, _ = official.our_saliency_image(model, refine, path, tmp_path / "p.png")
    (_, stage_mask, reason), = _predict_batch(model, refine, ["p.jpg"], [load_image(path)], "cpu")
    assert reason is None and mask.shape == (50, 70) and np.array_equal(mask, stage_mask)
    assert np.array_equal(np.array(Image.open(tmp_path / "p.png")), mask)
