// CPU backend of namedmask::confusion_matrix: one private histogram per worker (several
// interleaved copies, so consecutive equal bins do not serialise on one counter), merged once
// at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "namedmask/confusion_matrix.h"
#include "namedmask/dispatch.h"
#include "share_tasks.h"

namespace namedmask {
namespace {

// Tasks of kTaskPixels pixels (~50 us), shared with helpers that join when scheduled
// (share_tasks.h); a helper only for every kHelperPixels pixels, so small inputs stay inline.
// Counts are integers: the sum does not depend on which worker counted what.
constexpr int64_t kTaskPixels = int64_t(1) << 18;  // pixels per task
constexpr int64_t kHelperPixels = int64_t(1) << 20;

template <typename F>
void for_pixel_tasks(int64_t n, int helpers, F&& f) {
  share_tasks((n + kTaskPixels - 1) / kTaskPixels, helpers, [&](int64_t task, int worker) {
    f(task * kTaskPixels, std::min(n, (task + 1) * kTaskPixels), worker);
  });
}

// Generic path: any label types, any class count.
template <typename P, typename T>
void histogram(const P* pred, const T* target, int64_t n, int64_t num_classes, int64_t ignore_index,
               int64_t* out) {
  const int64_t bins = num_classes * (num_classes + 1);
  const int lanes = bins <= 8192 ? 4 : 1;
  const int helpers = helpers_for(n, kHelperPixels);
  std::vector<std::vector<int64_t>> local(helpers + 1);
  for_pixel_tasks(n, helpers, [&](int64_t begin, int64_t end, int worker) {
    std::vector<int64_t>& h = local[worker];
    if (h.empty()) h.assign(static_cast<size_t>(bins * lanes), 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = confusion_bin(pred[i], target[i], num_classes, ignore_index);
      if (b >= 0) ++h[(i & (lanes - 1)) * bins + b];
    }
  });
  for (const auto& h : local)
    for (int64_t k = 0; k < static_cast<int64_t>(h.size()); ++k) out[k % bins] += h[k];
}

// uint8 fast path: the bin of every (target, pred) byte pair is tabulated once (from
// confusion_bin, so the rule stays in one place) in a 64K-entry table; ignored pixels count
// into a trash bin instead of branching, and 8 interleaved uint32 histograms break the
// store-to-load chain on runs of equal bins.
void histogram_u8(const uint8_t* pred, const uint8_t* target, int64_t n, int64_t num_classes,
                  int64_t ignore_index, int64_t* out) {
  constexpr int kLanes = 8;
  const int64_t bins = num_classes * (num_classes + 1);
  const int64_t stride = bins + 1;  // + one trash bin for ignored pixels
  std::vector<uint32_t> table(1 << 16);
  for (int t = 0; t < 256; ++t)
    for (int p = 0; p < 256; ++p) {
      const int64_t b = confusion_bin<uint8_t, uint8_t>(p, t, num_classes, ignore_index);
      table[(t << 8) | p] = static_cast<uint32_t>(b < 0 ? bins : b);
    }
  const uint32_t* lut = table.data();
  const int helpers = helpers_for(n, kHelperPixels);
  // uint32 lane counters are folded into the int64 total only when a worker's unfolded
  // pixels could overflow them, and once at the end: folding costs 8 x (bins + 1) adds, more
  // than a task's pixels for large class counts (C = 150: 181k adds per 262k pixels).
  struct Counts {
    std::vector<uint32_t> lanes;
    std::vector<int64_t> total;
    int64_t pending = 0;  // pixels counted in lanes since the last fold
  };
  auto fold = [&](Counts& counts) {
    const uint32_t* h = counts.lanes.data();
    for (int l = 0; l < kLanes; ++l)
      for (int64_t b = 0; b < bins; ++b) counts.total[b] += h[l * stride + b];
    std::fill(counts.lanes.begin(), counts.lanes.end(), 0u);
    counts.pending = 0;
  };
  std::vector<Counts> local(helpers + 1);
  for_pixel_tasks(n, helpers, [&](int64_t c0, int64_t c1, int worker) {
    Counts& counts = local[worker];
    if (counts.total.empty()) counts.lanes.assign(stride * kLanes, 0), counts.total.assign(bins, 0);
    uint32_t* h = counts.lanes.data();
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
    counts.pending += c1 - c0;
    if (counts.pending > (int64_t(1) << 31)) fold(counts);  // a lane then holds < 2^32 - 2^31
  });
  for (Counts& counts : local) {
    if (counts.total.empty()) continue;
    fold(counts);
    for (int64_t b = 0; b < bins; ++b) out[b] += counts.total[b];
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
