// Forward kernel: per row, lse, logp of the target and entropy in one read of the logits.
//
// Online softmax over chunks of the row: a chunk (a few KiB, so it stays in L1) is read once from
// memory for its maximum and once more from cache for exp(z - m), so every element costs one exp and
// the row is streamed from memory once. Running state per row: the max m, S = sum exp(z - m) and
// W = sum exp(z - m) (z - m); when m grows to m', S' = a S and W' = a (W + (m - m') S), a = e^(m - m').
// Entropy = lse - sum p z = log S - W / S, which has no cancellation between large terms.
//
// With a basis (token_logprobs_forward_basis), the row's d logp / d z = (1[j = t] - p_j) / T is also
// written, for a loss whose only gradient is through logp: its backward then scales each row by
// g_logp, one read and one write and no exp, where the two-pass backward redoes every exp. Each
// chunk's exp(z - m_c) is kept in an fp32 row of scratch (L2-resident) with its running max m_c, and
// p_j = exp(z_j - m_c) * exp(m_c - m) / S is written once the row's m and S are known.
#include "token_logprobs.h"
#include "vec_math.h"

#include "buffer_pool.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

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

// Adds exp(z - m) and exp(z - m) (z - m) of one block to the accumulators; returns exp(z - m).
template <bool kEntropy, bool kScaled>
inline Vec accumulate(Vec z, const Vec& m, const Vec& temperature, Vec& s, Vec& w) {
  if constexpr (kScaled) z = z / temperature;  // a division, as eager PyTorch does: same rounding
  const Vec d = z - m;
  const Vec e = exp_nonpositive(d);
  s = s + e;
  // Where e == 0 (d = -inf), the clamped d keeps 0 * d at 0 instead of NaN.
  if constexpr (kEntropy) w = at::vec::fmadd(e, at::vec::clamp_min(d, Vec(kExpLowest)), w);
  return e;
}

// Where a basis is written: each chunk's exps (fp32, the row's length) and running maxima.
struct RowScratch {
  float* exps;
  float* chunk_max;
};

// `next`: the row after this one (nullptr: none). While a chunk's exps run from L1, the next chunk (or
// the next row's first) is prefetched: otherwise memory idles during the exps and the max pass of the
// next chunk waits for it, so the two costs add up instead of overlapping.
struct NoChunkHook {
  void operator()(int64_t) const {}
};

// `before_chunk(c0)` runs before the chunk at c0 (the one-pass forward writes the previous row's basis
// there, between chunks of exps).
template <typename scalar_t, bool kEntropy, bool kScaled, bool kBasis = false, typename Hook = NoChunkHook>
RowStats row_stats(const scalar_t* x, int64_t V, float temperature, const scalar_t* next,
                   const RowScratch& scratch = {nullptr, nullptr}, const Hook& before_chunk = {}) {
  float m = kNegInf;
  Vec s0(0.0f), s1(0.0f), w0(0.0f), w1(0.0f);
  const Vec tv(temperature);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t len = std::min(kChunk, V - c0);
    const scalar_t* xc = x + c0;
    const scalar_t* ahead = c0 + kChunk < V ? xc + kChunk : next;
    before_chunk(c0);
    float cm = chunk_max(xc, len);
    if (std::isnan(cm)) return {cm, cm, cm};
    if constexpr (kBasis) scratch.chunk_max[c0 / kChunk] = kNegInf;  // until its exps are kept
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
    float* kept = kBasis ? scratch.exps + c0 : nullptr;
    Vec lo, hi;
    int64_t j = 0;
    for (; j + kBlock <= len; j += kBlock) {
      if (ahead) prefetch_block(ahead + j);
      load_block(xc + j, lo, hi);
      const Vec e_lo = accumulate<kEntropy, kScaled>(lo, mv, tv, s0, w0);
      const Vec e_hi = accumulate<kEntropy, kScaled>(hi, mv, tv, s1, w1);
      if constexpr (kBasis) {
        e_lo.store(kept + j);
        e_hi.store(kept + j + Vec::size());
      }
    }
    if (j < len) {  // padding with -inf adds exactly 0 to both sums
      load_tail(xc + j, len - j, kNegInf, lo, hi);
      const Vec e_lo = accumulate<kEntropy, kScaled>(lo, mv, tv, s0, w0);
      const Vec e_hi = accumulate<kEntropy, kScaled>(hi, mv, tv, s1, w1);
      if constexpr (kBasis) store_block(kept + j, e_lo, e_hi, len - j);
    }
    if constexpr (kBasis) scratch.chunk_max[c0 / kChunk] = m;
  }
  return {m, reduce_sum(s0 + s1), kEntropy ? reduce_sum(w0 + w1) : 0.0f};
}

// Row i's logp, entropy and lse from its stats (row x, target t); returns z_t (0 for a target outside
// [0, V)), which the one-pass forward needs again.
template <typename scalar_t, bool kEntropy, bool kScaled, typename lse_t>
float row_outputs(const RowStats& st, const scalar_t* x, int64_t V, int64_t t, float temperature, float& logp,
                  float& entropy, lse_t& lse) {
  const float log_sum = std::log(st.sum);
  // A target outside [0, V) lies in another rank's vocabulary shard: x[t] is not ours to read and
  // the row's logp is 0 here (the owning rank supplies it); lse and entropy are computed as usual.
  const bool local = t >= 0 && t < V;
  float zt = local ? static_cast<float>(x[t]) : 0.0f;
  if constexpr (kScaled) zt = zt / temperature;
  // m + log S in double, then rounded once to lse_t: an fp64 lse keeps the backward exact to fp32
  // rounding however large the logits (an fp32 lse of ~1e4 is off by up to 5e-4).
  lse = static_cast<lse_t>(static_cast<double>(st.max) + std::log(static_cast<double>(st.sum)));
  // (z_t - m) - log S, not z_t - lse: no rounding of a large lse when |logits| ~ 1e4.
  logp = local ? (zt - st.max) - log_sum : 0.0f;
  entropy = kEntropy ? log_sum - st.wsum / st.sum : 0.0f;
  return zt;
}

// An ignored row's outputs: all 0.
template <typename lse_t>
void ignored_row_outputs(float& logp, float& entropy, lse_t& lse) {
  logp = entropy = 0.0f;
  lse = 0;
}

template <typename scalar_t, bool kEntropy, bool kScaled, typename lse_t>
void forward_rows(const scalar_t* logits, int64_t row_stride, int64_t V, const int64_t* targets,
                  float temperature, int64_t ignore_index, float* logp, float* entropy, lse_t* lse,
                  int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = targets[i];
    if (t == ignore_index) {
      ignored_row_outputs(logp[i], entropy[i], lse[i]);
      continue;
    }
    const scalar_t* x = logits + i * row_stride;
    const RowStats st = row_stats<scalar_t, kEntropy, kScaled>(x, V, temperature,
                                                               i + 1 < end ? x + row_stride : nullptr);
    row_outputs<scalar_t, kEntropy, kScaled>(st, x, V, t, temperature, logp[i], entropy[i], lse[i]);
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
    dispatch_flags(compute_entropy, scaled, run);
  });
}

// Bases larger than this are written with non-temporal stores, as the backward's fp32 gradient (see
// kStreamBytes there), 2-byte ones too since this sweep has no exps of its own. (bf16 2048 x 151936 on the
// Zen 3 EPYC: no faster than plain stores, 122.8 against 121.9-123.9 ms for the forward; kept for the
// write-allocate it saves where memory, not the exps, bounds the row.)
constexpr int64_t kBasisStreamBytes = int64_t{64} << 20;

// A row whose basis is still to be written: out = (1[j = t] - p_j) / T from its kept exps, p_j =
// exp(z_j - m_c) exp(m_c - m) / S with one factor a chunk. Written a chunk at a time between the next
// row's chunks of exps, so that its stores drain while the exps run instead of after them (row_stats'
// hook). A row with a NaN, or of -inf only (S = 0), gets NaN, as the two-pass backward gives it.
template <typename scalar_t>
struct PendingBasis {
  scalar_t* out = nullptr;  // null: nothing pending
  RowScratch scratch{nullptr, nullptr};
  RowStats st{};
  double lse = 0;
  int64_t V = 0, t = 0, written = 0;  // written: the elements before it are done
  float zt = 0, inv_t = 1;
  bool stream = false;

  void write_chunk(int64_t c0) const {
    const int64_t len = std::min(kChunk, V - c0);
    scalar_t* o = out + c0;
    if (!(st.sum > 0.0f) || std::isnan(st.max)) {
      fill_row(o, len, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    const float cm = scratch.chunk_max[c0 / kChunk];
    if (cm == kNegInf) {  // a chunk of -inf only (p = 0) kept no exps
      fill_row(o, len, 0.0f);
      return;
    }
    const Vec f(-std::exp(cm - st.max) / st.sum * inv_t);
    const float* kept = scratch.exps + c0;
    int64_t j = 0;
    for (; j + kBlock <= len; j += kBlock) {
      const Vec lo = Vec::loadu(kept + j) * f, hi = Vec::loadu(kept + j + Vec::size()) * f;
      if (stream) {
        stream_block(o + j, lo, hi);
      } else {
        store_block(o + j, lo, hi);
      }
    }
    if (j < len) {
      Vec lo, hi;
      load_tail(kept + j, len - j, 0.0f, lo, hi);
      store_block(o + j, lo * f, hi * f, len - j);
    }
  }

  // Writes the chunks that start before `end`.
  void write_until(int64_t end) {
    if (out == nullptr) return;
    for (; written < std::min(end, V); written += kChunk) write_chunk(written);
  }

  // The rest, and the target's exact value (its own exp, as the two-pass backward's).
  void finish() {
    if (out == nullptr) return;
    write_until(V);
    if (t >= 0 && t < V && st.sum > 0.0f && !std::isnan(st.max)) {
      const float lse_hi = static_cast<float>(lse);
      const float u = (zt - lse_hi) - static_cast<float>(lse - lse_hi);
      const float p = u < kExpLowest ? 0.0f : std::exp(u);
      out[t] = static_cast<scalar_t>((1.0f - p) * inv_t);
    }
    out = nullptr;
  }
};

template <typename scalar_t, bool kEntropy, bool kScaled>
void forward_basis_rows(const scalar_t* logits, int64_t row_stride, int64_t V, const int64_t* targets,
                        float temperature, int64_t ignore_index, float* logp, float* entropy, double* lse,
                        scalar_t* basis, bool stream, int64_t begin, int64_t end) {
  // two scratch rows per thread (this row's exps, the pending row's), kept across calls: a fresh one per
  // task would be an mmap and its page faults
  thread_local std::vector<float> exps[2], chunk_max[2];
  for (int k = 0; k < 2; ++k) {
    if (static_cast<int64_t>(exps[k].size()) < V) exps[k].resize(V);
    if (static_cast<int64_t>(chunk_max[k].size()) < V / kChunk + 1) chunk_max[k].resize(V / kChunk + 1);
  }
  stream = stream && reinterpret_cast<uintptr_t>(basis) % 64 == 0 && (V * sizeof(scalar_t)) % 64 == 0;
  PendingBasis<scalar_t> pending;
  int k = 0;
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* out = basis + i * V;
    const int64_t t = targets[i];
    if (t == ignore_index) {
      ignored_row_outputs(logp[i], entropy[i], lse[i]);
      fill_row(out, V, 0.0f);
      continue;
    }
    const RowScratch scratch{exps[k].data(), chunk_max[k].data()};
    const scalar_t* x = logits + i * row_stride;
    const RowStats st = row_stats<scalar_t, kEntropy, kScaled, true>(
        x, V, temperature, i + 1 < end ? x + row_stride : nullptr, scratch,
        [&](int64_t c0) { pending.write_until(c0); });
    pending.finish();
    const float zt = row_outputs<scalar_t, kEntropy, kScaled>(st, x, V, t, temperature, logp[i], entropy[i], lse[i]);
    pending = PendingBasis<scalar_t>{out, scratch, st, lse[i], V, t, 0, zt, 1.0f / temperature, stream};
    k ^= 1;
  }
  pending.finish();
  if (stream) stream_fence();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_basis(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index,
    bool compute_entropy) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (N, V) with unit stride");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64");
  const auto targets_c = targets.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts);
  at::Tensor lse = at::empty({N}, opts.dtype(at::kDouble));
  at::Tensor basis = empty_pooled({N, V}, logits.options());
  if (N == 0 || V == 0) return {logp, entropy, lse, basis};
  const bool stream = N * V * static_cast<int64_t>(logits.element_size()) > kBasisStreamBytes;
  const bool scaled = temperature != 1.0;
  const float temp = static_cast<float>(temperature);
  SPPO_DISPATCH_LOGITS(logits.scalar_type(), "token_logprobs_forward_basis", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* out = basis.mutable_data_ptr<scalar_t>();
    const int64_t* t = targets_c.const_data_ptr<int64_t>();
    float* lp = logp.mutable_data_ptr<float>();
    float* en = entropy.mutable_data_ptr<float>();
    double* ls = lse.mutable_data_ptr<double>();
    const int64_t stride = logits.stride(0);
    parallel_rows(N, V, [&](int64_t begin, int64_t end) {
      auto run = [&](auto entropy_tag, auto scaled_tag) {
        forward_basis_rows<scalar_t, decltype(entropy_tag)::value, decltype(scaled_tag)::value>(
            x, stride, V, t, temp, ignore_index, lp, en, ls, out, stream, begin, end);
      };
      dispatch_flags(compute_entropy, scaled, run);
    });
  });
  return {logp, entropy, lse, basis};
}

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
