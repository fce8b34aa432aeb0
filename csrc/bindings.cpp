// Python bindings of the two CPU kernels. setup.py builds this module once per ISA (sppo_fast._C,
// sppo_fast._C_avx2, sppo_fast._C_avx512); sppo_fast/backends/native.py imports the best one.
#include "buffer_pool.h"
#include "token_logprobs.h"
#include "weight_grad_bf16.h"

#include <torch/csrc/utils/pybind.h>

#define SPPO_STRINGIFY_(x) #x
#define SPPO_STRINGIFY(x) SPPO_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sppo-fast native CPU kernels: token log-probs and entropy, forward and backward; a bf16 head's weight-gradient product";
  m.def("token_logprobs_forward", &sppo_fast::token_logprobs_forward, pybind11::arg("logits"),
        pybind11::arg("targets"), pybind11::arg("temperature"), pybind11::arg("ignore_index"),
        pybind11::arg("compute_entropy"), pybind11::arg("lse_fp64") = false,
        "(logits (N, V), targets (N,), temperature, ignore_index, compute_entropy, lse_fp64) -> "
        "(logp, entropy, lse), (N,) each: fp32, fp32, fp32 or fp64");
  m.def("token_logprobs_forward_basis", &sppo_fast::token_logprobs_forward_basis, pybind11::arg("logits"),
        pybind11::arg("targets"), pybind11::arg("temperature"), pybind11::arg("ignore_index"),
        pybind11::arg("compute_entropy"),
        "(logits (N, V), targets (N,), temperature, ignore_index, compute_entropy) -> (logp, entropy, lse "
        "fp64, basis (N, V) = d logp / d logits in the logits' dtype)");
  m.def("token_logprobs_backward", &sppo_fast::token_logprobs_backward, pybind11::arg("logits"),
        pybind11::arg("targets"), pybind11::arg("lse"), pybind11::arg("entropy"),
        pybind11::arg("grad_logp"), pybind11::arg("grad_entropy"), pybind11::arg("temperature"),
        pybind11::arg("ignore_index"), pybind11::arg("inplace"),
        "the gradient of the logits (N, V) from per-row grad_logp and grad_entropy");
  m.def("token_logprobs_backward_from_basis_", &sppo_fast::token_logprobs_backward_from_basis_,
        pybind11::arg("basis"), pybind11::arg("grad_logp"),
        "the one-pass backward, in place: basis (N, V) *= grad_logp (N,) row by row, in fp32, rounded once");
  m.def("weight_grad_bf16_supported", &sppo_fast::weight_grad_bf16_supported,
        "whether accumulate_weight_grad_bf16 runs here (the AVX512 build on a CPU with AVX512-BF16)");
  m.def("accumulate_weight_grad_bf16", &sppo_fast::accumulate_weight_grad_bf16, pybind11::arg("acc"),
        pybind11::arg("grad"), pybind11::arg("hidden"), pybind11::arg("accumulate"),
        "acc (V, H) fp32 += grad (n, V)^T hidden (n, H), both bf16 (= when accumulate is False)");
  m.def("pool_cached_bytes", &sppo_fast::pool_cached_bytes,
        "bytes held by freed gradient buffers waiting for reuse (csrc/buffer_pool.cpp)");
  m.def("pool_release", &sppo_fast::pool_release,
        "frees the gradient buffers waiting for reuse; returns the bytes freed");
  // The ATen CPU_CAPABILITY this module was compiled for: DEFAULT, AVX2 or AVX512.
  m.attr("CPU_CAPABILITY") = SPPO_STRINGIFY(CPU_CAPABILITY);
}
