#pragma once
// Torch-side argument checks of the copy-paste ops, shared by the CPU and CUDA glue
// (.cpp only). They guard memory safety; the Python wrapper gives the friendly errors.
#include <ATen/ATen.h>

#include "namedmask/dispatch.h"

namespace namedmask {

inline void check_fg_boxes_args(const at::Tensor& labels) {
  TORCH_CHECK(labels.dim() == 3, "fg_boxes: labels must be [B, H, W], got ", labels.sizes());
  TORCH_CHECK(labels.size(1) < (int64_t(1) << 31) && labels.size(2) < (int64_t(1) << 31),
              "fg_boxes: H and W must be < 2^31");
}

inline void check_copy_paste_args(const at::Tensor& images, const at::Tensor& labels, const at::Tensor& boxes,
                                  const at::Tensor& sources, const at::Tensor& offsets) {
  TORCH_CHECK(images.dim() == 4, "copy_paste: images must be [B, C, H, W], got ", images.sizes());
  TORCH_CHECK(labels.dim() == 3, "copy_paste: labels must be [B, H, W], got ", labels.sizes());
  const int64_t B = images.size(0), H = images.size(2), W = images.size(3);
  TORCH_CHECK(labels.size(0) == B && labels.size(1) == H && labels.size(2) == W,
              "copy_paste: labels ", labels.sizes(), " do not match images ", images.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == B && boxes.size(1) == 4, "copy_paste: boxes must be [B, 4], got ",
              boxes.sizes());
  TORCH_CHECK(sources.dim() == 2 && sources.size(0) == B, "copy_paste: sources must be [B, P], got ",
              sources.sizes());
  TORCH_CHECK(offsets.dim() == 3 && offsets.size(0) == B && offsets.size(1) == sources.size(1) &&
                  offsets.size(2) == 2,
              "copy_paste: offsets must be [B, P, 2], got ", offsets.sizes());
  for (const auto* t : {&boxes, &sources, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kLong, "copy_paste: boxes, sources and offsets must be int64");
  for (const auto* t : {&labels, &boxes, &sources, &offsets})
    TORCH_CHECK(t->device() == images.device(), "copy_paste: all tensors must be on ", images.device());
}

// Calls f(I{}, L{}) with I the same-width integer type images are moved as (bit-exact for
// any dtype) and L the label type.
template <typename F>
void dispatch_copy_paste_types(const at::Tensor& images, const at::Tensor& labels, F&& f) {
  dispatch_element_bits(images.scalar_type(), "copy_paste: images", [&](auto pixel_bits) {
    dispatch_label_type(labels.scalar_type(), "copy_paste: labels", [&](auto label_type) { f(pixel_bits, label_type); });
  });
}

}  // namespace namedmask
