"""Constants and the grid layout of the bilateral solver, shared by the torch reference
(namedmask.ops.reference), the op wrapper (namedmask.ops.bilateral) and the Triton kernels: a
leaf module (no torch, no triton, nothing else of the package), so kernels import only this.
The C++/CUDA side states the same in csrc/include/namedmask/bilateral.h (make_layout, yuv_e6)."""
from __future__ import annotations

BILATERAL_DIMS = 5                  # x, y, luma, U, V
BILATERAL_BISTOCHASTIC_STEPS = 10
BILATERAL_DIAG_MIN = 1e-5           # the Jacobi preconditioner's floor
BILATERAL_MAX_VERTICES = 1 << 24    # default bound on an image's grid vertices (~3.5 GiB of CPU solver state)
# YUV in exact integer arithmetic: coefficients x 1e6 (then divided once, in float64).
RGB_TO_YUV_E6 = ((299000, 587000, 114000), (-168736, -331264, 500000), (500000, -418688, -81312))
YUV_OFFSET_E6 = (0, 128000000, 128000000)
MAX_LUMA = 255.0                    # the largest Y, U, V values (the U, V offset is 128 + a rounding half)
MAX_CHROMA = 255.5


def bilateral_radix(max_h: int, max_w: int, sigma_spatial: float, sigma_luma: float, sigma_chroma: float) -> list:
    """Cells per dimension (x, y, Y, U, V) of a batch's grid keys, + 3: coordinates are shifted by
    +1 and key ± stride must stay inside the dimension."""
    return [int((max_w - 1) / sigma_spatial) + 3, int((max_h - 1) / sigma_spatial) + 3,
            int(MAX_LUMA / sigma_luma) + 3, int(MAX_CHROMA / sigma_chroma) + 3, int(MAX_CHROMA / sigma_chroma) + 3]


def bilateral_vertex_cap_message(index: int, h: int, w: int, max_vertices: int) -> str:
    """The error of every backend when image `index`'s grid would exceed max_vertices
    (csrc/include/namedmask/bilateral_batch.h says the same)."""
    return (f"bilateral_solve: image {index} ({h}x{w}) needs more than max_vertices={max_vertices} bilateral-grid "
            "vertices (colours as varied as i.i.d. noise open a vertex per pixel; the solver needs ~200 bytes per "
            "vertex); pass a larger max_vertices or larger sigmas")
