// CUDA confusion histogram: each block counts into a private shared-memory histogram and
// flushes it to global memory once; class counts too large for shared memory fall back
// to global atomics. Grid-stride loop, so one launch covers any batch.
#include <algorithm>

#include "confusion_matrix.cuh"
#include "namedmask/confusion_matrix.h"

namespace namedmask {
namespace {

constexpr int kThreads = 512;

template <typename P, typename T>
__global__ void confusion_shared_kernel(const P* __restrict__ pred, const T* __restrict__ target, int64_t n,
                                        int64_t num_classes, int64_t ignore_index,
                                        unsigned long long* __restrict__ out) {
  extern __shared__ unsigned int hist[];
  const int64_t bins = num_classes * (num_classes + 1);
  for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t b = confusion_bin(pred[i], target[i], num_classes, ignore_index);
    if (b >= 0) atomicAdd(&hist[b], 1u);
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < bins; b += blockDim.x)
    if (hist[b]) atomicAdd(&out[b], static_cast<unsigned long long>(hist[b]));
}

template <typename P, typename T>
__global__ void confusion_global_kernel(const P* __restrict__ pred, const T* __restrict__ target, int64_t n,
                                        int64_t num_classes, int64_t ignore_index,
                                        unsigned long long* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t b = confusion_bin(pred[i], target[i], num_classes, ignore_index);
    if (b >= 0) atomicAdd(&out[b], 1ull);
  }
}

}  // namespace

template <typename P, typename T>
cudaError_t launch_confusion_matrix(const P* pred, const T* target, int64_t n, int64_t num_classes,
                                    int64_t ignore_index, int64_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int device = 0, sms = 0, smem_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  // A few blocks per SM: enough to hide latency, few enough that the flush stays cheap.
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * 4)));
  auto* counts = reinterpret_cast<unsigned long long*>(out);
  const size_t smem = static_cast<size_t>(num_classes * (num_classes + 1)) * sizeof(unsigned int);
  if (smem <= static_cast<size_t>(smem_optin)) {
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(confusion_shared_kernel<P, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
    confusion_shared_kernel<P, T><<<blocks, kThreads, smem, stream>>>(pred, target, n, num_classes, ignore_index,
                                                                        counts);
  } else {
    confusion_global_kernel<P, T><<<blocks * 4, kThreads, 0, stream>>>(pred, target, n, num_classes, ignore_index,
                                                                      counts);
  }
  return cudaGetLastError();
}

#define NM_INSTANTIATE(P, T)                                                                          \
  template cudaError_t launch_confusion_matrix<P, T>(const P*, const T*, int64_t, int64_t, int64_t, int64_t*, \
                                                     cudaStream_t);
#define NM_INSTANTIATE_T(P) NM_INSTANTIATE(P, uint8_t) NM_INSTANTIATE(P, int32_t) NM_INSTANTIATE(P, int64_t)
NM_INSTANTIATE_T(uint8_t)
NM_INSTANTIATE_T(int32_t)
NM_INSTANTIATE_T(int64_t)

}  // namespace namedmask
