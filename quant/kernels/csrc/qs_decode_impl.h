// Code shared by the ISA units for the native decode step: activation quantization of one
// row, RMSNorm, SiLU·mul, one attention head, and the driver of the packed GEMV kernels.
// Included by avx2.cpp and avx512.cpp after qs_impl.h (same rules: internal linkage, AVX2 +
// FMA + F16C intrinsics only; the AVX-512 unit adds its own tile kernels).
#pragma once

#include <immintrin.h>

#include "qs_impl.h"

namespace qs {
namespace {

// ---- one activation row ------------------------------------------------------

// Same codes and scales as quantize_rows (per 32-block, division by the scale, round half to
// even), plus each block's float sum (int4 min term) and code sum (unsigned-operand offset).
inline void quantize_row_impl(const float* x, int64_t K, int8_t* codes, float* scales, float* block_sums,
                              int32_t* code_sums, bool per_row, float fixed_scale) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  float row_absmax = 0.0f;
  const bool fixed = per_row && fixed_scale > 0.0f;  // W8A8 static: no pass over the row for its absmax
  if (per_row && !fixed)
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const float m = block_absmax(x + b * kBlock);
      row_absmax = m > row_absmax ? m : row_absmax;
    }
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* buf = x + b * kBlock;
    const float scale = fixed ? fixed_scale : scale_of(per_row ? row_absmax : block_absmax(buf));
    scales[b] = scale;
    block_sums[b] = block_sum(buf);
    const __m256i q = quantize_block(buf, scale);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + b * kBlock), q);
    // sum of signed codes = sum of (code + 128) as bytes - 32 * 128
    const __m256i sad = _mm256_sad_epu8(_mm256_xor_si256(q, flip), _mm256_setzero_si256());
    const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sad), _mm256_extracti128_si256(sad, 1));
    code_sums[b] = static_cast<int32_t>(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1)) - 32 * 128;
  }
}

// ---- elementwise ---------------------------------------------------------------

// e^x in float32 within ~2 ulp (Cody-Waite reduction, Cephes polynomial); inputs are clamped
// to [-87.34, 88.38], so e^-1000 gives ~1e-38 instead of 0 (harmless in softmax and SiLU).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447505531f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // n in [-126, 128]: 2^n split as 2^(n/2) * 2^(n - n/2) so that n = 128 stays finite
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 b = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}

inline float exp_scalar(float x) {
  alignas(32) float v[8] = {x};
  _mm256_store_ps(v, exp_ps(_mm256_load_ps(v)));
  return v[0];
}

inline void rms_norm_impl(const float* x, const float* w, int64_t n, float eps, float* out) {
  __m256 ss = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  float sum = hsum(ss);
  for (; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.0f / __builtin_sqrtf(sum / static_cast<float>(n) + eps);
  const __m256 vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) out[i] = x[i] * inv * w[i];
}

inline void silu_mul_impl(const float* gate, const float* up, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_xor_ps(g, sign))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + exp_scalar(-gate[i])) * up[i];
}

// ---- attention, one query head -------------------------------------------------

// head_dim % 8 == 0 (the decoder asks for % 16).
inline void attend_impl(const float* q, const float* keys, const float* values, int64_t length, int64_t head_dim,
                        float scale, float* scores, float* out) {
  // scores, one horizontal sum per key (cheap next to the weights at decode lengths)
  float best = -__builtin_inff();
  for (int64_t j = 0; j < length; ++j) {
    const float* k = keys + j * head_dim;
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    for (int64_t d = 8; d < head_dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    const float s = hsum(acc) * scale;
    scores[j] = s;
    best = s > best ? s : best;
  }
  // softmax
  const __m256 vbest = _mm256_set1_ps(best);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= length; j += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vbest));
    _mm256_storeu_ps(scores + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; j < length; ++j) {
    scores[j] = exp_scalar(scores[j] - best);
    sum += scores[j];
  }
  const float inv = 1.0f / sum;
  // out = sum_j p_j v_j, 32 dimensions per pass kept in registers
  for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
    const int64_t width = min64(32, head_dim - d0);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t jj = 0; jj < length; ++jj) {
      const __m256 p = _mm256_set1_ps(scores[jj] * inv);
      const float* v = values + jj * head_dim + d0;
      for (int c = 0; c < 4; ++c)
        if (8 * c < width) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
    for (int c = 0; c < 4; ++c)
      if (8 * c < width) _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
  }
}

// ---- de-quantization rows: scalar tails shared by the ISA units -------------------

inline void fp8_row_tail(const uint8_t* codes, int64_t k, int64_t K, float scale, const float* values, float* out) {
  for (; k < K; ++k) out[k] = values[codes[k]] * scale;
}

inline void nf4_row_tail(const uint8_t* packed, int64_t k, int64_t K, const uint16_t* absmax, int64_t block,
                         const float* levels, float* out) {
  for (; k < K; k += 2) {
    const uint8_t byte = packed[k / 2];
    const float a = _cvtsh_ss(absmax[k / block]);
    out[k] = levels[byte & 15] * a;
    out[k + 1] = levels[byte >> 4] * a;
  }
}

// ---- packed GEMV driver --------------------------------------------------------

// Rows of activations go through the ISA's tile kernels up to kMaxRows at a time; every row
// sees the same sequence of operations whatever the batch, so batched results equal single ones.
template <class Isa, int MR>
void gemv_rows(const PackedMatrix& w, const DecodeActs& a, int64_t m, int64_t t0, int64_t t1, float* y,
               int64_t ldy) {
  switch (w.kind) {
    case PackKind::f32:
      return Isa::template f32_tiles<MR>(w, a, m, t0, t1, y, ldy);
    case PackKind::int8:
      return Isa::template int8_tiles<MR, false>(w, a, m, t0, t1, y, ldy);
    case PackKind::int8_g32:
      return Isa::template int8_tiles<MR, true>(w, a, m, t0, t1, y, ldy);
    case PackKind::int4:
      return Isa::template int4_tiles<MR>(w, a, m, t0, t1, y, ldy);
    case PackKind::fp8_e4m3:
      return Isa::template fp8_tiles<MR, true>(w, a, m, t0, t1, y, ldy);
    case PackKind::fp8_e5m2:
      return Isa::template fp8_tiles<MR, false>(w, a, m, t0, t1, y, ldy);
    case PackKind::nf4:
      return Isa::template nf4_tiles<MR>(w, a, m, t0, t1, y, ldy);
    case PackKind::f16:
      return Isa::template half_tiles<MR, false>(w, a, m, t0, t1, y, ldy);
    case PackKind::bf16:
      return Isa::template half_tiles<MR, true>(w, a, m, t0, t1, y, ldy);
  }
}

template <class Isa>
void packed_gemv(const PackedMatrix& w, const DecodeActs& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  constexpr int R = Isa::kMaxRows;
  int64_t m = 0;
  while (m < a.M) {
    const int64_t left = a.M - m;
    if (left >= R) {
      gemv_rows<Isa, R>(w, a, m, t0, t1, y, ldy);
      m += R;
    } else if (R > 3 && left == 3) {
      gemv_rows<Isa, (R > 3 ? 3 : 1)>(w, a, m, t0, t1, y, ldy);
      m += 3;
    } else if (R > 2 && left >= 2) {
      gemv_rows<Isa, (R > 2 ? 2 : 1)>(w, a, m, t0, t1, y, ldy);
      m += 2;
    } else {
      gemv_rows<Isa, 1>(w, a, m, t0, t1, y, ldy);
      m += 1;
    }
  }
}

// Software prefetch distance of the packed kernels: each 64-byte step of a tile also asks for
// the line this far ahead. A work item is a fresh stream for the hardware prefetcher; this keeps
// lines in flight from the item's first step on. Measured on a 2-core Sapphire Rapids, cold
// weights: int4 +10-20% GB/s, int8 +5-12% against none; 1 KiB and 4 KiB no better. The float32
// kernels do without (the hardware prefetcher keeps up with their plain rows).
#ifndef QS_PREFETCH_BYTES
#define QS_PREFETCH_BYTES 2048
#endif
constexpr int64_t kPrefetchBytes = QS_PREFETCH_BYTES;

inline void prefetch_ahead(const uint8_t* p) {
  if (kPrefetchBytes > 0) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

}  // namespace
}  // namespace qs
