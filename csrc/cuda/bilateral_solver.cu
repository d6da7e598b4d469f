// CUDA bilateral solver (spec: namedmask/ops/reference.py; per-element rules shared with the
// CPU in namedmask/bilateral.h). A batch of images is one set of vertex vectors: sorted keys put
// each image's vertices in one contiguous range, vertex work runs over chunks that never
// straddle images, and the CG scalars are per image, so images converge independently without
// the host looking at any residual.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "bilateral_solver.cuh"

namespace namedmask {
namespace {

using namespace bilateral;
using Key = unsigned long long;  // keys are non-negative; unsigned sorts on the low end_bit bits

constexpr int kThreads = 256;

// Per-image CG state (device memory, kStateSize doubles per image).
enum State { kBNorm, kAtol, kRho, kRhoPrev, kBeta, kAlpha, kDone, kStateSize = 8 };

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

// Index i of the last entry with starts[i] <= value (starts ascending, starts[0] = 0).
template <typename T>
__device__ int64_t segment_of(const T* starts, int64_t count, T value) {
  int64_t lo = 0, hi = count;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (starts[mid] <= value) lo = mid; else hi = mid;
  }
  return lo;
}

__global__ void pixel_keys_kernel(const uint8_t* __restrict__ rgb, const int64_t* __restrict__ pixel_start,
                                  const int64_t* __restrict__ widths, int64_t batch, int64_t pixels,
                                  GridLayout layout, Key* __restrict__ keys, int32_t* __restrict__ ids) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t image = segment_of(pixel_start, batch, i);
    const int64_t local = i - pixel_start[image], w = widths[image];
    const uint8_t* c = rgb + 3 * i;
    keys[i] = static_cast<Key>(vertex_key(layout, image, local % w, local / w, c[0], c[1], c[2]));
    ids[i] = static_cast<int32_t>(i);
  }
}

// One thread per vertex: its run of sorted pixels (ascending pixel id) gives the splat in a
// fixed order, and the vertex of each of those pixels.
__global__ void splat_kernel(int64_t num_vertices, const int32_t* __restrict__ run_start,
                             const int32_t* __restrict__ run_counts, const int32_t* __restrict__ sorted_ids,
                             const float* __restrict__ target, const float* __restrict__ confidence,
                             int32_t* __restrict__ vertex_of_pixel, double* __restrict__ m, double* __restrict__ w,
                             double* __restrict__ b) {
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < num_vertices;
       v += int64_t(gridDim.x) * blockDim.x) {
    double sw = 0.0, sb = 0.0;
    const int32_t begin = run_start[v], count = run_counts[v];
    for (int32_t k = begin; k < begin + count; ++k) {
      const int32_t pix = sorted_ids[k];
      vertex_of_pixel[pix] = static_cast<int32_t>(v);
      const double c = confidence[pix];
      sw += c;
      sb += c * static_cast<double>(target[pix]);
    }
    m[v] = count, w[v] = sw, b[v] = sb;
  }
}

__device__ int32_t find_key(const Key* keys, int64_t count, Key key) {
  int64_t lo = 0, hi = count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < key) lo = mid + 1; else hi = mid;
  }
  return (lo < count && keys[lo] == key) ? static_cast<int32_t>(lo) : -1;
}

__global__ void neighbours_kernel(int64_t num_vertices, GridLayout layout, const Key* __restrict__ keys,
                                  int32_t* __restrict__ nbr) {
  const int64_t total = num_vertices * kNeighbours;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = i / kNeighbours;
    const int k = static_cast<int>(i % kNeighbours);
    nbr[i] = find_key(keys, num_vertices, static_cast<Key>(neighbour_key(layout, static_cast<int64_t>(keys[v]), k)));
  }
}

__global__ void vertex_start_kernel(int64_t num_vertices, int64_t batch, GridLayout layout, const Key* keys,
                                    int64_t* vertex_start) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i > batch) return;
  const Key first = static_cast<Key>(i * layout.image_stride);
  int64_t lo = 0, hi = num_vertices;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < first) lo = mid + 1; else hi = mid;
  }
  vertex_start[i] = lo;
}

__global__ void fill_kernel(double* x, double value, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = value;
}

// n_out = sqrt(n m / B n) (bistochastization step), or m = n B n when `final`.
__global__ void bistochastic_kernel(int64_t num_vertices, const int32_t* __restrict__ nbr,
                                    const double* __restrict__ n, double* __restrict__ m, double* __restrict__ n_out,
                                    bool final) {
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < num_vertices;
       v += int64_t(gridDim.x) * blockDim.x) {
    const double bn = blur_at(PaddedNeighbours{nbr}, v, [&](int64_t j) { return n[j]; });
    if (final) m[v] = n[v] * bn;
    else n_out[v] = bistochastic_step(n[v], m[v], bn);
  }
}

// Sums kValues per-thread values over the block in a fixed tree order; thread 0 writes them.
template <int kValues>
__device__ void block_sum(double (&vals)[kValues], double* out) {
  __shared__ double sh[kValues][kThreads];
  for (int k = 0; k < kValues; ++k) sh[k][threadIdx.x] = vals[k];
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      for (int k = 0; k < kValues; ++k) sh[k][threadIdx.x] += sh[k][threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int k = 0; k < kValues; ++k) out[k] = sh[k][0];
}

struct Chunks {
  const int32_t* begin;
  const int32_t* end;
  const int32_t* image;
};

// Chunk kernels: block c covers vertices [begin[c], end[c]) of image image[c]; each writes
// two partial sums per chunk to partial[2c], partial[2c + 1].
__global__ void cg_init_kernel(Chunks chunks, const double* __restrict__ m, const double* __restrict__ n,
                               const double* __restrict__ w, const double* __restrict__ b, double lam,
                               double* __restrict__ y, double* __restrict__ np, double* __restrict__ inv_diag,
                               double* __restrict__ p, double* __restrict__ partial) {
  double acc[2] = {0.0, 0.0};
  for (int32_t v = chunks.begin[blockIdx.x] + threadIdx.x; v < chunks.end[blockIdx.x]; v += kThreads) {
    y[v] = w[v] > 0 ? b[v] / w[v] : 0.0;
    np[v] = n[v] * y[v];
    inv_diag[v] = inverse_diagonal(m[v], n[v], w[v], lam);
    p[v] = 0.0;
    acc[0] += b[v] * b[v];
  }
  block_sum(acc, partial + 2 * blockIdx.x);
}

__global__ void cg_residual_kernel(Chunks chunks, const int32_t* __restrict__ nbr, const double* __restrict__ m,
                                   const double* __restrict__ n, const double* __restrict__ w,
                                   const double* __restrict__ b, const double* __restrict__ y,
                                   const double* __restrict__ np, double lam, double* __restrict__ r) {
  for (int32_t v = chunks.begin[blockIdx.x] + threadIdx.x; v < chunks.end[blockIdx.x]; v += kThreads)
    r[v] = b[v] - apply_a_factored(PaddedNeighbours{nbr}, a_diagonal(m[v], n[v], w[v], lam), lam * n[v], y[v], np, v);
}

__global__ void cg_precondition_kernel(Chunks chunks, const double* __restrict__ r,
                                       const double* __restrict__ inv_diag, double* __restrict__ z,
                                       double* __restrict__ partial) {
  double acc[2] = {0.0, 0.0};  // r.r, r.z
  for (int32_t v = chunks.begin[blockIdx.x] + threadIdx.x; v < chunks.end[blockIdx.x]; v += kThreads) {
    z[v] = r[v] * inv_diag[v];
    acc[0] += r[v] * r[v];
    acc[1] += r[v] * z[v];
  }
  block_sum(acc, partial + 2 * blockIdx.x);
}

__global__ void cg_direction_kernel(Chunks chunks, const double* __restrict__ state, const double* __restrict__ z,
                                    const double* __restrict__ n, double* __restrict__ p, double* __restrict__ np,
                                    bool first) {
  const double* s = state + kStateSize * chunks.image[blockIdx.x];
  if (s[kDone] != 0.0) return;
  for (int32_t v = chunks.begin[blockIdx.x] + threadIdx.x; v < chunks.end[blockIdx.x]; v += kThreads) {
    p[v] = first ? z[v] : z[v] + s[kBeta] * p[v];
    np[v] = n[v] * p[v];
  }
}

__global__ void cg_apply_kernel(Chunks chunks, const int32_t* __restrict__ nbr, const double* __restrict__ m,
                                const double* __restrict__ n, const double* __restrict__ w,
                                const double* __restrict__ p, const double* __restrict__ np, double lam,
                                double* __restrict__ q, double* __restrict__ partial) {
  double acc[2] = {0.0, 0.0};  // p.q
  for (int32_t v = chunks.begin[blockIdx.x] + threadIdx.x; v < chunks.end[blockIdx.x]; v += kThreads) {
    q[v] = apply_a_factored(PaddedNeighbours{nbr}, a_diagonal(m[v], n[v], w[v], lam), lam * n[v], p[v], np, v);
    acc[0] += p[v] * q[v];
  }
  block_sum(acc, partial + 2 * blockIdx.x);
}

__global__ void cg_step_kernel(Chunks chunks, const double* __restrict__ state, const double* __restrict__ p,
                               const double* __restrict__ q, double* __restrict__ y, double* __restrict__ r) {
  const double alpha = state[kStateSize * chunks.image[blockIdx.x] + kAlpha];
  if (alpha == 0.0) return;
  for (int32_t v = chunks.begin[blockIdx.x] + threadIdx.x; v < chunks.end[blockIdx.x]; v += kThreads) {
    y[v] += alpha * p[v];
    r[v] -= alpha * q[v];
  }
}

// Image kernels: thread i sums the partials of image i's chunks in order and updates its scalars.
enum class Phase { kInit, kDirection, kStep };

__global__ void cg_scalars_kernel(int64_t batch, const int32_t* __restrict__ image_chunks,
                                  const double* __restrict__ partial, double* __restrict__ state, double tol,
                                  Phase phase, bool first) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= batch) return;
  double sum0 = 0.0, sum1 = 0.0;
  for (int32_t c = image_chunks[i]; c < image_chunks[i + 1]; ++c) sum0 += partial[2 * c], sum1 += partial[2 * c + 1];
  double* s = state + kStateSize * i;
  if (phase == Phase::kInit) {  // sum0 = b.b
    s[kBNorm] = sqrt(sum0);
    s[kAtol] = tol * s[kBNorm];
    s[kDone] = s[kBNorm] == 0.0 ? 1.0 : 0.0;  // y0 = 0 is the answer (scipy returns b)
    s[kRho] = s[kRhoPrev] = s[kBeta] = s[kAlpha] = 0.0;
  } else if (phase == Phase::kDirection) {  // sum0 = r.r, sum1 = r.z; scipy checks before each iteration
    if (s[kDone] == 0.0 && sqrt(sum0) < s[kAtol]) s[kDone] = 1.0;
    if (s[kDone] == 0.0) {
      s[kRho] = sum1;
      s[kBeta] = first ? 0.0 : sum1 / s[kRhoPrev];
    }
  } else {  // sum0 = p.q
    if (s[kDone] == 0.0) {
      s[kAlpha] = sum0 != 0.0 ? s[kRho] / sum0 : 0.0;  // p.q == 0 only when r == 0 (tol == 0)
      s[kRhoPrev] = s[kRho];
      if (sum0 == 0.0) s[kDone] = 1.0;  // converged exactly: the next beta would be 0 / 0
    } else {
      s[kAlpha] = 0.0;
    }
  }
}

__global__ void slice_kernel(const int32_t* __restrict__ vertex_of_pixel, const double* __restrict__ y,
                             int64_t pixels, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<float>(y[vertex_of_pixel[i]]);
}

}  // namespace

size_t bilateral_temp_bytes(int64_t pixels, int end_bit) {
  const int count = static_cast<int>(pixels);
  size_t sort = 0, rle = 0, scan = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort, static_cast<const Key*>(nullptr), static_cast<Key*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), count, 0,
                                  end_bit);
  cub::DeviceRunLengthEncode::Encode(nullptr, rle, static_cast<const Key*>(nullptr), static_cast<Key*>(nullptr),
                                     static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr), count);
  cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                count);
  return std::max({sort, rle, scan, size_t(1)});
}

cudaError_t launch_bilateral_grid(const uint8_t* rgb, const int64_t* pixel_start, const int64_t* widths,
                                  int64_t batch, int64_t pixels, GridLayout layout, int end_bit, void* temp,
                                  size_t temp_bytes, int64_t* keys, int32_t* ids, int64_t* sorted_keys,
                                  int32_t* sorted_ids, int64_t* unique_keys, int32_t* run_counts,
                                  int32_t* num_vertices, cudaStream_t stream) {
  if (pixels == 0) return cudaSuccess;
  auto* k = reinterpret_cast<Key*>(keys);
  auto* sk = reinterpret_cast<Key*>(sorted_keys);
  pixel_keys_kernel<<<blocks_for(pixels), kThreads, 0, stream>>>(rgb, pixel_start, widths, batch, pixels, layout, k,
                                                                 ids);
  cudaError_t err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, k, sk, ids, sorted_ids,
                                                    static_cast<int>(pixels), 0, end_bit, stream);
  if (err != cudaSuccess) return err;
  err = cub::DeviceRunLengthEncode::Encode(temp, temp_bytes, sk, reinterpret_cast<Key*>(unique_keys), run_counts,
                                           num_vertices, static_cast<int>(pixels), stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

cudaError_t launch_bilateral_vertices(int64_t num_vertices, int64_t pixels, int64_t batch, GridLayout layout,
                                      const int64_t* unique_keys, const int32_t* run_counts,
                                      const int32_t* sorted_ids, const float* target, const float* confidence,
                                      void* temp, size_t temp_bytes, int32_t* run_start, int32_t* vertex_of_pixel,
                                      double* m, double* w, double* b, int32_t* nbr, int64_t* vertex_start,
                                      cudaStream_t stream) {
  if (num_vertices == 0) return cudaSuccess;
  const auto* keys = reinterpret_cast<const Key*>(unique_keys);
  cudaError_t err = cub::DeviceScan::ExclusiveSum(temp, temp_bytes, run_counts, run_start,
                                                  static_cast<int>(num_vertices), stream);
  if (err != cudaSuccess) return err;
  splat_kernel<<<blocks_for(num_vertices), kThreads, 0, stream>>>(num_vertices, run_start, run_counts, sorted_ids,
                                                                  target, confidence, vertex_of_pixel, m, w, b);
  neighbours_kernel<<<blocks_for(num_vertices * kNeighbours), kThreads, 0, stream>>>(num_vertices, layout, keys, nbr);
  vertex_start_kernel<<<blocks_for(batch + 1), kThreads, 0, stream>>>(num_vertices, batch, layout, keys,
                                                                      vertex_start);
  return cudaGetLastError();
}

cudaError_t launch_bilateral_solve(int64_t num_vertices, int64_t batch, int64_t num_chunks,
                                   const int32_t* chunk_begin, const int32_t* chunk_end, const int32_t* chunk_image,
                                   const int32_t* image_chunks, const int32_t* nbr, double* m, const double* w,
                                   const double* b, double* n, double* scratch, double* y, double* r, double* z,
                                   double* p, double* q, double* np, double* inv_diag, double* partial, double* state,
                                   double lam, int64_t max_iter, double tol, cudaStream_t stream) {
  if (num_vertices == 0) return cudaSuccess;
  const int vblocks = blocks_for(num_vertices);
  fill_kernel<<<vblocks, kThreads, 0, stream>>>(n, 1.0, num_vertices);
  for (int it = 0; it < kBistochasticSteps; ++it) {
    bistochastic_kernel<<<vblocks, kThreads, 0, stream>>>(num_vertices, nbr, n, m, scratch, false);
    std::swap(n, scratch);
  }
  bistochastic_kernel<<<vblocks, kThreads, 0, stream>>>(num_vertices, nbr, n, m, nullptr, true);

  const Chunks chunks{chunk_begin, chunk_end, chunk_image};
  const int cblocks = static_cast<int>(num_chunks);
  const int iblocks = blocks_for(batch);
  cg_init_kernel<<<cblocks, kThreads, 0, stream>>>(chunks, m, n, w, b, lam, y, np, inv_diag, p, partial);
  cg_scalars_kernel<<<iblocks, kThreads, 0, stream>>>(batch, image_chunks, partial, state, tol, Phase::kInit, true);
  cg_residual_kernel<<<cblocks, kThreads, 0, stream>>>(chunks, nbr, m, n, w, b, y, np, lam, r);
  for (int64_t it = 0; it < max_iter; ++it) {
    const bool first = it == 0;
    cg_precondition_kernel<<<cblocks, kThreads, 0, stream>>>(chunks, r, inv_diag, z, partial);
    cg_scalars_kernel<<<iblocks, kThreads, 0, stream>>>(batch, image_chunks, partial, state, tol, Phase::kDirection,
                                                        first);
    cg_direction_kernel<<<cblocks, kThreads, 0, stream>>>(chunks, state, z, n, p, np, first);
    cg_apply_kernel<<<cblocks, kThreads, 0, stream>>>(chunks, nbr, m, n, w, p, np, lam, q, partial);
    cg_scalars_kernel<<<iblocks, kThreads, 0, stream>>>(batch, image_chunks, partial, state, tol, Phase::kStep, first);
    cg_step_kernel<<<cblocks, kThreads, 0, stream>>>(chunks, state, p, q, y, r);
  }
  return cudaGetLastError();
}

cudaError_t launch_bilateral_slice(const int32_t* vertex_of_pixel, const double* y, int64_t pixels, float* out,
                                   cudaStream_t stream) {
  if (pixels == 0) return cudaSuccess;
  slice_kernel<<<blocks_for(pixels), kThreads, 0, stream>>>(vertex_of_pixel, y, pixels, out);
  return cudaGetLastError();
}

}  // namespace namedmask
