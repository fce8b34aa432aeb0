// Forward kernel: per row, lse, logp of the target and entropy in one read of the logits.
//
// Online softmax over chunks of the row: a chunk (a few KiB, so it stays in L1) is read once from
// memory for its maximum and once more from cache for exp(z - m), so every element costs one exp and
// the row is streamed from memory once. Running state per row: the max m, S = sum exp(z - m) and
// W = sum exp(z - m) (z - m); when m grows to m', S' = a S and W' = a (W + (m - m') S), a = e^(m - m').
// Entropy = lse - sum p z = log S - W / S, which has no cancellation between large terms.
#include "token_logprobs.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>

namespace sppo_fast {
namespace {

// Elements per chunk: 16 KiB of fp32, well inside L1d, a multiple of kBlock on every ISA.
constexpr int64_t kChunk = 4096;

struct RowStats {
  float max;   // m, the largest z of the row (-inf for an all -inf row, NaN if the row has a NaN)
  float sum;   // S
  float wsum;  // W (0 without entropy)
};

// Largest raw logit of x[0, len); NaN if any is NaN.
template <typename scalar_t>
float chunk_max(const scalar_t* x, int64_t len) {
  Vec mx(kNegInf);
  Vec lo, hi;
  int64_t j = 0;
  for (; j + kBlock <= len; j += kBlock) {
    load_block(x + j, lo, hi);
    mx = at::vec::maximum(mx, at::vec::maximum(lo, hi));
  }
  if (j < len) {
    load_tail(x + j, len - j, kNegInf, lo, hi);
    mx = at::vec::maximum(mx, at::vec::maximum(lo, hi));
  }
  return reduce_max(mx);
}

// Adds exp(z - m) and exp(z - m) (z - m) of one block to the accumulators.
template <bool kEntropy, bool kScaled>
inline void accumulate(Vec z, const Vec& m, const Vec& temperature, Vec& s, Vec& w) {
  if constexpr (kScaled) z = z / temperature;  // a division, as eager PyTorch does: same rounding
  const Vec d = z - m;
  const Vec e = exp_nonpositive(d);
  s = s + e;
  // Where e == 0 (d = -inf), the clamped d keeps 0 * d at 0 instead of NaN.
  if constexpr (kEntropy) w = at::vec::fmadd(e, at::vec::clamp_min(d, Vec(kExpLowest)), w);
}

// `next`: the row after this one (nullptr: none). While a chunk's exps run from L1, the next chunk (or
// the next row's first) is prefetched: otherwise memory idles during the exps and the max pass of the
// next chunk waits for it, so the two costs add up instead of overlapping.
template <typename scalar_t, bool kEntropy, bool kScaled>
RowStats row_stats(const scalar_t* x, int64_t V, float temperature, const scalar_t* next) {
  float m = kNegInf;
  Vec s0(0.0f), s1(0.0f), w0(0.0f), w1(0.0f);
  const Vec tv(temperature);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t len = std::min(kChunk, V - c0);
    const scalar_t* xc = x + c0;
    const scalar_t* ahead = c0 + kChunk < V ? xc + kChunk : next;
    float cm = chunk_max(xc, len);
    if (std::isnan(cm)) return {cm, cm, cm};
    if (cm == kNegInf) continue;  // the whole chunk has p = 0
    if constexpr (kScaled) cm = cm / temperature;  // division is monotone: max(x)/T == max(x/T)
    if (cm > m) {
      if (m != kNegInf) {  // rescale what earlier chunks accumulated to the new max
        const float a = std::exp(m - cm);
        const Vec av(a), dm(m - cm);
        if constexpr (kEntropy) {
          w0 = av * at::vec::fmadd(dm, s0, w0);
          w1 = av * at::vec::fmadd(dm, s1, w1);
        }
        s0 = s0 * av;
        s1 = s1 * av;
      }
      m = cm;
    }
    const Vec mv(m);
    Vec lo, hi;
    int64_t j = 0;
    for (; j + kBlock <= len; j += kBlock) {
      if (ahead) prefetch_block(ahead + j);
      load_block(xc + j, lo, hi);
      accumulate<kEntropy, kScaled>(lo, mv, tv, s0, w0);
      accumulate<kEntropy, kScaled>(hi, mv, tv, s1, w1);
    }
    if (j < len) {  // padding with -inf adds exactly 0 to both sums
      load_tail(xc + j, len - j, kNegInf, lo, hi);
      accumulate<kEntropy, kScaled>(lo, mv, tv, s0, w0);
      accumulate<kEntropy, kScaled>(hi, mv, tv, s1, w1);
    }
  }
  return {m, reduce_sum(s0 + s1), kEntropy ? reduce_sum(w0 + w1) : 0.0f};
}

template <typename scalar_t, bool kEntropy, bool kScaled, typename lse_t>
void forward_rows(const scalar_t* logits, int64_t row_stride, int64_t V, const int64_t* targets,
                  float temperature, int64_t ignore_index, float* logp, float* entropy, lse_t* lse,
                  int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = targets[i];
    if (t == ignore_index) {
      logp[i] = entropy[i] = 0.0f;
      lse[i] = 0;
      continue;
    }
    const scalar_t* x = logits + i * row_stride;
    const RowStats st = row_stats<scalar_t, kEntropy, kScaled>(x, V, temperature,
                                                               i + 1 < end ? x + row_stride : nullptr);
    const float log_sum = std::log(st.sum);
    // A target outside [0, V) lies in another rank's vocabulary shard: x[t] is not ours to read and
    // the row's logp is 0 here (the owning rank supplies it); lse and entropy are computed as usual.
    const bool local = t >= 0 && t < V;
    float zt = local ? static_cast<float>(x[t]) : 0.0f;
    if constexpr (kScaled) zt = zt / temperature;
    // m + log S in double, then rounded once to lse_t: an fp64 lse keeps the backward exact to fp32
    // rounding however large the logits (an fp32 lse of ~1e4 is off by up to 5e-4).
    lse[i] = static_cast<lse_t>(static_cast<double>(st.max) + std::log(static_cast<double>(st.sum)));
    // (z_t - m) - log S, not z_t - lse: no rounding of a large lse when |logits| ~ 1e4.
    logp[i] = local ? (zt - st.max) - log_sum : 0.0f;
    entropy[i] = kEntropy ? log_sum - st.wsum / st.sum : 0.0f;
  }
}

template <typename scalar_t>
void forward_dispatch(const at::Tensor& logits, const at::Tensor& targets, float temperature,
                      int64_t ignore_index, bool compute_entropy, at::Tensor& logp,
                      at::Tensor& entropy, at::Tensor& lse) {
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* t = targets.const_data_ptr<int64_t>();
  float* lp = logp.mutable_data_ptr<float>();
  float* en = entropy.mutable_data_ptr<float>();
  const bool scaled = temperature != 1.0f, lse_fp64 = lse.scalar_type() == at::kDouble;
  parallel_rows(N, V, [&](int64_t begin, int64_t end) {
    auto run = [&](auto entropy_tag, auto scaled_tag) {
      constexpr bool kEntropy = decltype(entropy_tag)::value, kScaled = decltype(scaled_tag)::value;
      if (lse_fp64) {
        forward_rows<scalar_t, kEntropy, kScaled>(x, stride, V, t, temperature, ignore_index, lp, en,
                                                  lse.mutable_data_ptr<double>(), begin, end);
      } else {
        forward_rows<scalar_t, kEntropy, kScaled>(x, stride, V, t, temperature, ignore_index, lp, en,
                                                  lse.mutable_data_ptr<float>(), begin, end);
      }
    };
    using T_ = std::true_type;
    using F_ = std::false_type;
    if (compute_entropy) {
      scaled ? run(T_{}, T_{}) : run(T_{}, F_{});
    } else {
      scaled ? run(F_{}, T_{}) : run(F_{}, F_{});
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index,
    bool compute_entropy, bool lse_fp64) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (N, V) with unit stride");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64");
  const auto targets_c = targets.contiguous();
  const int64_t N = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts);
  at::Tensor lse = at::empty({N}, opts.dtype(lse_fp64 ? at::kDouble : at::kFloat));
  if (N == 0) return {logp, entropy, lse};
  SPPO_DISPATCH_LOGITS(logits.scalar_type(), "token_logprobs_forward", [&] {
    forward_dispatch<scalar_t>(logits, targets_c, static_cast<float>(temperature), ignore_index,
                               compute_entropy, logp, entropy, lse);
  });
  return {logp, entropy, lse};
}

}  // namespace sppo_fast
