#pragma once
// Torch-free launcher of the CUDA confusion histogram (raw pointers + a stream).
#include <cuda_runtime_api.h>

#include <cstdint>

namespace namedmask {

// Adds the histogram of n (pred, target) pairs into out[num_classes * (num_classes + 1)]
// (int64 counts, zero-initialised by the caller). One launch for the whole batch.
template <typename P, typename T>
cudaError_t launch_confusion_matrix(const P* pred, const T* target, int64_t n, int64_t num_classes,
                                    int64_t ignore_index, int64_t* out, cudaStream_t stream);

}  // namespace namedmask
