#pragma once
// Torch-free launchers of the CUDA copy-paste kernels (raw pointers + a stream).
// All arrays are contiguous; labels [batch, height, width], images [batch, channels, height, width]
// moved as opaque elements of type I (an unsigned integer as wide as the image dtype).
#include <cuda_runtime_api.h>

#include <cstdint>

namespace namedmask {

// boxes: int64 [batch, 4] (y0, x0, y1, x1), (-1, -1, -1, -1) for no foreground.
template <typename L>
cudaError_t launch_fg_boxes(const L* labels, int64_t batch, int64_t height, int64_t width, int64_t background,
                            int64_t ignore_index, int64_t* boxes, cudaStream_t stream);

// One fused kernel for the whole batch: every output pixel and label, pasted or not.
template <typename I, typename L>
cudaError_t launch_copy_paste(const I* images, const L* labels, const int64_t* boxes, const int64_t* sources,
                              const int64_t* offsets, int64_t batch, int64_t channels, int64_t height,
                              int64_t width, int64_t num_pastes, int64_t background, int64_t ignore_index,
                              I* out_images, L* out_labels, cudaStream_t stream);

}  // namespace namedmask
