// Code shared by the ISA units: activation quantization, the int4 min term, the
// tile driver and the epilogue. Included by avx2.cpp and avx512.cpp after their
// `#pragma GCC target`, so it is compiled once per ISA. Everything here has
// internal linkage (anonymous namespace): the two copies can never be mixed up by
// the linker. Uses AVX2/FMA/F16C intrinsics only, which both units enable.
#pragma once

#include <immintrin.h>

#include "qs_kernels.h"

namespace qs {
namespace {

// ---- scalar helpers --------------------------------------------------------

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// Up to four fp16 values starting at p as floats (lanes past `count` are zero).
// Reads 8 bytes when `count` == 4 is allowed, else only what it needs.
inline __m128 load_halves(const uint16_t* p, int64_t count) {
  if (count >= 4) return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  if (count == 1) return _mm_cvtph_ps(_mm_cvtsi32_si128(p[0]));
  if (count == 2) {
    int32_t pair;
    __builtin_memcpy(&pair, p, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(pair));
  }
  uint64_t bits = 0;
  for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(p[i]) << (16 * i);
  return _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(bits)));
}

// ---- activation quantization ----------------------------------------------

// 32 activations from row m starting at k0 as floats, zero past K.
inline void load_block(const LinearArgs& a, int64_t m, int64_t k0, float* buf) {
  const int64_t n = min64(kBlock, a.K - k0);
  if (a.x_dtype == Dtype::f32) {
    const float* src = static_cast<const float*>(a.x) + m * a.ldx + k0;
    if (n == kBlock) {
      for (int i = 0; i < 32; i += 8) _mm256_storeu_ps(buf + i, _mm256_loadu_ps(src + i));
      return;
    }
    for (int64_t i = 0; i < 32; ++i) buf[i] = i < n ? src[i] : 0.0f;
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(a.x) + m * a.ldx + k0;
    if (n == kBlock) {
      for (int i = 0; i < 32; i += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
        _mm256_storeu_ps(buf + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
      }
      return;
    }
    for (int64_t i = 0; i < 32; ++i) buf[i] = i < n ? bf16_to_float(src[i]) : 0.0f;
  }
}

inline float block_absmax(const float* buf) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(buf));
  for (int i = 8; i < 32; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(buf + i)));
  return hmax(m);
}

inline float block_sum(const float* buf) {
  __m256 s = _mm256_add_ps(_mm256_loadu_ps(buf), _mm256_loadu_ps(buf + 8));
  s = _mm256_add_ps(s, _mm256_add_ps(_mm256_loadu_ps(buf + 16), _mm256_loadu_ps(buf + 24)));
  return hsum(s);
}

// Same arithmetic as quant.primitives.quantize_symmetric(bits=8): s = max(amax, 1e-12) / 127,
// q = clamp(round_half_even(x / s), -127, 127). Returns the 32 codes in natural order.
inline __m256i quantize_block(const float* buf, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) {
    __m256i v = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(buf + 8 * i), s));
    q[i] = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
  }
  __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline float scale_of(float amax) { return (amax > 1e-12f ? amax : 1e-12f) / 127.0f; }

// Quantize rows [m0, m1) of x into a.act.
// offset: store codes + 128 as uint8 (for u8 x s8 dot products).
// interleave: 0 keeps natural order; C > 0 reorders each C-element chunk as
//   [x0, x2, ..., x_{C-2}, x1, x3, ..., x_{C-1}] to match the low/high nibbles of packed int4.
inline void quantize_rows(const LinearArgs& a, int64_t m0, int64_t m1, bool per_row, bool offset,
                          int64_t interleave) {
  const QuantizedActs& act = a.act;
  const int64_t blocks = act.k_pad / kBlock;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i deinterleave = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6,
                                                8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  alignas(32) float buf[kBlock];
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* codes = act.codes + m * act.k_pad;
    float* scales = act.scales + m * act.scales_stride;
    float* sums = act.sums ? act.sums + m * act.groups : nullptr;
    if (sums)
      for (int64_t g = 0; g < act.groups; ++g) sums[g] = 0.0f;
    float row_scale = a.act_scale;  // > 0: calibrated (W8A8 static), used as is
    if (per_row && row_scale <= 0.0f) {
      float amax = 0.0f;
      for (int64_t k0 = 0; k0 < a.K; k0 += kBlock) {
        load_block(a, m, k0, buf);
        float b = block_absmax(buf);
        amax = b > amax ? b : amax;
      }
      row_scale = scale_of(amax);
    }
    if (per_row) scales[0] = row_scale;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kBlock;
      load_block(a, m, k0, buf);
      float scale = row_scale;
      if (!per_row) {
        scale = scale_of(block_absmax(buf));
        scales[b] = scale;
      }
      if (sums && k0 < a.K) sums[k0 / a.group_size] += block_sum(buf);
      __m256i q = quantize_block(buf, scale);
      if (offset) q = _mm256_xor_si256(q, flip);
      if (interleave == 0) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k0), q);
        continue;
      }
      // evens of the block in the low 128 bits, odds in the high 128 bits
      __m256i eo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q, deinterleave), _MM_SHUFFLE(3, 1, 2, 0));
      const int64_t within = k0 % interleave;
      uint8_t* chunk = codes + (k0 - within);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(chunk + within / 2), _mm256_castsi256_si128(eo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(chunk + interleave / 2 + within / 2),
                       _mm256_extracti128_si256(eo, 1));
    }
  }
}

template <class Isa>
void quantize(const LinearArgs& a, int64_t m0, int64_t m1) {
  switch (a.kind) {
    case Kind::int8_block:
    case Kind::int8_g32:
      return quantize_rows(a, m0, m1, false, Isa::kInt8Offset, 0);
    case Kind::int8_row:
      return quantize_rows(a, m0, m1, true, Isa::kInt8Offset, 0);
    case Kind::int4:
      return quantize_rows(a, m0, m1, false, false, Isa::kInt4Chunk);
  }
}

// ---- int4 min term: sum_g min[n, g] * (sum of x over group g) ---------------

template <int MR, int NR>
void add_min_term(const LinearArgs& a, int64_t m, const int64_t* n, float (&out)[MR][NR]) {
  const int64_t groups = a.act.groups;
  const float* sums[MR];
  const uint16_t* mins[NR];
  for (int i = 0; i < MR; ++i) sums[i] = a.act.sums + (m + i) * groups;
  for (int j = 0; j < NR; ++j) mins[j] = a.mins + n[j] * groups;
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t full = groups / 8 * 8;
  for (int64_t g = 0; g < full; g += 8) {
    __m256 mv[NR];
    for (int j = 0; j < NR; ++j) mv[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins[j] + g)));
    for (int i = 0; i < MR; ++i) {
      const __m256 sv = _mm256_loadu_ps(sums[i] + g);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(mv[j], sv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t g = full; g < groups; ++g) s += half_to_float(mins[j][g]) * sums[i][g];
      out[i][j] += s;
    }
}

// ---- driver -----------------------------------------------------------------

template <int MR, int NR>
void store_tile(const LinearArgs& a, int64_t m, int64_t n0, int64_t n_end, float (&out)[MR][NR]) {
  for (int i = 0; i < MR; ++i) {
    const int64_t row = m + i;
    for (int j = 0; j < NR && n0 + j < n_end; ++j) {
      const int64_t col = n0 + j;
      float v = out[i][j];
      if (a.kind == Kind::int8_row) v *= a.act.scales[row * a.act.scales_stride];
      if (a.kind == Kind::int8_block || a.kind == Kind::int8_row) v *= a.w_scale[col];
      if (a.bias) v += a.bias[col];
      if (a.y_dtype == Dtype::f32)
        static_cast<float*>(a.y)[row * a.N + col] = v;
      else
        static_cast<uint16_t*>(a.y)[row * a.N + col] = float_to_bf16(v);
    }
  }
}

// Columns of a tile past N repeat the last valid weight row (their results are dropped),
// so every tile runs the same fully unrolled code.
template <class Isa, Kind K, int MR, int NR>
void run_tile(const LinearArgs& a, int64_t m, int64_t n0, int64_t n_end) {
  int64_t n[NR];
  for (int j = 0; j < NR; ++j) n[j] = min64(n0 + j, a.N - 1);
  float out[MR][NR];
  Isa::template tile<K, MR, NR>(a, m, n, out);
  if (K == Kind::int4) add_min_term<MR, NR>(a, m, n, out);
  store_tile<MR, NR>(a, m, n0, n_end, out);
}

// Rows of activations handled per pass over a weight tile: their codes stay in L2
// while the tile (NR weight rows) stays in L1.
constexpr int64_t kRowsPerPass = 64;

template <class Isa, Kind K>
void gemm_kind(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int NR = Isa::kNR;
  if (a.M == 1) {  // decode: stream weight rows, NR at a time
    for (int64_t n = n0; n < n1; n += Isa::kNR1) run_tile<Isa, K, 1, Isa::kNR1>(a, 0, n, n1);
    return;
  }
  for (int64_t p0 = 0; p0 < a.M; p0 += kRowsPerPass) {
    const int64_t p1 = min64(a.M, p0 + kRowsPerPass);
    for (int64_t n = n0; n < n1; n += NR) {
      int64_t m = p0;
      for (; m + 4 <= p1; m += 4) run_tile<Isa, K, 4, NR>(a, m, n, n1);
      if (m + 2 <= p1) {
        run_tile<Isa, K, 2, NR>(a, m, n, n1);
        m += 2;
      }
      if (m < p1) run_tile<Isa, K, 1, NR>(a, m, n, n1);
    }
  }
}

template <class Isa>
void gemm(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.kind) {
    case Kind::int8_block:
      return gemm_kind<Isa, Kind::int8_block>(a, n0, n1);
    case Kind::int8_row:
      return gemm_kind<Isa, Kind::int8_row>(a, n0, n1);
    case Kind::int4:
      return gemm_kind<Isa, Kind::int4>(a, n0, n1);
    case Kind::int8_g32:
      return gemm_kind<Isa, Kind::int8_g32>(a, n0, n1);
  }
}

}  // namespace
}  // namespace qs
