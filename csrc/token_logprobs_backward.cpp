// Backward kernel: the gradient of the logits from per-row coefficients, one read and one write. Also the
// one-pass backward, which scales the rows of the forward's basis (d logp / d logits) by g_logp.
//
// With u_j = z_j - lse and p_j = exp(u_j), docs/api.md §3.1 gives
//   grad_j = (g_logp (1[j = t] - p_j) - g_H p_j (u_j + H)) / T = -p_j (a + b u_j) + 1[j = t] g_logp / T
// with the per-row a = (g_logp + g_H H) / T and b = g_H / T. The target element is redone in scalar
// code after the vector sweep, so the row is swept once whatever the target. A target outside [0, V)
// (in another vocabulary shard) has no one-hot term: the sweep's -p_j (a + b u_j) is the gradient.
#include "token_logprobs.h"
#include "vec_math.h"

#include "buffer_pool.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace sppo_fast {
namespace {

struct RowCoefficients {
  float lse_hi, lse_lo;  // lse = hi + lo: lo is 0 for an fp32 lse, the rest of an fp64 one
  float entropy, grad_logp, grad_entropy, temperature;
};

// grad_j for one block of logits (fp32 vectors), into lo/hi.
template <bool kEntropy, bool kScaled>
inline Vec grad_block(Vec z, const Vec& lse_hi, const Vec& lse_lo, const Vec& temperature,
                      const Vec& neg_a, const Vec& neg_b) {
  if constexpr (kScaled) z = z / temperature;
  const Vec u = (z - lse_hi) - lse_lo;
  const Vec p = exp_nonpositive(u);
  if constexpr (kEntropy) {
    // p == 0 where u < kExpLowest (-inf included): the clamp keeps 0 * u at 0 instead of NaN.
    return p * at::vec::fmadd(neg_b, at::vec::clamp_min(u, Vec(kExpLowest)), neg_a);
  } else {
    return p * neg_a;
  }
}

// The exact gradient of the target element, in scalar code.
template <bool kEntropy, bool kScaled>
float target_grad(float zt, const RowCoefficients& c) {
  if constexpr (kScaled) zt = zt / c.temperature;
  const float u = (zt - c.lse_hi) - c.lse_lo;
  const float p = u < kExpLowest ? 0.0f : std::exp(u);
  float g = c.grad_logp * (1.0f - p);
  if (kEntropy && p != 0.0f) g -= c.grad_entropy * p * (u + c.entropy);
  return g / c.temperature;
}

// fp32 gradients larger than this are written with non-temporal stores (when not in place): far beyond
// any cache, so nothing is lost by not caching them, and the write-allocate's read of each line is saved.
// The backward alone, fp32 2048 x 32000 out of place, old and new builds alternated: faster in 5 of 6
// pairs on the 2-core AMD EPYC with AVX-512 (medians 8.7-12.7 ms against 10.3-17.4), and in 5 of 6 on the
// 2-core Zen 3 EPYC with AVX2 (17.8-21.0 ms against 18.1-23.7, about the time of one read and one write
// at its 27 GB/s). Not for 2-byte logits: their sweep is bound by its exps, and bf16 2048 x 151936 was
// slower in 4 of 6 pairs (AVX-512).
constexpr int64_t kStreamBytes = int64_t{64} << 20;

template <typename scalar_t, bool kEntropy, bool kScaled>
void grad_row(const scalar_t* x, scalar_t* out, int64_t V, int64_t t, const RowCoefficients& c, bool stream) {
  // A target outside [0, V) lies in another rank's vocabulary shard: no one-hot term here, and x[t],
  // out[t] are out of bounds; the sweep alone is then the whole gradient.
  const bool local = t >= 0 && t < V;
  // read before an in-place sweep overwrites it
  const float zt = local ? static_cast<float>(x[t]) : 0.0f;
  const float a = kEntropy ? (c.grad_logp + c.grad_entropy * c.entropy) / c.temperature
                           : c.grad_logp / c.temperature;
  const Vec neg_a(-a), neg_b(kEntropy ? -c.grad_entropy / c.temperature : 0.0f);
  const Vec lse_hi(c.lse_hi), lse_lo(c.lse_lo), tv(c.temperature);
  Vec lo, hi;
  int64_t j = 0;
  // non-temporal stores need 64-byte alignment: rows that start elsewhere take plain ones
  stream = stream && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  for (; j + kBlock <= V; j += kBlock) {
    load_block(x + j, lo, hi);
    const Vec g_lo = grad_block<kEntropy, kScaled>(lo, lse_hi, lse_lo, tv, neg_a, neg_b);
    const Vec g_hi = grad_block<kEntropy, kScaled>(hi, lse_hi, lse_lo, tv, neg_a, neg_b);
    if (stream) {
      stream_block(out + j, g_lo, g_hi);
    } else {
      store_block(out + j, g_lo, g_hi);
    }
  }
  if (j < V) {
    load_tail(x + j, V - j, kNegInf, lo, hi);
    store_block(out + j, grad_block<kEntropy, kScaled>(lo, lse_hi, lse_lo, tv, neg_a, neg_b),
                grad_block<kEntropy, kScaled>(hi, lse_hi, lse_lo, tv, neg_a, neg_b), V - j);
  }
  if (local) out[t] = static_cast<scalar_t>(target_grad<kEntropy, kScaled>(zt, c));
}

struct BackwardArgs {
  int64_t N, V, in_stride, out_stride, ignore_index;
  bool stream;  // non-temporal stores (see kStreamBytes)
  const int64_t* targets;
  const float* lse32;  // exactly one of lse32 / lse64 is set
  const double* lse64;
  const float *entropy, *grad_logp, *grad_entropy;  // grad_entropy null: no entropy term
  float temperature;
};

template <typename scalar_t, bool kEntropy, bool kScaled>
void backward_rows(const scalar_t* x, scalar_t* out, const BackwardArgs& args, int64_t begin,
                   int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* out_row = out + i * args.out_stride;
    const int64_t t = args.targets[i];
    if (t == args.ignore_index) {
      fill_row(out_row, args.V, 0.0f);
      continue;
    }
    const double lse = args.lse64 ? args.lse64[i] : static_cast<double>(args.lse32[i]);
    const float lse_hi = static_cast<float>(lse);
    const float lse_lo = std::isfinite(lse) ? static_cast<float>(lse - lse_hi) : 0.0f;
    const RowCoefficients c{lse_hi, lse_lo,
                            kEntropy ? args.entropy[i] : 0.0f, args.grad_logp[i],
                            kEntropy ? args.grad_entropy[i] : 0.0f, args.temperature};
    grad_row<scalar_t, kEntropy, kScaled>(x + i * args.in_stride, out_row, args.V, t, c, args.stream);
  }
}

template <typename scalar_t>
void backward_dispatch(const scalar_t* x, scalar_t* out, const BackwardArgs& args) {
  const bool entropy = args.grad_entropy != nullptr, scaled = args.temperature != 1.0f;
  parallel_rows(args.N, args.V, [&](int64_t begin, int64_t end) {
    auto run = [&](auto entropy_tag, auto scaled_tag) {
      backward_rows<scalar_t, decltype(entropy_tag)::value, decltype(scaled_tag)::value>(
          x, out, args, begin, end);
    };
    dispatch_flags(entropy, scaled, run);
    if (args.stream) stream_fence();
  });
}

template <typename scalar_t>
void scale_rows(scalar_t* x, int64_t V, float scale) {
  const Vec s(scale);
  Vec lo, hi;
  int64_t j = 0;
  for (; j + kBlock <= V; j += kBlock) {
    load_block(x + j, lo, hi);
    store_block(x + j, lo * s, hi * s);
  }
  if (j < V) {
    load_tail(x + j, V - j, 0.0f, lo, hi);
    store_block(x + j, lo * s, hi * s, V - j);
  }
}

}  // namespace

at::Tensor token_logprobs_backward_from_basis_(at::Tensor& basis, const at::Tensor& grad_logp) {
  TORCH_CHECK(basis.dim() == 2 && basis.is_contiguous(), "basis must be a contiguous (N, V) tensor");
  const int64_t N = basis.size(0), V = basis.size(1);
  if (N == 0 || V == 0) return basis;
  const auto g = grad_logp.to(at::kFloat).contiguous();
  const float* scale = g.const_data_ptr<float>();
  SPPO_DISPATCH_LOGITS(basis.scalar_type(), "token_logprobs_backward_from_basis_", [&] {
    scalar_t* x = basis.mutable_data_ptr<scalar_t>();
    parallel_rows(N, V, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) scale_rows(x + i * V, V, scale[i]);
    });
  });
  return basis;
}

at::Tensor token_logprobs_backward(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, const at::Tensor& grad_logp,
    const std::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index,
    bool inplace) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (N, V) with unit stride");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64");
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor out = inplace ? logits : empty_pooled({N, V}, logits.options());
  if (N == 0 || V == 0) return out;
  const auto targets_c = targets.contiguous();
  const bool lse_fp64 = lse.scalar_type() == at::kDouble;
  const auto lse_c = lse_fp64 ? lse.contiguous() : lse.to(at::kFloat).contiguous();
  const auto grad_logp_c = grad_logp.to(at::kFloat).contiguous();
  at::Tensor entropy_c, grad_entropy_c;
  if (grad_entropy.has_value()) {
    entropy_c = entropy.to(at::kFloat).contiguous();
    grad_entropy_c = grad_entropy->to(at::kFloat).contiguous();
  }
  const bool stream = !inplace && logits.scalar_type() == at::kFloat && N * V * 4 > kStreamBytes;
  BackwardArgs args{N,
                    V,
                    logits.stride(0),
                    out.stride(0),
                    ignore_index,
                    stream,
                    targets_c.const_data_ptr<int64_t>(),
                    lse_fp64 ? nullptr : lse_c.const_data_ptr<float>(),
                    lse_fp64 ? lse_c.const_data_ptr<double>() : nullptr,
                    grad_entropy.has_value() ? entropy_c.const_data_ptr<float>() : nullptr,
                    grad_logp_c.const_data_ptr<float>(),
                    grad_entropy.has_value() ? grad_entropy_c.const_data_ptr<float>() : nullptr,
                    static_cast<float>(temperature)};
  SPPO_DISPATCH_LOGITS(logits.scalar_type(), "token_logprobs_backward", [&] {
    backward_dispatch<scalar_t>(logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                args);
  });
  return out;
}

}  // namespace sppo_fast
