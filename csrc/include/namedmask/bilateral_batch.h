#pragma once
// Torch-side input checks of namedmask::bilateral_solve shared by the CPU and CUDA glue
// (.cpp only; the .cu files stay torch-free).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace namedmask {

// The images of a flattened batch: pixel_start[i] = first pixel of image i (batch + 1 entries).
struct BilateralBatch {
  std::vector<int64_t> height, width, pixel_start;
  int64_t max_h = 1, max_w = 1;
  int64_t size() const { return static_cast<int64_t>(height.size()); }
  int64_t pixels() const { return pixel_start.back(); }
};

inline BilateralBatch check_bilateral_inputs(const at::Tensor& image, const at::Tensor& target,
                                             const at::Tensor& confidence, const at::Tensor& sizes) {
  TORCH_CHECK(image.scalar_type() == at::kByte && image.dim() == 2 && image.size(1) == 3,
              "bilateral_solve: image must be uint8 [P, 3]");
  TORCH_CHECK(target.scalar_type() == at::kFloat && confidence.scalar_type() == at::kFloat,
              "bilateral_solve: target and confidence must be float32");
  TORCH_CHECK(target.numel() == image.size(0) && confidence.numel() == image.size(0),
              "bilateral_solve: image, target and confidence must have the same pixel count");
  TORCH_CHECK(image.device() == target.device() && image.device() == confidence.device(),
              "bilateral_solve: image, target and confidence must be on the same device");
  TORCH_CHECK(sizes.scalar_type() == at::kLong && sizes.dim() == 2 && sizes.size(1) == 2,
              "bilateral_solve: sizes must be int64 [B, 2]");
  const auto hw = sizes.cpu().contiguous();
  const int64_t* s = hw.data_ptr<int64_t>();
  BilateralBatch batch;
  batch.pixel_start.push_back(0);
  for (int64_t i = 0; i < hw.size(0); ++i) {
    TORCH_CHECK(s[2 * i] >= 0 && s[2 * i + 1] >= 0, "bilateral_solve: negative image size");
    batch.height.push_back(s[2 * i]), batch.width.push_back(s[2 * i + 1]);
    batch.max_h = std::max(batch.max_h, s[2 * i]), batch.max_w = std::max(batch.max_w, s[2 * i + 1]);
    batch.pixel_start.push_back(batch.pixel_start.back() + s[2 * i] * s[2 * i + 1]);
  }
  TORCH_CHECK(batch.pixels() == image.size(0), "bilateral_solve: sizes describe ", batch.pixels(),
              " pixels, image has ", image.size(0));
  return batch;
}

// Grid keys are mixed-radix int64 over (image, y, x, Y, U, V) (namedmask/bilateral.h): the
// radices (extents + 2, as grid_radices, here in double so tiny sigmas cannot overflow) times the
// batch size must stay below 2^62. namedmask.ops checks this too, with advice; the raw op must not
// trust its caller.
inline void check_bilateral_grid(const BilateralBatch& batch, double sigma_spatial, double sigma_luma,
                                 double sigma_chroma) {
  for (double sigma : {sigma_spatial, sigma_luma, sigma_chroma})
    TORCH_CHECK(sigma > 0 && std::isfinite(sigma), "bilateral_solve: sigmas must be positive and finite, got ", sigma);
  const double span = static_cast<double>(batch.size()) * (std::floor((batch.max_w - 1) / sigma_spatial) + 3) *
                      (std::floor((batch.max_h - 1) / sigma_spatial) + 3) * (std::floor(255.0 / sigma_luma) + 3) *
                      std::pow(std::floor(255.5 / sigma_chroma) + 3, 2);
  TORCH_CHECK(span < 4.6e18, "bilateral_solve: the bilateral grid of ", batch.size(), " image(s) up to ", batch.max_h,
              "x", batch.max_w, " has too many cells for 64-bit keys; use larger sigmas or fewer images per call");
}

// Every backend's error when an image's grid would exceed max_vertices (namedmask.ops documents
// the bound): one line naming the image and the option to change.
inline std::string vertex_cap_message(int64_t index, int64_t h, int64_t w, int64_t max_vertices) {
  return "bilateral_solve: image " + std::to_string(index) + " (" + std::to_string(h) + "x" + std::to_string(w) +
         ") needs more than max_vertices=" + std::to_string(max_vertices) +
         " bilateral-grid vertices (colours as varied as i.i.d. noise open a vertex per pixel; the solver needs "
         "~200 bytes per vertex); pass a larger max_vertices or larger sigmas";
}

inline void check_max_vertices(int64_t max_vertices) {
  TORCH_CHECK_VALUE(max_vertices >= 1 && max_vertices < (int64_t(1) << 31),
                    "bilateral_solve: max_vertices must be in [1, 2^31), got ", max_vertices);
}

}  // namespace namedmask
