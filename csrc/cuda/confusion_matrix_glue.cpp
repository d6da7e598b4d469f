// Torch glue of the CUDA confusion histogram: checks, allocation, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "confusion_matrix.cuh"
#include "namedmask/dispatch.h"

namespace namedmask {
namespace {

at::Tensor confusion_matrix_cuda(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes,
                                 int64_t ignore_index) {
  TORCH_CHECK(pred.sizes() == target.sizes(), "confusion_matrix: pred and target shapes differ");
  TORCH_CHECK(pred.device() == target.device(), "confusion_matrix: pred and target on different devices");
  TORCH_CHECK(num_classes > 0, "confusion_matrix: num_classes must be positive");
  c10::cuda::CUDAGuard guard(pred.device());
  auto out = at::zeros({num_classes, num_classes + 1}, pred.options().dtype(at::kLong));
  const auto p = pred.contiguous();
  const auto t = target.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_label_type(p.scalar_type(), "confusion_matrix: pred", [&](auto pred_type) {
    dispatch_label_type(t.scalar_type(), "confusion_matrix: target", [&](auto target_type) {
      C10_CUDA_CHECK(launch_confusion_matrix(p.data_ptr<decltype(pred_type)>(), t.data_ptr<decltype(target_type)>(),
                                             p.numel(), num_classes, ignore_index, out.data_ptr<int64_t>(), stream));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CUDA, m) { m.impl("confusion_matrix", &confusion_matrix_cuda); }

}  // namespace namedmask
