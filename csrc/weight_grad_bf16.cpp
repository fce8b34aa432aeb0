// The linear path's weight-gradient product for a bf16 head: acc (V, H) fp32 += grad (n, V)^T h (n, H),
// grad and h bf16, on AVX512-BF16 dot products (vdpbf16ps: two bf16 products added to an fp32 lane).
//
// Why our own: several chunks of tokens add into one fp32 accumulator, and torch has no CPU matmul of
// bf16 operands into an fp32 output. Its fp32 addmm at oneDNN's bf16 precision needs the gradient
// widened to fp32 first and ran at 173 ms a chunk of 256 tokens at V = 151936, H = 512 (2-core AMD
// EPYC), this at about 70 ms, below torch.mm's bf16 product writing bf16 (87 ms).
//
// Layout: pairs of consecutive tokens (k, k+1) are packed into 32-bit words, the operand form of
// vdpbf16ps. h is packed once per call, by blocks of 64 hidden units (kBlockCols); the gradient a panel
// of kPanelRows vocabulary rows at a time, per thread, while it sits in L1/L2. A micro-tile keeps
// kTileRows x 64 sums of acc in 24 zmm registers over all token pairs. An odd token count pads the last
// pair with 0. Denormal products are flushed to 0, as vdpbf16ps does (below 1e-38: nothing the fp32
// sums can hold beside gradients of order 1e-9 and more).
#include "weight_grad_bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define SPPO_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace sppo_fast {

#if defined(CPU_CAPABILITY_AVX512)
namespace {

constexpr int kTileRows = 6;      // vocabulary rows of acc per micro-tile
constexpr int kBlockCols = 64;    // hidden units per micro-tile: 4 zmm of 16 fp32
constexpr int kPanelRows = 96;    // vocabulary rows of the gradient packed at a time

// acc rows [0, R) x columns [0, 16 C) (the last zmm masked by `last`) += gp . hb over kpairs pairs, or
// = when !accumulate. gp: the panel's packed gradient from this tile's first row (stride kPanelRows);
// hb: the packed h of this column block, kBlockCols words per pair.
template <int R, int C>
SPPO_BF16_DOT inline void micro_tile(float* acc, int64_t ld, const uint32_t* gp, const uint32_t* hb,
                                     int64_t kpairs, __mmask16 last, bool accumulate) {
  __m512 sum[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      sum[r][c] = accumulate ? _mm512_maskz_loadu_ps(c == C - 1 ? last : 0xFFFF, acc + r * ld + 16 * c)
                             : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    __m512bh b[C];
    for (int c = 0; c < C; ++c) b[c] = (__m512bh)_mm512_loadu_si512(hb + kp * kBlockCols + 16 * c);
    const uint32_t* g = gp + kp * kPanelRows;
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(g[r]));
      for (int c = 0; c < C; ++c) sum[r][c] = _mm512_dpbf16_ps(sum[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(acc + r * ld + 16 * c, c == C - 1 ? last : 0xFFFF, sum[r][c]);
}

// R rows of acc, every column block.
template <int R>
SPPO_BF16_DOT void row_tile(float* acc, int64_t H, const uint32_t* gp, const uint32_t* hp, int64_t kpairs,
                            bool accumulate) {
  for (int64_t j = 0; j < H; j += kBlockCols) {
    const int64_t width = std::min<int64_t>(kBlockCols, H - j);
    const __mmask16 last = static_cast<__mmask16>(width % 16 ? (1u << (width % 16)) - 1 : 0xFFFFu);
    const uint32_t* hb = hp + (j / kBlockCols) * kpairs * kBlockCols;
    switch ((width + 15) / 16) {
      case 4: micro_tile<R, 4>(acc + j, H, gp, hb, kpairs, last, accumulate); break;
      case 3: micro_tile<R, 3>(acc + j, H, gp, hb, kpairs, last, accumulate); break;
      case 2: micro_tile<R, 2>(acc + j, H, gp, hb, kpairs, last, accumulate); break;
      default: micro_tile<R, 1>(acc + j, H, gp, hb, kpairs, last, accumulate); break;
    }
  }
}

using RowTile = void (*)(float*, int64_t, const uint32_t*, const uint32_t*, int64_t, bool);
constexpr RowTile kRowTiles[kTileRows + 1] = {nullptr, row_tile<1>, row_tile<2>, row_tile<3>,
                                              row_tile<4>, row_tile<5>, row_tile<6>};

inline uint32_t pair_word(uint16_t first, uint16_t second) { return uint32_t(first) | (uint32_t(second) << 16); }

// h (n, H) -> per column block, (kpairs, kBlockCols) words; columns past H are 0.
std::vector<uint32_t> pack_hidden(const uint16_t* h, int64_t ld, int64_t n, int64_t H, int64_t kpairs) {
  const int64_t blocks = (H + kBlockCols - 1) / kBlockCols;
  std::vector<uint32_t> packed(blocks * kpairs * kBlockCols, 0u);
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const uint16_t* first = h + 2 * kp * ld;
    const uint16_t* second = 2 * kp + 1 < n ? first + ld : nullptr;
    for (int64_t j = 0; j < H; ++j) {
      packed[((j / kBlockCols) * kpairs + kp) * kBlockCols + j % kBlockCols] =
          pair_word(first[j], second ? second[j] : 0);
    }
  }
  return packed;
}

// The gradient's vocabulary rows [v0, v0 + rows) -> (kpairs, kPanelRows) words: two token rows
// interleaved 16 bits at a time, 32 vocabulary entries per step.
SPPO_BF16_DOT void pack_panel(uint32_t* out, const uint16_t* g, int64_t ld, int64_t n, int64_t kpairs, int64_t v0,
                              int64_t rows) {
  alignas(64) uint16_t low[32], high[32];
  for (int i = 0; i < 16; ++i) {
    low[2 * i] = i, low[2 * i + 1] = 32 + i;
    high[2 * i] = 16 + i, high[2 * i + 1] = 48 + i;
  }
  const __m512i take_low = _mm512_load_si512(low), take_high = _mm512_load_si512(high);
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const uint16_t* first = g + 2 * kp * ld + v0;
    const bool has_second = 2 * kp + 1 < n;
    uint32_t* dst = out + kp * kPanelRows;
    for (int64_t r = 0; r < rows; r += 32) {
      const int64_t w = std::min<int64_t>(32, rows - r);
      const __mmask32 m = static_cast<__mmask32>(w == 32 ? 0xFFFFFFFFu : (1u << w) - 1);
      const __m512i a = _mm512_maskz_loadu_epi16(m, first + r);
      const __m512i b = has_second ? _mm512_maskz_loadu_epi16(m, first + ld + r) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + r, _mm512_permutex2var_epi16(a, take_low, b));
      _mm512_storeu_si512(dst + r + 16, _mm512_permutex2var_epi16(a, take_high, b));
    }
  }
}

}  // namespace

bool weight_grad_bf16_supported() { return __builtin_cpu_supports("avx512bf16"); }

void accumulate_weight_grad_bf16(at::Tensor& acc, const at::Tensor& grad, const at::Tensor& hidden,
                                 bool accumulate) {
  TORCH_CHECK(weight_grad_bf16_supported(), "accumulate_weight_grad_bf16: this CPU has no AVX512-BF16");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.dim() == 2 && acc.is_contiguous(),
              "accumulate_weight_grad_bf16: acc must be a contiguous (V, H) fp32 tensor");
  TORCH_CHECK(grad.scalar_type() == at::kBFloat16 && hidden.scalar_type() == at::kBFloat16,
              "accumulate_weight_grad_bf16: grad and hidden must be bf16");
  TORCH_CHECK(grad.dim() == 2 && hidden.dim() == 2 && grad.size(0) == hidden.size(0) &&
                  grad.size(1) == acc.size(0) && hidden.size(1) == acc.size(1),
              "accumulate_weight_grad_bf16: shapes must be grad (n, V), hidden (n, H), acc (V, H)");
  TORCH_CHECK(grad.stride(1) == 1 && hidden.stride(1) == 1,
              "accumulate_weight_grad_bf16: grad and hidden need unit column strides");
  const int64_t V = acc.size(0), H = acc.size(1), n = grad.size(0), kpairs = (n + 1) / 2;
  if (V == 0 || H == 0) return;
  if (n == 0) {
    if (!accumulate) acc.zero_();
    return;
  }
  const auto* g = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
  const auto* h = reinterpret_cast<const uint16_t*>(hidden.data_ptr<at::BFloat16>());
  float* out = acc.data_ptr<float>();
  const int64_t ld_g = grad.stride(0);
  const std::vector<uint32_t> hp = pack_hidden(h, hidden.stride(0), n, H, kpairs);
  const int64_t panels = (V + kPanelRows - 1) / kPanelRows;
  // Panels are taken from a shared counter (as parallel_rows does): a descheduled thread delays one panel.
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), panels);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    std::vector<uint32_t> gp(kpairs * kPanelRows + 32);  // + 32: the last 32-wide store of a short panel
    for (int64_t p = next.fetch_add(1); p < panels; p = next.fetch_add(1)) {
      const int64_t v0 = p * kPanelRows, rows = std::min<int64_t>(kPanelRows, V - v0);
      pack_panel(gp.data(), g, ld_g, n, kpairs, v0, rows);
      for (int64_t r = 0; r < rows; r += kTileRows) {
        kRowTiles[std::min<int64_t>(kTileRows, rows - r)](out + (v0 + r) * H, H, gp.data() + r, hp.data(), kpairs,
                                                          accumulate);
      }
    }
  });
}

#else  // the DEFAULT and AVX2 builds: no bf16 dot products

bool weight_grad_bf16_supported() { return false; }

void accumulate_weight_grad_bf16(at::Tensor&, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_CHECK(false, "accumulate_weight_grad_bf16: only the AVX512 build of the native kernels has it");
}

#endif

}  // namespace sppo_fast
