// CUDA copy-paste: fg_boxes is one block per sample reducing its box in shared memory;
// copy_paste is one fused grid-stride kernel over every output pixel of the batch, each
// thread resolving its source with winning_placement (namedmask/copy_paste.h) and then
// gathering the label and all channels from it.
#include <algorithm>

#include "copy_paste.cuh"
#include "namedmask/copy_paste.h"

namespace namedmask {
namespace {

constexpr int kBoxThreads = 1024;
constexpr int kThreads = 256;

template <typename L>
__global__ void fg_boxes_kernel(const L* __restrict__ labels, int64_t height, int64_t width, int64_t background,
                                int64_t ignore_index, int64_t* __restrict__ boxes) {
  __shared__ int y0, x0, y1, x1;  // H, W < 2^31 (checked by the glue)
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) {
    const Box e = empty_box(height, width);
    y0 = static_cast<int>(e.y0), x0 = static_cast<int>(e.x0), y1 = -1, x1 = -1;
  }
  __syncthreads();
  const L* sample = labels + b * height * width;
  Box local = empty_box(height, width);
  for (int64_t i = threadIdx.x; i < height * width; i += blockDim.x) {
    if (!is_foreground(sample[i], background, ignore_index)) continue;
    const int64_t y = i / width, x = i - y * width;
    local = merge(local, Box{y, x, y, x});
  }
  if (local.y1 >= 0) {
    atomicMin(&y0, static_cast<int>(local.y0));
    atomicMin(&x0, static_cast<int>(local.x0));
    atomicMax(&y1, static_cast<int>(local.y1));
    atomicMax(&x1, static_cast<int>(local.x1));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const Box box = finish_box(Box{y0, x0, y1, x1});
    boxes[4 * b + 0] = box.y0;
    boxes[4 * b + 1] = box.x0;
    boxes[4 * b + 2] = box.y1;
    boxes[4 * b + 3] = box.x1;
  }
}

template <typename I, typename L>
__global__ void copy_paste_kernel(const I* __restrict__ images, const L* __restrict__ labels,
                                  const int64_t* __restrict__ boxes, const int64_t* __restrict__ sources,
                                  const int64_t* __restrict__ offsets, int64_t batch, int64_t channels,
                                  int64_t height, int64_t width, int64_t num_pastes, int64_t background,
                                  int64_t ignore_index, I* __restrict__ out_images, L* __restrict__ out_labels) {
  const int64_t plane = height * width;
  const int64_t n = batch * plane;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t b = i / plane, pixel = i - b * plane;
    const int64_t y = pixel / width, x = pixel - y * width;
    const Placement pl = winning_placement(sources + b * num_pastes, offsets + 2 * b * num_pastes, num_pastes, boxes,
                                           labels, batch, height, width, y, x, background, ignore_index);
    const int64_t from = pl.source < 0 ? b : pl.source;
    const int64_t from_pixel = pl.source < 0 ? pixel : source_pixel(pl, y, x, width);
    out_labels[i] = labels[from * plane + from_pixel];
    for (int64_t c = 0; c < channels; ++c)
      out_images[(b * channels + c) * plane + pixel] = images[(from * channels + c) * plane + from_pixel];
  }
}

int grid_size(int64_t work, int threads) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, int64_t(sms) * 16)));
}

}  // namespace

template <typename L>
cudaError_t launch_fg_boxes(const L* labels, int64_t batch, int64_t height, int64_t width, int64_t background,
                            int64_t ignore_index, int64_t* boxes, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  fg_boxes_kernel<L><<<static_cast<unsigned>(batch), kBoxThreads, 0, stream>>>(labels, height, width, background,
                                                                             ignore_index, boxes);
  return cudaGetLastError();
}

template <typename I, typename L>
cudaError_t launch_copy_paste(const I* images, const L* labels, const int64_t* boxes, const int64_t* sources,
                              const int64_t* offsets, int64_t batch, int64_t channels, int64_t height,
                              int64_t width, int64_t num_pastes, int64_t background, int64_t ignore_index,
                              I* out_images, L* out_labels, cudaStream_t stream) {
  const int64_t n = batch * height * width;
  if (n == 0) return cudaSuccess;
  copy_paste_kernel<I, L><<<grid_size(n, kThreads), kThreads, 0, stream>>>(
      images, labels, boxes, sources, offsets, batch, channels, height, width, num_pastes, background, ignore_index,
      out_images, out_labels);
  return cudaGetLastError();
}

#define NM_INSTANTIATE_BOXES(L)                                                                              \
  template cudaError_t launch_fg_boxes<L>(const L*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t*, \
                                          cudaStream_t);
#define NM_INSTANTIATE(I, L)                                                                                       \
  template cudaError_t launch_copy_paste<I, L>(const I*, const L*, const int64_t*, const int64_t*, const int64_t*, \
                                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, I*, L*, \
                                               cudaStream_t);
#define NM_INSTANTIATE_L(L) \
  NM_INSTANTIATE_BOXES(L)   \
  NM_INSTANTIATE(uint8_t, L) NM_INSTANTIATE(uint16_t, L) NM_INSTANTIATE(uint32_t, L) NM_INSTANTIATE(uint64_t, L)
NM_INSTANTIATE_L(uint8_t)
NM_INSTANTIATE_L(int32_t)
NM_INSTANTIATE_L(int64_t)

}  // namespace namedmask
