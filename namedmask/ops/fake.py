"""Fake (meta) implementations of the native ops: output shapes and dtypes from the inputs
alone, so torch.compile and FakeTensor tracing can run through torch.ops.namedmask.* (every
output size follows from the input sizes; nothing depends on the data)."""
import torch

from namedmask import _native
from namedmask.kernels.spec import BILATERAL_MAX_VERTICES


def _register() -> None:
    @torch.library.register_fake("namedmask::confusion_matrix")
    def _(pred, target, num_classes, ignore_index):
        return pred.new_empty((num_classes, num_classes + 1), dtype=torch.int64)

    @torch.library.register_fake("namedmask::fg_boxes")
    def _(labels, background, ignore_index):
        return labels.new_empty((labels.shape[0], 4), dtype=torch.int64)

    @torch.library.register_fake("namedmask::copy_paste")
    def _(images, labels, boxes, sources, offsets, background, ignore_index):
        return (torch.empty_like(images, memory_format=torch.contiguous_format),
                torch.empty_like(labels, memory_format=torch.contiguous_format))

    @torch.library.register_fake("namedmask::bilateral_solve")
    def _(image, target, confidence, sizes, sigma_spatial, sigma_luma, sigma_chroma, lam, max_iter, tol,
          max_vertices=BILATERAL_MAX_VERTICES):
        return target.new_empty((target.shape[0],))


if _native._C is not None:  # the op schemas live in the extension
    _register()
