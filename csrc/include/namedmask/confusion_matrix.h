#pragma once
// Per-pixel rule of the confusion histogram, shared by the CPU and CUDA kernels.
#include "namedmask/common.h"

namespace namedmask {

// Bin of one (pred, target) pair in the [num_classes, num_classes + 1] histogram,
// or -1 when the pixel is ignored. A prediction outside [0, num_classes) lands in the
// last column so the caller can report it.
template <typename P, typename T>
NM_HD int64_t confusion_bin(P pred, T target, int64_t num_classes, int64_t ignore_index) {
  const int64_t t = static_cast<int64_t>(target);
  if (t < 0 || t >= num_classes || t == ignore_index) return -1;
  const int64_t p = static_cast<int64_t>(pred);
  const int64_t col = (p >= 0 && p < num_classes) ? p : num_classes;
  return t * (num_classes + 1) + col;
}

}  // namespace namedmask
