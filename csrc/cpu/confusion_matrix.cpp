// CPU backend of namedmask::confusion_matrix: OpenMP, one private histogram per thread
// (several interleaved copies for small class counts, so consecutive equal bins do not
// serialise on one counter), merged once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "namedmask/confusion_matrix.h"
#include "namedmask/dispatch.h"

namespace namedmask {
namespace {

template <typename P, typename T>
void histogram(const P* pred, const T* target, int64_t n, int64_t num_classes, int64_t ignore_index,
               int64_t* out) {
  const int64_t bins = num_classes * (num_classes + 1);
  const int lanes = bins <= 8192 ? 4 : 1;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 65536 + 1)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> local(static_cast<size_t>(bins * lanes), 0);
    int64_t* h = local.data();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = confusion_bin(pred[i], target[i], num_classes, ignore_index);
      if (b >= 0) ++h[(i & (lanes - 1)) * bins + b];
    }
    for (int l = 1; l < lanes; ++l)
      for (int64_t b = 0; b < bins; ++b) h[b] += h[l * bins + b];
#pragma omp critical(namedmask_confusion_merge)
    for (int64_t b = 0; b < bins; ++b) out[b] += h[b];
  }
}

at::Tensor confusion_matrix_cpu(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes,
                                int64_t ignore_index) {
  TORCH_CHECK(pred.sizes() == target.sizes(), "confusion_matrix: pred and target shapes differ");
  TORCH_CHECK(num_classes > 0, "confusion_matrix: num_classes must be positive");
  auto out = at::zeros({num_classes, num_classes + 1}, pred.options().dtype(at::kLong));
  const auto p = pred.contiguous();
  const auto t = target.contiguous();
  dispatch_label_type(p.scalar_type(), "confusion_matrix: pred", [&](auto pred_type) {
    dispatch_label_type(t.scalar_type(), "confusion_matrix: target", [&](auto target_type) {
      histogram(p.data_ptr<decltype(pred_type)>(), t.data_ptr<decltype(target_type)>(), p.numel(), num_classes,
                ignore_index, out.data_ptr<int64_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CPU, m) { m.impl("confusion_matrix", &confusion_matrix_cpu); }

}  // namespace namedmask
