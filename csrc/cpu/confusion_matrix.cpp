// CPU backend of namedmask::confusion_matrix: OpenMP, one private histogram per thread
// (several interleaved copies, so consecutive equal bins do not serialise on one
// counter), merged once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "namedmask/confusion_matrix.h"
#include "namedmask/dispatch.h"

namespace namedmask {
namespace {

// torch's thread count, but no more threads than 64K-pixel slices: small inputs stay serial.
int worker_threads(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 65536 + 1)));
}

// Generic path: any label types, any class count.
template <typename P, typename T>
void histogram(const P* pred, const T* target, int64_t n, int64_t num_classes, int64_t ignore_index,
               int64_t* out) {
  const int64_t bins = num_classes * (num_classes + 1);
  const int lanes = bins <= 8192 ? 4 : 1;
  const int threads = worker_threads(n);
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

// uint8 fast path: the bin of every (target, pred) byte pair is tabulated once (from
// confusion_bin, so the rule stays in one place) in a 64K-entry table; ignored pixels count
// into a trash bin instead of branching, and 8 interleaved uint32 histograms break the
// store-to-load chain on runs of equal bins.
void histogram_u8(const uint8_t* pred, const uint8_t* target, int64_t n, int64_t num_classes,
                  int64_t ignore_index, int64_t* out) {
  constexpr int kLanes = 8;
  constexpr int64_t kChunk = int64_t(1) << 30;  // per-thread chunk: uint32 counters cannot overflow
  const int64_t bins = num_classes * (num_classes + 1);
  const int64_t stride = bins + 1;  // + one trash bin for ignored pixels
  std::vector<uint32_t> table(1 << 16);
  for (int t = 0; t < 256; ++t)
    for (int p = 0; p < 256; ++p) {
      const int64_t b = confusion_bin<uint8_t, uint8_t>(p, t, num_classes, ignore_index);
      table[(t << 8) | p] = static_cast<uint32_t>(b < 0 ? bins : b);
    }
  const uint32_t* lut = table.data();
  const int threads = worker_threads(n);
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint32_t> local(static_cast<size_t>(stride * kLanes), 0);
    std::vector<int64_t> total(static_cast<size_t>(bins), 0);
    uint32_t* h = local.data();
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t begin = n * tid / nt, end = n * (tid + 1) / nt;
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk);
      int64_t i = c0;
      // Label maps are piecewise constant: 8 pixels whose target bytes are all equal and
      // whose prediction bytes are all equal extend a run counted in a register.
      uint32_t run_bin = static_cast<uint32_t>(bins), run = 0;
      constexpr uint64_t kOnes = 0x0101010101010101ULL;
      for (; i + kLanes <= c1; i += kLanes) {
        uint64_t t8, p8;
        std::memcpy(&t8, target + i, 8);
        std::memcpy(&p8, pred + i, 8);
        if (t8 == (t8 & 0xff) * kOnes && p8 == (p8 & 0xff) * kOnes) {
          const uint32_t b = lut[((t8 & 0xff) << 8) | (p8 & 0xff)];
          if (b != run_bin) {
            h[run_bin] += run;
            run_bin = b;
            run = 0;
          }
          run += kLanes;
        } else {
          for (int l = 0; l < kLanes; ++l) ++h[l * stride + lut[(uint32_t(target[i + l]) << 8) | pred[i + l]]];
        }
      }
      h[run_bin] += run;
      for (; i < c1; ++i) ++h[lut[(uint32_t(target[i]) << 8) | pred[i]]];
      for (int l = 0; l < kLanes; ++l)
        for (int64_t b = 0; b < bins; ++b) total[b] += h[l * stride + b];
      std::fill(local.begin(), local.end(), 0u);
    }
#pragma omp critical(namedmask_confusion_merge)
    for (int64_t b = 0; b < bins; ++b) out[b] += total[b];
  }
}

at::Tensor confusion_matrix_cpu(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes,
                                int64_t ignore_index) {
  TORCH_CHECK(pred.sizes() == target.sizes(), "confusion_matrix: pred and target shapes differ");
  TORCH_CHECK(num_classes > 0, "confusion_matrix: num_classes must be positive");
  auto out = at::zeros({num_classes, num_classes + 1}, pred.options().dtype(at::kLong));
  const auto p = pred.contiguous();
  const auto t = target.contiguous();
  if (p.scalar_type() == at::kByte && t.scalar_type() == at::kByte && num_classes <= 256) {
    histogram_u8(p.data_ptr<uint8_t>(), t.data_ptr<uint8_t>(), p.numel(), num_classes, ignore_index,
                 out.data_ptr<int64_t>());
    return out;
  }
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
