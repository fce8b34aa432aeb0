// The two vocabulary-sized CPU kernels of docs/api.md §9 (interface in sppo_fast/backends/__init__.py).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>
#include <type_traits>

// Logits come as fp32, bf16 or fp16; the kernels accumulate in fp32 for all three.
#define SPPO_DISPATCH_LOGITS(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace sppo_fast {

// Per row of logits (N, V): (logp, entropy, lse), (N,) tensors, in one read of the row; logp and
// entropy are fp32, lse fp32 (the backend interface) or fp64 (exact for any magnitude of logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index,
    bool compute_entropy, bool lse_fp64);

// The forward, and the row's d logp / d logits = (1[j = t] - p_j) / T written into a new (N, V) tensor
// of the logits' dtype (the basis; 0 on ignored rows): (logp, entropy, lse fp64, basis). For a loss
// whose gradient reaches the logits through logp alone, the logits' gradient is then g_logp * basis.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_basis(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index,
    bool compute_entropy);

// The gradient of the logits from per-row coefficients, in one read and one write of the logits;
// lse may be fp32 or fp64.
at::Tensor token_logprobs_backward(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, const at::Tensor& grad_logp,
    const std::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index,
    bool inplace);

// The one-pass backward: basis (N, V) from token_logprobs_forward_basis times grad_logp (N,) row by row, in
// place, each product taken in fp32 and rounded once: one read and one write, no exp.
at::Tensor token_logprobs_backward_from_basis_(at::Tensor& basis, const at::Tensor& grad_logp);

// Calls run(std::bool_constant<entropy>{}, std::bool_constant<scaled>{}): the kernels' two compile-time
// switches (an entropy term; a temperature other than 1) from their runtime values.
template <typename F>
void dispatch_flags(bool entropy, bool scaled, const F& run) {
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (entropy) {
    scaled ? run(T_{}, T_{}) : run(T_{}, F_{});
  } else {
    scaled ? run(F_{}, T_{}) : run(F_{}, F_{});
  }
}

// Calls rows(begin, end) over [0, N) on all of ATen's threads. Threads take small blocks of rows
// (about 256k elements) from a shared counter instead of one fixed share each: on a machine with
// other work a descheduled thread then delays the pass by one block, not by half of it.
template <typename F>
void parallel_rows(int64_t N, int64_t V, const F& rows) {
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(V, 1));
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (N + block - 1) / block);
  if (tasks <= 1) {
    rows(0, N);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(block); begin < N; begin = next.fetch_add(block)) {
      rows(begin, std::min(N, begin + block));
    }
  });
}

}  // namespace sppo_fast
