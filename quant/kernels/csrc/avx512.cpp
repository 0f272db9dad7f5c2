// AVX-512 (F, BW, VL) + VNNI kernels, selected at run time only on CPUs that have them.
// vpdpbusd multiplies u8 x s8 and accumulates into s32 without saturation, 64 bytes per
// instruction. int8 weights are signed, so activations are stored as u8 codes + 128 and the
// 128 * sum(w) excess is subtracted (computed once per weight chunk, shared by all rows).
#include "qs_kernels.h"

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), \
                             apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

#include "qs_impl.h"

namespace qs {
namespace {

struct Avx512Vnni {
  static constexpr bool kInt8Offset = true;   // u8 activation codes (x + 128)
  static constexpr int64_t kInt4Chunk = 128;  // int4 codes per step: 64 packed bytes
  static constexpr int kNR1 = 4;              // weight rows per tile when M == 1
  static constexpr int kNR = 4;               // weight rows per tile when M > 1 (tiles of 4 x 4)

  // Two activation block scales (blocks b, b+1) spread over lanes [b x 8, b+1 x 8].
  static __m512 scales_2(const float* p) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(two));
  }

  template <int MR, int NR, bool kPerRow>
  static void int8_tile(const LinearArgs& a, int64_t m, const int64_t* n, float (&out)[MR][NR]) {
    const uint8_t* x[MR];
    const float* xs[MR];
    const int8_t* w[NR];
    for (int i = 0; i < MR; ++i) {
      x[i] = a.act.codes + (m + i) * a.act.k_pad;
      xs[i] = a.act.scales + (m + i) * a.act.scales_stride;
    }
    for (int j = 0; j < NR; ++j) w[j] = a.w_int8 + n[j] * a.K;
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512 acc[MR][NR];
    __m512i iacc[MR][NR], excess[NR];
    for (int j = 0; j < NR; ++j) excess[j] = _mm512_setzero_si512();
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        acc[i][j] = _mm512_setzero_ps();
        iacc[i][j] = _mm512_setzero_si512();
      }
    auto step = [&](const __m512i (&wv)[NR], int64_t k0) {
      __m512i neg_excess[NR];
      for (int j = 0; j < NR; ++j) {
        if (kPerRow)
          excess[j] = _mm512_dpbusd_epi32(excess[j], offset, wv[j]);
        else
          neg_excess[j] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                           _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, wv[j]));
      }
      for (int i = 0; i < MR; ++i) {
        const __m512i xv = _mm512_loadu_si512(x[i] + k0);
        if (kPerRow) {
          for (int j = 0; j < NR; ++j) iacc[i][j] = _mm512_dpbusd_epi32(iacc[i][j], xv, wv[j]);
          continue;
        }
        const __m512 s = scales_2(xs[i] + k0 / kBlock);
        for (int j = 0; j < NR; ++j) {
          const __m512i dot = _mm512_dpbusd_epi32(neg_excess[j], xv, wv[j]);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i][j]);
        }
      }
    };
    const int64_t full = a.K / 64 * 64;
    __m512i wv[NR];
    for (int64_t k0 = 0; k0 < full; k0 += 64) {
      for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w[j] + k0);
      step(wv, k0);
    }
    if (full < a.K) {  // K tail: masked load, zero past K
      const __mmask64 mask = (~0ULL) >> (64 - (a.K - full));
      for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_epi8(mask, w[j] + full);
      step(wv, full);
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        out[i][j] = kPerRow ? static_cast<float>(_mm512_reduce_add_epi32(_mm512_sub_epi32(iacc[i][j], excess[j])))
                            : _mm512_reduce_add_ps(acc[i][j]);
  }

  // 128 codes per step: low nibbles of 64 packed bytes = even elements, high = odd ones
  // (activations interleaved to match). Lanes 4b..4b+3 of a dot product hold block b.
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
    const __m512i x_lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    // lane -> group within the step: 4 groups of 32, 2 of 64, or one group spanning the step
    const __m512i d_lanes = g == 32   ? x_lanes
                            : g == 64 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                      : _mm512_setzero_si512();
    const int64_t d_per_step = g < 128 ? 128 / g : 1;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    auto step = [&](const __m512i (&pv)[NR], int64_t k0) {
      __m512i lo[NR], hi[NR];
      __m512 dv[NR];
      const int64_t g0 = k0 / g, dcount = min64(d_per_step, groups - g0);
      for (int j = 0; j < NR; ++j) {
        lo[j] = _mm512_and_si512(pv[j], low4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(pv[j], 4), low4);
        dv[j] = _mm512_permutexvar_ps(d_lanes, _mm512_castps128_ps512(load_halves(d[j] + g0, dcount)));
      }
      for (int i = 0; i < MR; ++i) {
        const __m512i xlo = _mm512_loadu_si512(x[i] + k0);
        const __m512i xhi = _mm512_loadu_si512(x[i] + k0 + 64);
        const __m512 s = _mm512_permutexvar_ps(x_lanes, _mm512_castps128_ps512(_mm_loadu_ps(xs[i] + k0 / kBlock)));
        for (int j = 0; j < NR; ++j) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], xlo), hi[j], xhi);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, dv[j]), acc[i][j]);
        }
      }
    };
    const int64_t full = a.K / 128 * 128;
    __m512i pv[NR];
    for (int64_t k0 = 0; k0 < full; k0 += 128) {
      for (int j = 0; j < NR; ++j) pv[j] = _mm512_loadu_si512(w[j] + k0 / 2);
      step(pv, k0);
    }
    if (full < a.K) {  // K % 128 in {32, 64, 96}: masked load, zero past K
      const __mmask64 mask = (~0ULL) >> (64 - (a.K - full) / 2);
      for (int j = 0; j < NR; ++j) pv[j] = _mm512_maskz_loadu_epi8(mask, w[j] + full / 2);
      step(pv, full);
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
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

const KernelTable* avx512_table() {
  static const KernelTable table{"avx512vnni", &quantize<Avx512Vnni>, &gemm<Avx512Vnni>};
  return &table;
}

}  // namespace qs

#if defined(__clang__)
#pragma clang attribute pop
#endif

#else  // not x86-64

namespace qs {
const KernelTable* avx512_table() { return nullptr; }
}  // namespace qs

#endif
