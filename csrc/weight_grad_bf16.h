// The linear path's weight-gradient product for a bf16 head on AVX512-BF16 (csrc/weight_grad_bf16.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace sppo_fast {

// True in the AVX512 build on a CPU with AVX512-BF16.
bool weight_grad_bf16_supported();

// acc (V, H) fp32 contiguous += grad (n, V)^T hidden (n, H) (= instead when !accumulate), grad and hidden
// bf16 with unit column strides: the products exact, the sums in fp32.
void accumulate_weight_grad_bf16(at::Tensor& acc, const at::Tensor& grad, const at::Tensor& hidden,
                                 bool accumulate);

}  // namespace sppo_fast
