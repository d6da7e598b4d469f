// Torch glue of the CUDA bilateral solver: checks, allocation, the two small device-to-host
// reads between phases (vertex count, per-image vertex ranges), the chunk table, launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bilateral_solver.cuh"
#include "namedmask/bilateral_batch.h"

namespace namedmask {
namespace {

int bit_length(int64_t value) {
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) <= value) ++bits;
  return std::max(bits, 1);
}

at::Tensor bilateral_solve_cuda(const at::Tensor& image, const at::Tensor& target, const at::Tensor& confidence,
                                const at::Tensor& sizes, double sigma_spatial, double sigma_luma, double sigma_chroma,
                                double lam, int64_t max_iter, double tol, int64_t max_vertices) {
  const BilateralBatch shape = check_bilateral_inputs(image, target, confidence, sizes);
  check_max_vertices(max_vertices);
  check_bilateral_grid(shape, sigma_spatial, sigma_luma, sigma_chroma);
  c10::cuda::CUDAGuard guard(image.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dev = image.options();
  const int64_t batch = shape.size(), pixels = shape.pixels();
  std::vector<int64_t> widths(batch);
  for (int64_t i = 0; i < batch; ++i) widths[i] = std::max<int64_t>(shape.width[i], 1);
  TORCH_CHECK(pixels < (int64_t(1) << 31), "bilateral_solve: at most 2^31 - 1 pixels per call on CUDA");
  auto out = at::empty({pixels}, target.options());
  if (pixels == 0) return out;
  const auto img = image.contiguous();
  const auto t = target.contiguous();
  const auto c = confidence.contiguous();
  const auto layout = bilateral::make_layout(shape.max_h, shape.max_w, sigma_spatial, sigma_luma, sigma_chroma);
  const int end_bit = bit_length(batch * layout.image_stride);

  auto i64 = dev.dtype(at::kLong), i32 = dev.dtype(at::kInt), f64 = dev.dtype(at::kDouble);
  auto d_pixel_start = at::tensor(shape.pixel_start, at::kLong).to(image.device());
  auto d_widths = at::tensor(widths, at::kLong).to(image.device());
  const size_t temp_bytes = bilateral_temp_bytes(pixels, end_bit);
  auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, dev.dtype(at::kByte));
  auto keys = at::empty({pixels}, i64), sorted_keys = at::empty({pixels}, i64), unique_keys = at::empty({pixels}, i64);
  auto ids = at::empty({pixels}, i32), sorted_ids = at::empty({pixels}, i32), run_counts = at::empty({pixels}, i32);
  auto num_vertices_dev = at::zeros({1}, i32);
  C10_CUDA_CHECK(launch_bilateral_grid(img.data_ptr<uint8_t>(), d_pixel_start.data_ptr<int64_t>(),
                                       d_widths.data_ptr<int64_t>(), batch, pixels, layout, end_bit, temp.data_ptr(),
                                       temp_bytes, keys.data_ptr<int64_t>(), ids.data_ptr<int32_t>(),
                                       sorted_keys.data_ptr<int64_t>(), sorted_ids.data_ptr<int32_t>(),
                                       unique_keys.data_ptr<int64_t>(), run_counts.data_ptr<int32_t>(),
                                       num_vertices_dev.data_ptr<int32_t>(), stream));
  const int64_t nv = num_vertices_dev.item<int32_t>();  // sync 1 of 2: allocation sizes

  auto run_start = at::empty({nv}, i32), vertex_of_pixel = at::empty({pixels}, i32);
  auto m = at::empty({nv}, f64), w = at::empty({nv}, f64), b = at::empty({nv}, f64);
  auto nbr = at::empty({nv, bilateral::kNeighbours}, i32);
  auto vertex_start = at::empty({batch + 1}, i64);
  C10_CUDA_CHECK(launch_bilateral_vertices(
      nv, pixels, batch, layout, unique_keys.data_ptr<int64_t>(), run_counts.data_ptr<int32_t>(),
      sorted_ids.data_ptr<int32_t>(), t.data_ptr<float>(), c.data_ptr<float>(), temp.data_ptr(), temp_bytes,
      run_start.data_ptr<int32_t>(), vertex_of_pixel.data_ptr<int32_t>(), m.data_ptr<double>(), w.data_ptr<double>(),
      b.data_ptr<double>(), nbr.data_ptr<int32_t>(), vertex_start.data_ptr<int64_t>(), stream));

  // Chunks of kBilateralChunk vertices that never straddle two images.
  const auto starts = vertex_start.cpu();  // sync 2 of 2: per-image vertex ranges
  const int64_t* vs = starts.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i)  // the same bound as the CPU kernel's (checked before the solver's buffers)
    TORCH_CHECK_VALUE(vs[i + 1] - vs[i] <= max_vertices,
                      vertex_cap_message(i, shape.height[i], shape.width[i], max_vertices));
  std::vector<int32_t> chunk_begin, chunk_end, chunk_image, image_chunks(batch + 1, 0);
  for (int64_t i = 0; i < batch; ++i) {
    for (int64_t v = vs[i]; v < vs[i + 1]; v += kBilateralChunk) {
      chunk_begin.push_back(static_cast<int32_t>(v));
      chunk_end.push_back(static_cast<int32_t>(std::min<int64_t>(v + kBilateralChunk, vs[i + 1])));
      chunk_image.push_back(static_cast<int32_t>(i));
    }
    image_chunks[i + 1] = static_cast<int32_t>(chunk_begin.size());
  }
  const int64_t num_chunks = static_cast<int64_t>(chunk_begin.size());
  auto upload = [&](const std::vector<int32_t>& v) { return at::tensor(v, at::kInt).to(image.device()); };
  auto d_begin = upload(chunk_begin), d_end = upload(chunk_end), d_image = upload(chunk_image);
  auto d_image_chunks = upload(image_chunks);
  auto vectors = at::empty({9, nv}, f64);  // n, scratch, y, r, z, p, q, np, inv_diag
  auto partial = at::empty({std::max<int64_t>(num_chunks, 1), 2}, f64);
  auto state = at::empty({batch, 8}, f64);
  double* v0 = vectors.data_ptr<double>();
  C10_CUDA_CHECK(launch_bilateral_solve(nv, batch, num_chunks, d_begin.data_ptr<int32_t>(), d_end.data_ptr<int32_t>(),
                                        d_image.data_ptr<int32_t>(), d_image_chunks.data_ptr<int32_t>(),
                                        nbr.data_ptr<int32_t>(), m.data_ptr<double>(), w.data_ptr<double>(),
                                        b.data_ptr<double>(), v0, v0 + nv, v0 + 2 * nv, v0 + 3 * nv, v0 + 4 * nv,
                                        v0 + 5 * nv, v0 + 6 * nv, v0 + 7 * nv, v0 + 8 * nv,
                                        partial.data_ptr<double>(),
                                        state.data_ptr<double>(), lam, max_iter, tol, stream));
  C10_CUDA_CHECK(launch_bilateral_slice(vertex_of_pixel.data_ptr<int32_t>(), v0 + 2 * nv, pixels,
                                        out.data_ptr<float>(), stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CUDA, m) { m.impl("bilateral_solve", &bilateral_solve_cuda); }

}  // namespace namedmask
