"""confusion_matrix / miou: every backend equals the torch reference exactly."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from namedmask import ops
from namedmask.ops import reference
from helpers import backend_params, cuda_kernels_expected

BACKENDS = backend_params("confusion_matrix")


def expected(pred, target, n, ignore=255):
    """Independent oracle: numpy loop-free bincount over the counted pixels."""
    p = pred.reshape(-1).long().numpy()
    t = target.reshape(-1).long().numpy()
    keep = (t >= 0) & (t < n) & (t != ignore)
    return torch.from_numpy(np.bincount(t[keep] * n + p[keep], minlength=n * n).reshape(n, n))


def random_pair(shape, n, dtype=torch.uint8, void_frac=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, n, shape, generator=g)
    target[torch.rand(shape, generator=g) < void_frac] = 255 if dtype == torch.uint8 or n < 255 else -1
    pred = torch.randint(0, n, shape, generator=g)
    return pred.to(dtype), target.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 21, 81, 1000])
def test_random_inputs_match_reference(backend, n):
    dtype = torch.uint8 if n <= 255 else torch.int64
    pred, target = random_pair((3, 67, 129), n, dtype)
    got = ops.confusion_matrix(pred, target, n, backend=backend)
    assert got.dtype == torch.int64 and got.shape == (n, n)
    assert torch.equal(got, ops.confusion_matrix(pred, target, n, backend="torch"))
    assert torch.equal(got, expected(pred, target, n))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred_dtype,target_dtype", [(torch.uint8, torch.int64), (torch.int32, torch.uint8),
                                                     (torch.int64, torch.int32), (torch.int32, torch.int32)])
def test_mixed_dtypes(backend, pred_dtype, target_dtype):
    pred, target = random_pair((257, 131), 21, torch.int64, seed=3)
    pred, target = pred.to(pred_dtype), target.to(target_dtype)
    assert torch.equal(ops.confusion_matrix(pred, target, 21, backend=backend), expected(pred, target, 21))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    n = 21
    # all ignored
    t = torch.full((5, 7), 255, dtype=torch.uint8)
    assert ops.confusion_matrix(torch.zeros_like(t), t, n, backend=backend).sum() == 0
    # single class everywhere
    t = torch.full((33, 17), 4, dtype=torch.uint8)
    cm = ops.confusion_matrix(t.clone(), t, n, backend=backend)
    assert cm[4, 4] == 33 * 17 and cm.sum() == 33 * 17
    # empty tensors
    e = torch.zeros(0, dtype=torch.uint8)
    assert ops.confusion_matrix(e, e, n, backend=backend).sum() == 0
    # one pixel; odd sizes; a custom ignore_index inside the class range
    t = torch.tensor([[3]], dtype=torch.uint8)
    assert ops.confusion_matrix(torch.tensor([[5]], dtype=torch.uint8), t, n, backend=backend)[3, 5] == 1
    pred, target = random_pair((1, 1, 9973), n, seed=5)
    assert torch.equal(ops.confusion_matrix(pred, target, n, ignore_index=0, backend=backend),
                       expected(pred, target, n, ignore=0))
    # void values other than 255 (e.g. 21..254) are ignored too
    target = torch.arange(0, 256, dtype=torch.uint8).repeat(4)
    pred = torch.zeros_like(target)
    assert ops.confusion_matrix(pred, target, n, backend=backend).sum() == 4 * n


@pytest.mark.parametrize("backend", BACKENDS)
def test_piecewise_constant_maps(backend):
    """Long runs of equal (target, pred) pairs, as in real label maps (the C++ uint8 path
    counts aligned uniform 8-pixel blocks as runs): runs crossing block edges, ignored runs,
    runs of a bad prediction, odd lengths."""
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(1, 40, (400,), generator=g)
    target = torch.repeat_interleave(torch.randint(0, 23, (400,), generator=g, dtype=torch.uint8), lengths)
    pred = torch.repeat_interleave(torch.randint(0, 21, (400,), generator=g, dtype=torch.uint8), lengths)
    target[target >= 21] = 255
    for size in (target.numel(), target.numel() - 3, 8, 13):
        p, t = pred[:size], target[:size]
        assert torch.equal(ops.confusion_matrix(p, t, 21, backend=backend), expected(p, t, 21))
    bad = pred.clone()
    bad[(target < 21).nonzero()[5:30, 0]] = 77  # a run of an out-of-range prediction
    with pytest.raises(ValueError, match=r"\[77\]"):
        ops.confusion_matrix(bad, target, 21, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_views(backend):
    pred, target = random_pair((2, 64, 96), 21, seed=7)
    pv, tv = pred.transpose(1, 2)[:, ::3], target.transpose(1, 2)[:, ::3]
    assert not pv.is_contiguous()
    assert torch.equal(ops.confusion_matrix(pv, tv, 21, backend=backend), expected(pv.contiguous(), tv.contiguous(), 21))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_prediction_names_value(backend):
    pred, target = random_pair((10, 10), 21, seed=1)
    pred[3, 3], target[3, 3] = 42, 1
    with pytest.raises(ValueError, match=r"\[42\]"):
        ops.confusion_matrix(pred, target, 21, backend=backend)
    # the same bad value at an ignored pixel is fine
    target[3, 3] = 255
    ops.confusion_matrix(pred, target, 21, backend=backend)


def test_bad_inputs_say_what_was_expected():
    a = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="same shape"):
        ops.confusion_matrix(a, torch.zeros(4, 5, dtype=torch.uint8), 21)
    with pytest.raises(ValueError, match="uint8, int32 or int64"):
        ops.confusion_matrix(a.float(), a, 21)
    with pytest.raises(ValueError, match="num_classes"):
        ops.confusion_matrix(a, a, 0)
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.confusion_matrix(a, a, 21, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend|has no"):
        ops.confusion_matrix(a, a, 21, backend="fortran")


def test_env_forces_reference(monkeypatch):
    from namedmask.ops.registry import select

    monkeypatch.setenv("NAMEDMASK_BACKEND", "torch")
    assert select("confusion_matrix", "auto", torch.device("cpu"))[0] == "torch"
    monkeypatch.delenv("NAMEDMASK_BACKEND")
    if "cpp" in ops.available_backends("confusion_matrix", "cpu"):
        assert select("confusion_matrix", "auto", torch.device("cpu"))[0] == "cpp"


def test_native_extension_built():
    """CI builds the extension; a silently missing _C would hide every native test."""
    from namedmask import _native

    assert _native.LOAD_ERROR is None, _native.LOAD_ERROR
    assert "cpp" in ops.available_backends("confusion_matrix", "cpu")
    if cuda_kernels_expected():  # CUDA build of torch: the CUDA kernels must have compiled and linked
        assert _native.has_kernel("confusion_matrix", "CUDA")


def test_opcheck():
    pred, target = random_pair((2, 31, 17), 21, seed=2)
    torch.library.opcheck(torch.ops.namedmask.confusion_matrix.default, (pred, target, 21, 255))


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_voc_masks(backend, voc_mini):
    """GT vs a perturbed copy of the real VOC masks: equal to the reference and to the
    independent oracle; the dataset-level matrix is the sum over images."""
    total = torch.zeros(21, 21, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    for path in sorted((voc_mini / "SegmentationClass").glob("*.png"))[:12]:
        gt = torch.from_numpy(np.array(Image.open(path)))
        pred = gt.clone()
        pred[pred == 255] = 0
        noise = torch.rand(gt.shape, generator=g) < 0.2
        pred[noise] = torch.randint(0, 21, (int(noise.sum()),), generator=g, dtype=torch.uint8)
        cm = ops.confusion_matrix(pred, gt, 21, backend=backend)
        assert torch.equal(cm, expected(pred, gt, 21))
        total += cm
    m = ops.miou(total)
    assert 0.0 < m.miou < 1.0 and 0.75 < m.pixel_acc < 0.9


def test_miou_definition():
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    m = ops.miou(cm)
    iou0, iou1 = 5 / (6 + 7 - 5), 3 / (5 + 4 - 3)
    assert m.per_class_iou[0] == pytest.approx(iou0) and m.per_class_iou[1] == pytest.approx(iou1)
    assert np.isnan(m.per_class_iou[2])  # absent from gt and pred: excluded from the mean
    assert m.miou == pytest.approx((iou0 + iou1) / 2)
    assert m.pixel_acc == pytest.approx(8 / 11)
    assert m.mean_acc == pytest.approx((5 / 6 + 3 / 5) / 2)
    # a class predicted but absent from gt counts, with IoU 0
    m = ops.miou(torch.tensor([[4, 1], [0, 0]]))
    assert m.per_class_iou == [pytest.approx(0.8), 0.0] and m.miou == pytest.approx(0.4)


def test_miou_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics")
    pred, target = random_pair((4, 50, 60), 21, torch.int64, void_frac=0.0, seed=11)
    m = ops.miou(ops.confusion_matrix(pred, target, 21))
    ref = tm.classification.MulticlassJaccardIndex(num_classes=21, average="macro")(pred, target)
    assert m.miou == pytest.approx(float(ref), abs=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [2, 21, 81, 150, 1000])
def test_cuda_matches_reference(n):
    dtype = torch.uint8 if n <= 255 else torch.int64
    pred, target = random_pair((4, 375, 500), n, dtype)
    want = reference.confusion_matrix(pred, target, n, 255)
    for backend in ("cuda", "triton"):
        got = ops.confusion_matrix(pred.cuda(), target.cuda(), n, backend=backend).cpu()
        assert torch.equal(got, want[:, :n])
