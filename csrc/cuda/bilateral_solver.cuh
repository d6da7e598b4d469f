#pragma once
// Torch-free launchers of the CUDA bilateral solver (raw pointers + a stream). The glue
// (bilateral_solver_glue.cpp) allocates and calls them in this order, reading two small
// results back to the host (the vertex count, the per-image vertex ranges) between phases:
//   1. launch_bilateral_grid      per-pixel keys, device radix sort, run-length encode
//   2. launch_bilateral_vertices  vertex of each pixel, splat (deterministic: one thread sums
//                                 its run of sorted pixels), neighbour lookup, image ranges
//   3. launch_bilateral_solve     bistochastization + per-image PCG, all iterations queued on
//                                 the stream with no host synchronisation; per-image scalars
//                                 (alpha, beta, convergence) live on the device
//   4. launch_bilateral_slice     output per pixel
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "namedmask/bilateral.h"

namespace namedmask {

// Vertex-space work is split into chunks of kBilateralChunk vertices that never straddle
// two images, so per-image dot products are two deterministic reductions (chunk, image).
constexpr int kBilateralChunk = 1024;

// Scratch bytes for the CUB sort / run-length encode / scan of up to `pixels` items.
size_t bilateral_temp_bytes(int64_t pixels, int end_bit);

cudaError_t launch_bilateral_grid(const uint8_t* rgb, const int64_t* pixel_start, const int64_t* widths,
                                  int64_t batch, int64_t pixels, bilateral::GridLayout layout, int end_bit,
                                  void* temp, size_t temp_bytes, int64_t* keys, int32_t* ids, int64_t* sorted_keys,
                                  int32_t* sorted_ids, int64_t* unique_keys, int32_t* run_counts,
                                  int32_t* num_vertices, cudaStream_t stream);

// vertex_start[batch + 1]: first vertex of each image (and the total), written on the device.
cudaError_t launch_bilateral_vertices(int64_t num_vertices, int64_t pixels, int64_t batch,
                                      bilateral::GridLayout layout, const int64_t* unique_keys,
                                      const int32_t* run_counts, const int32_t* sorted_ids, const float* target,
                                      const float* confidence, void* temp, size_t temp_bytes, int32_t* run_start,
                                      int32_t* vertex_of_pixel, double* m, double* w, double* b, int32_t* nbr,
                                      int64_t* vertex_start, cudaStream_t stream);

// chunk_begin/chunk_end/chunk_image [num_chunks]; image_chunks[batch + 1] (chunk range per image).
// state: 8 doubles per image of device scratch; partial: 2 doubles per chunk; vectors n..inv_diag
// (np = n * p, the blur's input)
// have num_vertices entries. On return y holds the solution.
cudaError_t launch_bilateral_solve(int64_t num_vertices, int64_t batch, int64_t num_chunks,
                                   const int32_t* chunk_begin, const int32_t* chunk_end,
                                   const int32_t* chunk_image, const int32_t* image_chunks, const int32_t* nbr,
                                   double* m, const double* w, const double* b, double* n, double* scratch, double* y,
                                   double* r, double* z, double* p, double* q, double* np, double* inv_diag,
                                   double* partial, double* state, double lam, int64_t max_iter, double tol,
                                   cudaStream_t stream);

cudaError_t launch_bilateral_slice(const int32_t* vertex_of_pixel, const double* y, int64_t pixels, float* out,
                                   cudaStream_t stream);

}  // namespace namedmask
