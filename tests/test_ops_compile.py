"""torch.compile(fullgraph=True) through every native op on CPU (the fake kernels in
namedmask/ops/fake.py give the shapes): one graph, no break, the eager result to the bit."""
import pytest
import torch

from namedmask import ops

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends("confusion_matrix", "cpu"),
                                reason="native extension not built")


def _compiled_equals_eager(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    want, got = fn(*args), compiled(*args)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and torch.equal(w, g)


def test_confusion_matrix_compiles():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 21, (2, 31, 17), generator=g, dtype=torch.uint8)
    target = torch.randint(0, 21, (2, 31, 17), generator=g, dtype=torch.uint8)
    # The ops alone: no generated C++ kernel to compile (that takes minutes on a busy 2-core machine).
    _compiled_equals_eager(lambda p, t: torch.ops.namedmask.confusion_matrix(p, t, 21, 255), pred, target)


def test_fg_boxes_and_copy_paste_compile():
    labels = torch.zeros(3, 9, 11, dtype=torch.uint8)
    labels[0, 2:5, 3:7], labels[1, 6:8, 1:3], labels[2, 0:2, 8:11] = 4, 7, 255
    images = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sources = torch.tensor([[1, 2], [0, -1], [1, 0]])
    offsets = torch.zeros(3, 2, 2, dtype=torch.int64)  # every box fits at the origin

    def paste(images, labels, sources, offsets):
        boxes = torch.ops.namedmask.fg_boxes(labels, 0, 255)
        return torch.ops.namedmask.copy_paste(images, labels, boxes, sources, offsets, 0, 255)

    _compiled_equals_eager(lambda labels: torch.ops.namedmask.fg_boxes(labels, 0, 255), labels)
    _compiled_equals_eager(paste, images, labels, sources, offsets)


def test_bilateral_solve_compiles():
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (9 * 14, 3), dtype=torch.uint8, generator=g)
    target = (torch.rand(9 * 14, generator=g) > 0.5).float()
    confidence, sizes = torch.full((126,), 0.999), torch.tensor([[9, 14]])
    _compiled_equals_eager(lambda x, t, c, s: torch.ops.namedmask.bilateral_solve(x, t, c, s, 16.0, 16.0, 8.0, 256.0,
                                                                                   25, 1e-5), image, target, confidence,
                           sizes)
