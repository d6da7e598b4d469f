// Torch glue of the CUDA copy-paste kernels: checks, allocation, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "copy_paste.cuh"
#include "namedmask/copy_paste_args.h"
#include "namedmask/dispatch.h"

namespace namedmask {
namespace {

at::Tensor fg_boxes_cuda(const at::Tensor& labels_in, int64_t background, int64_t ignore_index) {
  check_fg_boxes_args(labels_in);
  c10::cuda::CUDAGuard guard(labels_in.device());
  const auto labels = labels_in.contiguous();
  auto out = at::empty({labels.size(0), 4}, labels.options().dtype(at::kLong));
  dispatch_label_type(labels.scalar_type(), "fg_boxes: labels", [&](auto label_type) {
    using L = decltype(label_type);
    C10_CUDA_CHECK(launch_fg_boxes(labels.const_data_ptr<L>(), labels.size(0), labels.size(1), labels.size(2),
                                   background, ignore_index, out.mutable_data_ptr<int64_t>(),
                                   c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> copy_paste_cuda(const at::Tensor& images_in, const at::Tensor& labels_in,
                                                   const at::Tensor& boxes_in, const at::Tensor& sources_in,
                                                   const at::Tensor& offsets_in, int64_t background,
                                                   int64_t ignore_index) {
  check_copy_paste_args(images_in, labels_in, boxes_in, sources_in, offsets_in);
  c10::cuda::CUDAGuard guard(images_in.device());
  const auto images = images_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto boxes = boxes_in.contiguous();
  const auto sources = sources_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  auto out_images = at::empty_like(images);
  auto out_labels = at::empty_like(labels);
  dispatch_copy_paste_types(images, labels, [&](auto pixel_bits, auto label_type) {
    using I = decltype(pixel_bits);
    using L = decltype(label_type);
    C10_CUDA_CHECK(launch_copy_paste(
        static_cast<const I*>(images.const_data_ptr()), labels.const_data_ptr<L>(), boxes.const_data_ptr<int64_t>(),
        sources.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), images.size(0), images.size(1),
        images.size(2), images.size(3), sources.size(1), background, ignore_index,
        static_cast<I*>(out_images.mutable_data_ptr()), out_labels.mutable_data_ptr<L>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  return {out_images, out_labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CUDA, m) {
  m.impl("fg_boxes", &fg_boxes_cuda);
  m.impl("copy_paste", &copy_paste_cuda);
}

}  // namespace namedmask
