// CPU backend of namedmask::fg_boxes and namedmask::copy_paste. fg_boxes: one pass per sample.
// copy_paste: one pass over output rows; each row is the base row with the pastes painted on in
// order (the rule of namedmask/copy_paste.h), as branch-free selects the compiler vectorises.
// Threads: blocks of ~64 KB shared with helpers that join when scheduled (share_tasks.h), and
// none for a call of less than kHelperBytes per helper: a training batch is ~1-2 ms of work,
// which a fork/join region on a loaded machine turned into 15-40 ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "namedmask/copy_paste.h"
#include "namedmask/copy_paste_args.h"
#include "namedmask/dispatch.h"
#include "share_tasks.h"

namespace namedmask {
namespace {

constexpr int64_t kTaskBytes = 1 << 16;
constexpr int64_t kHelperBytes = int64_t(1) << 23;  // measured: a 7 MB batch was 1.3-2x slower with a helper

template <typename L>
Box sample_box(const L* labels, int64_t height, int64_t width, ForegroundRange<L> fg) {
  Box box = empty_box(height, width);
  for (int64_t y = 0; y < height; ++y) {
    const L* row = labels + y * width;
    unsigned any = 0;  // an integer OR-reduction vectorises, a bool one does not
    for (int64_t x = 0; x < width; ++x) any |= unsigned(fg.contains(row[x]));
    if (!any) continue;
    int64_t first = 0, last = width - 1;
    while (!fg.contains(row[first])) ++first;
    while (!fg.contains(row[last])) --last;
    box = merge(box, Box{y, first, y, last});
  }
  return finish_box(box);
}

at::Tensor fg_boxes_cpu(const at::Tensor& labels_in, int64_t background, int64_t ignore_index) {
  check_fg_boxes_args(labels_in);
  const auto labels = labels_in.contiguous();
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  auto out = at::empty({B, 4}, labels.options().dtype(at::kLong));
  int64_t* boxes = out.data_ptr<int64_t>();
  dispatch_label_type(labels.scalar_type(), "fg_boxes: labels", [&](auto label_type) {
    using L = decltype(label_type);
    const L* data = labels.data_ptr<L>();
    share_tasks(B, helpers_for(labels.numel() * int64_t(sizeof(L)), kHelperBytes), [&](int64_t b, int) {
      const Box box = sample_box(data + b * H * W, H, W, foreground_range<L>(background, ignore_index));
      const int64_t values[4] = {box.y0, box.x0, box.y1, box.x1};
      std::copy(values, values + 4, boxes + 4 * b);
    });
  });
  return out;
}

// One paste on one row segment of n pixels: labels first (recording which pixels are taken),
// then each channel. Branch-free selects on restrict pointers, so both loops vectorise.
template <typename L>
void paste_labels(const L* __restrict__ src, L* __restrict__ dst, uint8_t* __restrict__ take, int64_t n,
                  ForegroundRange<L> fg) {
  for (int64_t x = 0; x < n; ++x) {
    const L l = src[x];
    const bool f = fg.contains(l);
    take[x] = f;
    dst[x] = f ? l : dst[x];
  }
}

template <typename I>
void paste_pixels(const I* __restrict__ src, I* __restrict__ dst, const uint8_t* __restrict__ take, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const I s = src[x], d = dst[x];  // both loaded unconditionally, or the loop does not vectorise
    dst[x] = take[x] ? s : d;
  }
}

template <typename I, typename L>
void composite(const I* images, const L* labels, const std::vector<Placement>& placements, int64_t B, int64_t C,
               int64_t H, int64_t W, int64_t P, ForegroundRange<L> fg, I* out_images, L* out_labels) {
  const int64_t plane = H * W;
  const int64_t row_bytes = W * (C * int64_t(sizeof(I)) + int64_t(sizeof(L)));
  const int64_t rows = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, row_bytes));  // per task
  const int helpers = helpers_for(B * H * row_bytes, kHelperBytes);
  std::vector<std::vector<uint8_t>> takes(helpers + 1, std::vector<uint8_t>(static_cast<size_t>(W)));
  share_tasks((B * H + rows - 1) / rows, helpers, [&](int64_t task, int worker) {
    std::vector<uint8_t>& take = takes[worker];
    for (int64_t r = task * rows, end = std::min(B * H, r + rows); r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      std::memcpy(out_labels + r * W, labels + r * W, W * sizeof(L));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t row = (b * C + c) * plane + y * W;
        std::memcpy(out_images + row, images + row, W * sizeof(I));
      }
      for (int64_t p = 0; p < P; ++p) {  // in order: later pastes paint over earlier ones
        const Placement& pl = placements[b * P + p];
        if (!covers_row(pl, y)) continue;
        const int64_t x0 = std::max<int64_t>(pl.x0, 0), x1 = std::min<int64_t>(pl.x1, W - 1);
        if (x1 < x0) continue;
        const int64_t from = source_pixel(pl, y, x0, W);  // source of (y, x0) in its sample's plane
        paste_labels(labels + pl.source * plane + from, out_labels + r * W + x0, take.data(), x1 - x0 + 1, fg);
        for (int64_t c = 0; c < C; ++c)
          paste_pixels(images + (pl.source * C + c) * plane + from, out_images + (b * C + c) * plane + y * W + x0,
                       take.data(), x1 - x0 + 1);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> copy_paste_cpu(const at::Tensor& images_in, const at::Tensor& labels_in,
                                                  const at::Tensor& boxes_in, const at::Tensor& sources_in,
                                                  const at::Tensor& offsets_in, int64_t background,
                                                  int64_t ignore_index) {
  check_copy_paste_args(images_in, labels_in, boxes_in, sources_in, offsets_in);
  const auto images = images_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto boxes = boxes_in.contiguous();
  const auto sources = sources_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t P = sources.size(1);
  std::vector<Placement> placements(static_cast<size_t>(B * P));
  const int64_t* s = sources.data_ptr<int64_t>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * P; ++i)
    placements[i] = place(s[i], o[2 * i], o[2 * i + 1], boxes.data_ptr<int64_t>(), B, H, W);
  auto out_images = at::empty_like(images);
  auto out_labels = at::empty_like(labels);
  dispatch_copy_paste_types(images, labels, [&](auto pixel_bits, auto label_type) {
    using I = decltype(pixel_bits);
    using L = decltype(label_type);
    composite(static_cast<const I*>(images.const_data_ptr()), labels.const_data_ptr<L>(), placements, B, C, H, W, P,
              foreground_range<L>(background, ignore_index), static_cast<I*>(out_images.mutable_data_ptr()),
              out_labels.mutable_data_ptr<L>());
  });
  return {out_images, out_labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CPU, m) {
  m.impl("fg_boxes", &fg_boxes_cpu);
  m.impl("copy_paste", &copy_paste_cpu);
}

}  // namespace namedmask
