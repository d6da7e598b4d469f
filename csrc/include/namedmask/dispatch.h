#pragma once
// Torch-side helpers for the op glue files (.cpp only; .cu files stay torch-free).
#include <ATen/ATen.h>

#include <cstdint>

namespace namedmask {

// Calls f(T{}) with T the C++ type of an integer label tensor (uint8, int32 or int64).
template <typename F>
void dispatch_label_type(at::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case at::kByte: f(uint8_t{}); break;
    case at::kInt: f(int32_t{}); break;
    case at::kLong: f(int64_t{}); break;
    default: TORCH_CHECK(false, what, " must be uint8, int32 or int64, got ", type);
  }
}

}  // namespace namedmask

namespace namedmask {

// Calls f(T{}) with T an unsigned integer type as wide as one element of `type`: kernels
// that only move elements (never compute with them) copy any dtype bit-exactly this way.
template <typename F>
void dispatch_element_bits(at::ScalarType type, const char* what, F&& f) {
  switch (c10::elementSize(type)) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", type);
  }
}

}  // namespace namedmask
