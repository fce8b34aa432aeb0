// Vector helpers shared by the two row kernels: a fast exp for non-positive arguments, and loads and
// stores of fp32/bf16/fp16 rows as pairs of fp32 vectors.
//
// Everything is written with at::vec::Vectorized, so the same source compiles for every ISA that ATen
// knows (setup.py builds one extension per ISA, each with its CPU_CAPABILITY define and -m flags, and
// sppo_fast/backends/native.py imports the best one the running CPU supports).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>

namespace sppo_fast {

using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;

// Elements handled per step: two fp32 vectors, which is one vector of bf16/fp16.
constexpr int64_t kBlock = 2 * Vec::size();

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) below this (e^-88 = 6e-39, under FLT_MIN) is exactly 0, so that a -inf logit gets p = 0 and a
// zero gradient. Just above it exp may come out subnormal (down to 0.7 FLT_MIN) or 0: p < 2^-125 either way.
constexpr float kExpLowest = -88.0f;

// 1.5 * 2^23 + 127: added to x log2e (|x log2e| < 2^21), it leaves round(x log2e) + 127 in the low mantissa
// bits (the generic exp below).
constexpr float kRoundBias = 12582912.0f + 127.0f;

// exp(d) for d <= 0 (small positive d is fine too), -inf -> 0, NaN -> NaN.
// Reduction d = n ln2 + r with |r| <= ln2/2, then e^r = 1 + r + r^2 q(r) with q of degree 4 (a relative-error
// fit on [-ln2/2, ln2/2]: 1.17e-7 at most evaluated in fp32, as Cephes' degree 5 q gives, one FMA fewer), then
// the exponent bits of 2^n. One evaluation per element is the whole cost of a pass, so this replaces Sleef's
// exp (1 ulp, slower) and ATen's exp_u20 (20 ulp).
inline Vec exp_nonpositive(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  // No clamp: the vscalefps below zeroes every lane under kExpLowest (-inf, whose reduction is NaN,
  // included) and scales by any n.
  const Vec& x = d;
  const Vec n = (x * Vec(1.44269504088896341f)).round();
#else
  // max(lowest, d) keeps a NaN d (the second operand wins on NaN), so NaN propagates; n >= -127 after it.
  const Vec x = at::vec::clamp_min(d, Vec(kExpLowest));
  // n = round(x log2e) by adding 1.5 * 2^23 + 127 in the FMA (one rounding, to the nearest integer): the
  // sum's low mantissa bits are then n + 127, the exponent field of 2^n once shifted (below), and the
  // round and the float-to-int conversion are saved: the forward kernel on an L2-resident block, 2-core
  // Zen 3 EPYC (AVX2), builds alternated 3 times, ran fp32 at 3.87-4.08 G/s against 3.30-3.88, bf16 at
  // 3.27-3.49 against 2.94-3.13.
  const Vec shifted = at::vec::fmadd(x, Vec(1.44269504088896341f), Vec(kRoundBias));
  const Vec n = shifted - Vec(kRoundBias);
#endif
#if defined(__FMA__)
  // r = x - n ln2 in one FMA, with ln2 rounded to fp32 (off by 1.9e-9): the product is exact inside the
  // FMA, so r is off by |n| 1.9e-9 (plus its one rounding), a relative error in e^r under 2^-24 for |d| < 30
  // and 2.4e-7 at d = -87, where e^d < 1e-37. Cody-Waite's two parts cost one more FMA per element in a
  // sweep bound by its FMAs.
  const Vec r = at::vec::fmadd(n, Vec(-0.693147180559945f), x);
#else
  // Without FMA (the default build) n ln2_f would be rounded, 2e-6 off at n = 87: Cody-Waite's two parts,
  // n * 0.693359375 exact in fp32 (9 + 7 significant bits).
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
#endif
  Vec q(1.381461275741458e-3f);
  q = at::vec::fmadd(q, r, Vec(8.368710055947304e-3f));
  q = at::vec::fmadd(q, r, Vec(4.166838899254799e-2f));
  q = at::vec::fmadd(q, r, Vec(1.666652113199234e-1f));
  q = at::vec::fmadd(q, r, Vec(4.999999403953552e-1f));
  const Vec p = at::vec::fmadd(q, r * r, r + Vec(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
  // p * 2^n in one vscalefps, zeroed where d < kExpLowest; NaN compares "not less" (unordered), so it
  // keeps its NaN. Four instructions fewer per element than the generic form, in the sweep that bounds
  // both kernels.
  const __mmask16 keep = _mm512_cmp_ps_mask(d, Vec(kExpLowest), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep, p, n);
#else
  // 2^n from its exponent bits (n + 127 shifted past the mantissa; the bias's own bits fall off the top).
  // At the clamp, n = round(-88 log2e) = -127: the exponent field is 0 and 2^n is exactly 0, which flushes
  // every d under kExpLowest (-inf included) with no compare and blend (three instructions per element).
  const VecI bits = at::vec::cast<int32_t>(shifted) << VecI(23);
  return p * at::vec::cast<float>(bits);
#endif
}

// A whole block of 2-byte elements as two fp32 vectors (widen_block) and back (narrow_block). For bf16 in
// the AVX2 build the vectors hold the block in pair order, not element order: lo = elements 0-3 and 8-11,
// hi = 4-7 and 12-15, as the in-lane unpacks give them; narrow_block's in-lane pack puts them back, so a
// block loaded, transformed element by element and stored (or kept in fp32 and stored later, at the same
// offsets) comes out in place. Tails (load_tail, store_block with count < kBlock) stay in element order.
// ATen's conversion widens across the 128-bit lanes; on the Zen 3 EPYC the bf16 forward sweep (max and exp
// passes, one thread, an L1-resident row) ran at 2.64-2.76 G/s in pair order against 2.07-2.09.
template <typename scalar_t>
inline void widen_block(const scalar_t* src, Vec& lo, Vec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), a));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), a));
    return;
  }
#endif
  auto both = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(src));
  lo = std::get<0>(both);
  hi = std::get<1>(both);
}

#if defined(CPU_CAPABILITY_AVX2)
// fp32 -> bf16 bits in the low half of each lane, rounded to nearest even, NaN -> 0xffff: ATen's rounding.
inline __m256i bf16_bits(const Vec& v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), rounded, ordered);
}
#endif

template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> narrow_block(const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi));
#endif
  return at::vec::convert_from_float<scalar_t>(lo, hi);
}

// Loads kBlock elements starting at `src` as two fp32 vectors (2-byte ones in widen_block's order).
template <typename scalar_t>
inline void load_block(const scalar_t* src, Vec& lo, Vec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo = Vec::loadu(src);
    hi = Vec::loadu(src + Vec::size());
  } else {
    widen_block(src, lo, hi);
  }
}

// Loads the last `count` (< kBlock) elements of a row, padding with `fill`.
template <typename scalar_t>
inline void load_tail(const scalar_t* src, int64_t count, float fill, Vec& lo, Vec& hi) {
  alignas(64) float buf[kBlock];
  for (int64_t i = 0; i < kBlock; ++i) buf[i] = i < count ? static_cast<float>(src[i]) : fill;
  lo = Vec::loadu(buf);
  hi = Vec::loadu(buf + Vec::size());
}

// Stores the first `count` (<= kBlock) of the two fp32 vectors into `dst`, rounded to scalar_t (a whole block
// of 2-byte elements in widen_block's order, a tail in element order).
template <typename scalar_t>
inline void store_block(scalar_t* dst, const Vec& lo, const Vec& hi, int64_t count = kBlock) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kBlock) {
      lo.store(dst);
      hi.store(dst + Vec::size());
    } else {
      lo.store(dst, std::min<int64_t>(count, Vec::size()));
      if (count > Vec::size()) hi.store(dst + Vec::size(), count - Vec::size());
    }
  } else if (count == kBlock) {
    narrow_block<scalar_t>(lo, hi).store(dst);
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(dst, static_cast<int>(count));
  }
}

// Sets out[0, n) to `value` (in scalar_t): an ignored row's zeros, a broken row's NaNs.
template <typename scalar_t>
inline void fill_row(scalar_t* out, int64_t n, float value) {
  const Vec v(value);
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) store_block(out + j, v, v);
  if (j < n) store_block(out + j, v, v, n - j);
}

// Stores kBlock elements like store_block, bypassing the caches (non-temporal) in the AVX512 and AVX2
// builds: for a gradient much larger than the caches, whose lines a plain store would first read from
// memory (the write-allocate) only to overwrite them. dst must be 64-byte aligned (kBlock elements span
// 64 bytes of fp32 in the AVX2 build, 64 or 128 in the AVX512 one). The default build: a plain store.
template <typename scalar_t>
inline void stream_block(scalar_t* dst, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(dst, lo);
    _mm512_stream_ps(dst + Vec::size(), hi);
  } else {
    const __m512i packed = at::vec::convert_from_float<scalar_t>(lo, hi);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), packed);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(dst, lo);
    _mm256_stream_ps(dst + Vec::size(), hi);
  } else {
    const __m256i packed = narrow_block<scalar_t>(lo, hi);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), packed);
  }
#else
  store_block(dst, lo, hi);
#endif
}

// Orders this thread's non-temporal stores before whatever it does next (the end of its share of a pass).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Asks for the cache lines of kBlock elements at p: a hint, which never faults whatever p is (past the
// end of a tensor included).
template <typename scalar_t>
inline void prefetch_block(const scalar_t* p) {
  constexpr int64_t kBytes = kBlock * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < kBytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 3);
}

// Largest lane of v, NaN if any lane is NaN.
inline float reduce_max(const Vec& v) {
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  float m = buf[0];
  for (int64_t i = 1; i < Vec::size(); ++i) m = (buf[i] > m || buf[i] != buf[i]) ? buf[i] : m;
  return m;
}

inline float reduce_sum(const Vec& v) {
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  float s = 0.0f;
  for (int64_t i = 0; i < Vec::size(); ++i) s += buf[i];
  return s;
}

}  // namespace sppo_fast
