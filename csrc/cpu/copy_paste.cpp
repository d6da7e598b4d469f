// CPU backend of namedmask::fg_boxes and namedmask::copy_paste (OpenMP via at::parallel_for).
// fg_boxes: one pass per sample. copy_paste: one pass over output rows; each row is the
// base row with the pastes painted on in order (the rule of namedmask/copy_paste.h),
// as branch-free selects the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "namedmask/copy_paste.h"
#include "namedmask/copy_paste_args.h"
#include "namedmask/dispatch.h"

namespace namedmask {
namespace {

template <typename L>
Box sample_box(const L* labels, int64_t height, int64_t width, int64_t background, int64_t ignore_index) {
  Box box = empty_box(height, width);
  for (int64_t y = 0; y < height; ++y) {
    const L* row = labels + y * width;
    int64_t first = 0;
    while (first < width && !is_foreground(row[first], background, ignore_index)) ++first;
    if (first == width) continue;
    int64_t last = width - 1;
    while (!is_foreground(row[last], background, ignore_index)) --last;
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
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Box box = sample_box(data + b * H * W, H, W, background, ignore_index);
        const int64_t values[4] = {box.y0, box.x0, box.y1, box.x1};
        std::copy(values, values + 4, boxes + 4 * b);
      }
    });
  });
  return out;
}

template <typename I, typename L>
void composite(const I* images, const L* labels, const std::vector<Placement>& placements, int64_t B, int64_t C,
               int64_t H, int64_t W, int64_t P, int64_t background, int64_t ignore_index, I* out_images,
               L* out_labels) {
  const int64_t plane = H * W;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W * (C + 1)));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> take(static_cast<size_t>(W));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      L* lab = out_labels + r * W;
      std::memcpy(lab, labels + r * W, W * sizeof(L));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (b * C + c) * plane + y * W;
        std::memcpy(out_images + at, images + at, W * sizeof(I));
      }
      for (int64_t p = 0; p < P; ++p) {
        const Placement& pl = placements[b * P + p];
        if (!covers_row(pl, y)) continue;
        const int64_t x0 = std::max<int64_t>(pl.x0, 0), x1 = std::min<int64_t>(pl.x1, W - 1);
        if (x1 < x0) continue;
        const int64_t src_row = (y + pl.shift_y) * W + pl.shift_x;  // + x: source pixel of (y, x)
        const int64_t src_lab = pl.source * plane + src_row;
        for (int64_t x = x0; x <= x1; ++x) {
          const L l = labels[src_lab + x];
          const bool fg = is_foreground(l, background, ignore_index);
          take[x] = fg;
          lab[x] = fg ? l : lab[x];
        }
        for (int64_t c = 0; c < C; ++c) {
          const int64_t src = (pl.source * C + c) * plane + src_row;
          I* dst = out_images + (b * C + c) * plane + y * W;
          for (int64_t x = x0; x <= x1; ++x) dst[x] = take[x] ? images[src + x] : dst[x];
        }
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
  dispatch_element_bits(images.scalar_type(), "copy_paste: images", [&](auto pixel_bits) {
    using I = decltype(pixel_bits);
    dispatch_label_type(labels.scalar_type(), "copy_paste: labels", [&](auto label_type) {
      using L = decltype(label_type);
      composite(static_cast<const I*>(images.const_data_ptr()), labels.const_data_ptr<L>(), placements, B, C, H, W,
                P, background, ignore_index, static_cast<I*>(out_images.mutable_data_ptr()),
                out_labels.mutable_data_ptr<L>());
    });
  });
  return {out_images, out_labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CPU, m) {
  m.impl("fg_boxes", &fg_boxes_cpu);
  m.impl("copy_paste", &copy_paste_cpu);
}

}  // namespace namedmask
