"""The kernels' public face: one function per op, each with
backend="auto" | "torch" | "cpp" | "cuda" | "triton" (see registry.py)."""
from namedmask.ops.registry import BACKENDS, BackendUnavailable, available_backends, ops, why_not
from namedmask.ops.confusion import confusion_matrix
from namedmask.ops.copy_paste import copy_paste, fg_boxes, random_copy_paste
from namedmask.ops.metrics import SegmentationMetrics, miou
from namedmask.ops import fake  # noqa: F401  (fake kernels of torch.ops.namedmask.*)
from namedmask.ops.bilateral import PRESETS as BILATERAL_PRESETS, bilateral_solve, bilateral_solve_batch

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "ops", "why_not",
           "confusion_matrix", "miou", "SegmentationMetrics", "copy_paste", "fg_boxes", "random_copy_paste",
           "bilateral_solve", "bilateral_solve_batch", "BILATERAL_PRESETS"]
