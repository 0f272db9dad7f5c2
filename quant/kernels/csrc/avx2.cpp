// AVX2 + FMA + F16C kernels (the x86-64 baseline of quantserve's kernels).
// Integer dot products with _mm256_maddubs_epi16 (u8 x s8 -> s16 pairs) and
// _mm256_madd_epi16 (-> s32), one float multiply-add per 32-element block.
#include "qs_kernels.h"

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include "qs_impl.h"

namespace qs {
namespace {

struct Avx2 {
  static constexpr bool kInt8Offset = false;  // signed activation codes (sign trick below)
  static constexpr int64_t kInt4Chunk = 64;   // int4 codes per step: 32 packed bytes
  static constexpr int kNR1 = 4;              // weight rows per tile when M == 1
  static constexpr int kNR = 2;               // weight rows per tile when M > 1 (tiles of 4 x 2)

  // int8 weights x int8 activations, 32 elements per step.
  // maddubs needs one unsigned operand: |x| * (w * sign(x)) == x * w, no saturation
  // since |x| <= 127 and |w| <= 128 (pairs stay below 2 * 127 * 128 < 32767).
  template <int MR, int NR, bool kPerRow>
  static void int8_tile(const LinearArgs& a, int64_t m, const int64_t* n, float (&out)[MR][NR]) {
    const int8_t* x[MR];
    const float* xs[MR];
    const int8_t* w[NR];
    for (int i = 0; i < MR; ++i) {
      x[i] = reinterpret_cast<const int8_t*>(a.act.codes + (m + i) * a.act.k_pad);
      xs[i] = a.act.scales + (m + i) * a.act.scales_stride;
    }
    for (int j = 0; j < NR; ++j) w[j] = a.w_int8 + n[j] * a.K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MR][NR];
    __m256i iacc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        acc[i][j] = _mm256_setzero_ps();
        iacc[i][j] = _mm256_setzero_si256();
      }
    // |a| * (b * sign(a)) == a * b: take |.| of the operand shared by more pairs of the tile
    constexpr bool kAbsOfWeights = MR > NR;
    auto step = [&](const __m256i (&wv)[NR], int64_t k0) {
      __m256i wa[NR];
      if (kAbsOfWeights)
        for (int j = 0; j < NR; ++j) wa[j] = _mm256_abs_epi8(wv[j]);
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + k0));
        const __m256i xa = kAbsOfWeights ? xv : _mm256_abs_epi8(xv);
        const __m256 s = _mm256_set1_ps(xs[i][k0 / kBlock]);
        for (int j = 0; j < NR; ++j) {
          const __m256i prod = kAbsOfWeights ? _mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(xv, wv[j]))
                                             : _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv[j], xv));
          const __m256i dot = _mm256_madd_epi16(prod, ones);
          if (kPerRow)
            iacc[i][j] = _mm256_add_epi32(iacc[i][j], dot);
          else
            acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[i][j]);
        }
      }
    };
    const int64_t full = a.K / 32 * 32;
    __m256i wv[NR];
    for (int64_t k0 = 0; k0 < full; k0 += 32) {
      for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k0));
      step(wv, k0);
    }
    if (full < a.K) {  // K tail: zero-padded copy (activation codes past K are zero too)
      alignas(32) int8_t tail[NR][32] = {};
      for (int j = 0; j < NR; ++j) {
        __builtin_memcpy(tail[j], w[j] + full, a.K - full);
        wv[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail[j]));
      }
      step(wv, full);
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        out[i][j] = kPerRow ? static_cast<float>(hsum_epi32(iacc[i][j])) : hsum(acc[i][j]);
  }

  // 4-bit codes (unsigned, 0..15) x int8 activations, 64 codes per step: the low nibbles of
  // 32 packed bytes are the even elements, the high nibbles the odd ones, and the activations
  // were interleaved the same way. Lanes 0-3 of a dot product hold block 0, lanes 4-7 block 1.
  template <int MR, int NR>
  static void int4_tile(const LinearArgs& a, int64_t m, const int64_t* n, float (&out)[MR][NR]) {
    const int64_t g = a.group_size, groups = a.act.groups;
    const int8_t* x[MR];
    const float* xs[MR];
    const uint8_t* w[NR];
    const uint16_t* d[NR];
    for (int i = 0; i < MR; ++i) {
      x[i] = reinterpret_cast<const int8_t*>(a.act.codes + (m + i) * a.act.k_pad);
      xs[i] = a.act.scales + (m + i) * a.act.scales_stride;
    }
    for (int j = 0; j < NR; ++j) {
      w[j] = a.packed + n[j] * (a.K / 2);
      d[j] = a.scales + n[j] * groups;
    }
    // lane -> group within the step (groups of 32 or 64 codes; larger groups span whole steps)
    const __m256i d_lanes = g == 32 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1) : _mm256_setzero_si256();
    const __m256i x_lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    auto step = [&](const __m256i (&pv)[NR], int64_t k0) {
      __m256i lo[NR], hi[NR];
      __m256 dv[NR];
      const int64_t g0 = k0 / g, dcount = min64(g == 32 ? 2 : 1, groups - g0);
      for (int j = 0; j < NR; ++j) {
        lo[j] = _mm256_and_si256(pv[j], low4);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(pv[j], 4), low4);
        dv[j] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(load_halves(d[j] + g0, dcount)), d_lanes);
      }
      for (int i = 0; i < MR; ++i) {
        const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + k0));
        const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + k0 + 32));
        const __m128 s2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xs[i] + k0 / kBlock)));
        const __m256 s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), x_lanes);
        for (int j = 0; j < NR; ++j) {
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xlo), _mm256_maddubs_epi16(hi[j], xhi));
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
          acc[i][j] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, dv[j]), acc[i][j]);
        }
      }
    };
    const int64_t full = a.K / 64 * 64;
    __m256i pv[NR];
    for (int64_t k0 = 0; k0 < full; k0 += 64) {
      for (int j = 0; j < NR; ++j) pv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k0 / 2));
      step(pv, k0);
    }
    if (full < a.K) {  // K % 64 == 32: half a step, upper bytes zero
      for (int j = 0; j < NR; ++j)
        pv[j] = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + full / 2)));
      step(pv, full);
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) out[i][j] = hsum(acc[i][j]);
  }

  template <Kind K, int MR, int NR>
  static void tile(const LinearArgs& a, int64_t m, const int64_t* n, float (&out)[MR][NR]) {
    if constexpr (K == Kind::int4)
      int4_tile<MR, NR>(a, m, n, out);
    else
      int8_tile<MR, NR, K == Kind::int8_row>(a, m, n, out);
  }
};

}  // namespace

const KernelTable* avx2_table() {
  static const KernelTable table{"avx2", &quantize<Avx2>, &gemm<Avx2>};
  return &table;
}

}  // namespace qs

#if defined(__clang__)
#pragma clang attribute pop
#endif

#else  // not x86-64

namespace qs {
const KernelTable* avx2_table() { return nullptr; }
}  // namespace qs

#endif
