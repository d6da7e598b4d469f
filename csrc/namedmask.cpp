// The one schema file: every namedmask op is declared here, once. Backends register
// implementations with TORCH_LIBRARY_IMPL(namedmask, CPU|CUDA, m) in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(namedmask, m) {
  // Dataset-level confusion histogram. Returns int64 [num_classes, num_classes + 1]:
  // rows = target class, columns = predicted class; the extra last column counts
  // non-ignored pixels whose prediction is outside [0, num_classes) so the Python
  // wrapper can raise without a second pass over the data.
  m.def("confusion_matrix(Tensor pred, Tensor target, int num_classes, int ignore_index) -> Tensor");

  // --- copy-paste augmentation (issue 3) ---
  // Tight inclusive foreground boxes (background < label < ignore_index) of labels [B, H, W]:
  // int64 [B, 4] rows (y0, x0, y1, x1), (-1, -1, -1, -1) for a sample without foreground.
  m.def("fg_boxes(Tensor labels, int background, int ignore_index) -> Tensor");
  // Batched copy-paste composite: sample b receives the foreground of samples sources[b, p]
  // (int64 [B, P], -1 = none) cut by boxes (from fg_boxes) from the INPUT batch, box corner
  // at offsets[b, p] (int64 [B, P, 2], (y, x)); later pastes cover earlier ones. Returns new
  // (images [B, C, H, W], labels [B, H, W]). Pastes reaching outside the canvas are clipped
  // (the Python wrapper rejects them first).
  m.def("copy_paste(Tensor images, Tensor labels, Tensor boxes, Tensor sources, Tensor offsets, int background, "
        "int ignore_index) -> (Tensor, Tensor)");

  // --- bilateral solver (issue 9) ---
  // Fast bilateral solver (Barron & Poole 2016) on a batch flattened into one pixel list:
  // image uint8 [P, 3] RGB, target / confidence float32 [P], sizes int64 [B, 2] = (H, W) per
  // image in order. Grid, bistochastization, PCG and slice per image; returns float32 [P].
  // An image whose grid would hold more than max_vertices vertices is a ValueError naming it
  // (memory bound: 2^24 by default, namedmask.ops.bilateral.MAX_VERTICES).
  m.def("bilateral_solve(Tensor image, Tensor target, Tensor confidence, Tensor sizes, float sigma_spatial, "
        "float sigma_luma, float sigma_chroma, float lam, int max_iter, float tol, int max_vertices=16777216) "
        "-> Tensor");
}

// _C is a plain extension module: importing it runs the static registrations above.
// No pybind11 bindings, so no <torch/extension.h> (24 s per translation unit).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "namedmask native ops", -1, nullptr};
  return PyModule_Create(&module);
}
