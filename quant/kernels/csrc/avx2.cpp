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

#include "qs_decode_impl.h"

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
  // kG32: one fp16 weight scale per 32-block (int8_g32) folded into the block's float multiply.
  template <int MR, int NR, bool kPerRow, bool kG32>
  static void int8_tile(const LinearArgs& a, int64_t m, const int64_t* n, float (&out)[MR][NR]) {
    const int8_t* x[MR];
    const float* xs[MR];
    const int8_t* w[NR];
    for (int i = 0; i < MR; ++i) {
      x[i] = reinterpret_cast<const int8_t*>(a.act.codes + (m + i) * a.act.k_pad);
      xs[i] = a.act.scales + (m + i) * a.act.scales_stride;
    }
    for (int j = 0; j < NR; ++j) w[j] = a.w_int8 + n[j] * a.K;
    const int64_t w_blocks = a.K / kBlock;  // int8_g32 needs K % 32 == 0 (checked by its op)
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
      __m256 wd[NR];
      if (kG32)
        for (int j = 0; j < NR; ++j) wd[j] = _mm256_set1_ps(half_to_float(a.scales[n[j] * w_blocks + k0 / kBlock]));
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
            acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), kG32 ? _mm256_mul_ps(s, wd[j]) : s, acc[i][j]);
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
      int8_tile<MR, NR, K == Kind::int8_row, K == Kind::int8_g32>(a, m, n, out);
  }

  // ---- decode step: packed tiles of 16 rows as two halves of 8 (bytes [0, 32) and [32, 64)
  // of every 64-byte step), one int32/float lane per output row --------------------------------
  static constexpr int kMaxRows = 2;  // activation rows per pass over a tile (16 ymm registers)

  // Row-major float32 weights, 4 rows x MR activations per pass, one reduction per output.
  template <int MR>
  static void f32_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                        int64_t ldy) {
    const int64_t K = w.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * K;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t r0 = 0; r0 < kTile; r0 += 4) {
        const int64_t n0 = t * kTile + r0;
        const float* wr[4];
        for (int j = 0; j < 4; ++j) wr[j] = w.f32 + min64(n0 + j, w.N - 1) * K;
        __m256 acc[MR][4];
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
          __m256 wv[4];
          for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(wr[j] + k);
          for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_loadu_ps(x[i] + k);
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_fmadd_ps(wv[j], xv, acc[i][j]);
          }
        }
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < 4; ++j)
            y[(m0 + i) * ldy + (t - t0) * kTile + r0 + j] = n0 + j < w.N ? hsum(acc[i][j]) : 0.0f;
      }
    }
  }

  // int8 x int8 with the sign trick of int8_tile: |w| * (x * sign(w)) == x * w; taking |.| of the
  // weights keeps w = -128 exact too (|x| <= 127, so pairs stay below 2 * 128 * 127 < 2^15).
  // kG32: one fp16 scale per row and block (header); else one float32 scale per row at the end.
  template <int MR, bool kG32>
  static void int8_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                         int64_t ldy) {
    const int64_t K = w.K, blocks = K / kBlock;
    const int8_t* x[MR];
    const float* xs[MR];
    for (int i = 0; i < MR; ++i) {
      x[i] = a.codes + (m0 + i) * K;
      xs[i] = a.scales + (m0 + i) * blocks;
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint8_t* codes = tile + w.header_bytes;
      __m256 acc[MR][2];
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* cb = codes + b * (kBlock * kTile);
        __m256i dot[MR][2];
        for (int i = 0; i < MR; ++i) dot[i][0] = dot[i][1] = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          prefetch_ahead(cb + 64 * c);
          __m256i v[2], va[2];
          for (int h = 0; h < 2; ++h) {
            v[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + 64 * c + 32 * h));
            va[h] = _mm256_abs_epi8(v[h]);
          }
          for (int i = 0; i < MR; ++i) {
            const __m256i xb = _mm256_set1_epi32(load_i32(x[i] + b * kBlock + 4 * c));
            for (int h = 0; h < 2; ++h)
              dot[i][h] = _mm256_add_epi32(
                  dot[i][h], _mm256_madd_epi16(_mm256_maddubs_epi16(va[h], _mm256_sign_epi8(xb, v[h])), ones));
          }
        }
        __m256 wd[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        if (kG32)
          for (int h = 0; h < 2; ++h)
            wd[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + b * 2 * kTile + 16 * h)));
        for (int i = 0; i < MR; ++i) {
          const __m256 s = _mm256_set1_ps(xs[i][b]);
          for (int h = 0; h < 2; ++h)
            acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][h]), kG32 ? _mm256_mul_ps(wd[h], s) : s, acc[i][h]);
        }
      }
      for (int h = 0; h < 2; ++h) {
        if (!kG32) {
          const __m256 ws = _mm256_loadu_ps(reinterpret_cast<const float*>(tile) + 8 * h);
          for (int i = 0; i < MR; ++i) acc[i][h] = _mm256_mul_ps(acc[i][h], ws);
        }
        for (int i = 0; i < MR; ++i) _mm256_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile + 8 * h, acc[i][h]);
      }
    }
  }

  // 4-bit codes: per 8 inputs one 64-byte step (low nibbles = inputs k..k+3 of each row, high
  // nibbles = k+4..k+7). The int16 pairs of a whole 32-block stay below 2^15 (4 steps x 2 x
  // 2 x 15 x 127 = 30480), so they are widened to int32 once per block.
  template <int MR>
  static void int4_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                         int64_t ldy) {
    const int64_t K = w.K, blocks = K / kBlock, g = w.group_size, groups = K / g, per_group = g / kBlock;
    const int8_t* x[MR];
    const float* xs[MR];
    const float* bs[MR];
    for (int i = 0; i < MR; ++i) {
      x[i] = a.codes + (m0 + i) * K;
      xs[i] = a.scales + (m0 + i) * blocks;
      bs[i] = a.block_sums + (m0 + i) * blocks;
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint16_t* d_half = reinterpret_cast<const uint16_t*>(tile);
      const uint16_t* min_half = d_half + groups * kTile;
      const uint8_t* codes = tile + w.header_bytes;
      __m256 acc[MR][2];
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      for (int64_t gi = 0; gi < groups; ++gi) {
        __m256 d[2];
        for (int h = 0; h < 2; ++h)
          d[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d_half + gi * kTile + 8 * h)));
        for (int64_t bb = 0; bb < per_group; ++bb) {
          const int64_t b = gi * per_group + bb;
          const uint8_t* cb = codes + b * (kBlock * kTile / 2);
          __m256i pairs[MR][2];
          for (int i = 0; i < MR; ++i) pairs[i][0] = pairs[i][1] = _mm256_setzero_si256();
          for (int c = 0; c < 4; ++c) {
            prefetch_ahead(cb + 64 * c);
            __m256i lo[2], hi[2];
            for (int h = 0; h < 2; ++h) {
              const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + 64 * c + 32 * h));
              lo[h] = _mm256_and_si256(v, low4);
              hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            }
            for (int i = 0; i < MR; ++i) {
              const int8_t* xp = x[i] + b * kBlock + 8 * c;
              const __m256i xl = _mm256_set1_epi32(load_i32(xp)), xh = _mm256_set1_epi32(load_i32(xp + 4));
              for (int h = 0; h < 2; ++h)
                pairs[i][h] = _mm256_add_epi16(
                    pairs[i][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh)));
            }
          }
          for (int i = 0; i < MR; ++i) {
            const __m256 s = _mm256_set1_ps(xs[i][b]);
            for (int h = 0; h < 2; ++h)
              acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[i][h], ones)),
                                          _mm256_mul_ps(d[h], s), acc[i][h]);
          }
        }
        for (int i = 0; i < MR; ++i) {
          float group_sum = 0.0f;
          for (int64_t bb = 0; bb < per_group; ++bb) group_sum += bs[i][gi * per_group + bb];
          const __m256 gs = _mm256_set1_ps(group_sum);
          for (int h = 0; h < 2; ++h) {
            const __m256 mn =
                _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(min_half + gi * kTile + 8 * h)));
            acc[i][h] = _mm256_fmadd_ps(mn, gs, acc[i][h]);
          }
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile + 8 * h, acc[i][h]);
    }
  }

  // fp8 codes (one input of 16 rows per 16 bytes) widened to float32 (qs_kernels.h) and
  // multiplied in fp32. Two accumulators per row and half (inputs of even and odd position).
  template <int MR, bool kE4M3>
  static void fp8_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                        int64_t ldy) {
    const int64_t K = w.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * K;
    const __m256i e4m3_bits = _mm256_set1_epi16(static_cast<short>(0xbf80));
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint8_t* codes = tile + w.header_bytes;
      __m256 acc[MR][2][2];  // [row][half][input parity]
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h) acc[i][h][0] = acc[i][h][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 4) {  // K % 32 == 0; four inputs a step, their parity static
        const uint8_t* line = codes + k * kTile;
        prefetch_ahead(line);
        for (int j = 0; j < 4; ++j) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + kTile * j));
          const __m256i h16 = kE4M3 ? _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(v), 7), e4m3_bits)
                                    : _mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 8);
          const __m256 w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h16));
          const __m256 w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h16, 1));
          for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_broadcast_ss(x[i] + k + j);
            acc[i][0][j & 1] = _mm256_fmadd_ps(w0, xv, acc[i][0][j & 1]);
            acc[i][1][j & 1] = _mm256_fmadd_ps(w1, xv, acc[i][1][j & 1]);
          }
        }
      }
      const float* ws = reinterpret_cast<const float*>(tile);
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile + 8 * h,
                           _mm256_mul_ps(_mm256_add_ps(acc[i][h][0], acc[i][h][1]), _mm256_loadu_ps(ws + 8 * h)));
    }
  }

  // f16 / bf16 weights (one input of 16 rows per 32 bytes) widened exactly to float32 and
  // multiplied in fp32, accumulators as fp8_tiles; no scale.
  template <int MR, bool kBF16>
  static void half_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                         int64_t ldy) {
    const int64_t K = w.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * K;
    auto widen = [](const uint8_t* p) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return kBF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)) : _mm256_cvtph_ps(v);
    };
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* codes = w.data + t * w.tile_bytes + w.header_bytes;
      __m256 acc[MR][2][2];  // [row][half][input parity]
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h) acc[i][h][0] = acc[i][h][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 4) {  // K % 32 == 0; four inputs a step, their parity static
        const uint8_t* lines = codes + k * kTile * 2;
        prefetch_ahead(lines);
        prefetch_ahead(lines + 64);
        for (int j = 0; j < 4; ++j) {
          const __m256 w0 = widen(lines + 32 * j), w1 = widen(lines + 32 * j + 16);
          for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_broadcast_ss(x[i] + k + j);
            acc[i][0][j & 1] = _mm256_fmadd_ps(w0, xv, acc[i][0][j & 1]);
            acc[i][1][j & 1] = _mm256_fmadd_ps(w1, xv, acc[i][1][j & 1]);
          }
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile + 8 * h, _mm256_add_ps(acc[i][h][0], acc[i][h][1]));
    }
  }

  // nf4: the int4 tile layout; each nibble looks up its level's coarse and fine int8 parts
  // (qs_kernels.h) with vpshufb, multiplied with the sign trick of int8_tiles (|w| * (x * sign(w))).
  template <int MR>
  static void nf4_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                        int64_t ldy) {
    const int64_t K = w.K, blocks = K / kBlock, per_group = w.group_size / kBlock;
    const int8_t* x[MR];
    const float* xs[MR];
    for (int i = 0; i < MR; ++i) {
      x[i] = a.codes + (m0 + i) * K;
      xs[i] = a.scales + (m0 + i) * blocks;
    }
    const __m256i coarse = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.nf4_coarse)));
    const __m256i fine = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.nf4_fine)));
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256 fine_weight = _mm256_set1_ps(1.0f / 254.0f), inv_127 = _mm256_set1_ps(1.0f / 127.0f);
    auto dot = [&](__m256i acc, __m256i w_abs, __m256i w_signed, __m256i xb) {
      return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xb, w_signed)), ones));
    };
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint16_t* absmax = reinterpret_cast<const uint16_t*>(tile);
      const uint8_t* codes = tile + w.header_bytes;
      __m256 acc[MR][2];
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const uint16_t* ab = absmax + (b / per_group) * kTile;
        const uint8_t* cb = codes + b * (kBlock * kTile / 2);
        __m256i dc[MR][2], df[MR][2];
        for (int i = 0; i < MR; ++i)
          for (int h = 0; h < 2; ++h) dc[i][h] = df[i][h] = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          prefetch_ahead(cb + 64 * c);
          __m256i cl[2], ch[2], fl[2], fh[2];
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + 64 * c + 32 * h));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            cl[h] = _mm256_shuffle_epi8(coarse, lo);
            ch[h] = _mm256_shuffle_epi8(coarse, hi);
            fl[h] = _mm256_shuffle_epi8(fine, lo);
            fh[h] = _mm256_shuffle_epi8(fine, hi);
          }
          for (int i = 0; i < MR; ++i) {
            const int8_t* xp = x[i] + b * kBlock + 8 * c;
            const __m256i xl = _mm256_set1_epi32(load_i32(xp)), xh = _mm256_set1_epi32(load_i32(xp + 4));
            for (int h = 0; h < 2; ++h) {
              dc[i][h] = dot(dot(dc[i][h], _mm256_abs_epi8(cl[h]), cl[h], xl), _mm256_abs_epi8(ch[h]), ch[h], xh);
              df[i][h] = dot(dot(df[i][h], _mm256_abs_epi8(fl[h]), fl[h], xl), _mm256_abs_epi8(fh[h]), fh[h], xh);
            }
          }
        }
        for (int h = 0; h < 2; ++h) {
          const __m256 d = _mm256_mul_ps(
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ab + 8 * h))), inv_127);
          for (int i = 0; i < MR; ++i) {
            // coarse + fine / 254: the block's dot product with the levels x 127
            const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(df[i][h]), fine_weight, _mm256_cvtepi32_ps(dc[i][h]));
            acc[i][h] = _mm256_fmadd_ps(v, _mm256_mul_ps(d, _mm256_set1_ps(xs[i][b])), acc[i][h]);
          }
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile + 8 * h, acc[i][h]);
    }
  }
};

// fp8 codes widened to fp16 bits with the tiles' integer trick (qs_kernels.h), 8 at a time.
void fp8_row(const uint8_t* codes, int64_t K, float scale, bool e4m3, const float* values, float* out) {
  const __m256 s = _mm256_set1_ps(e4m3 ? scale * 256.0f : scale);
  const __m128i e4m3_bits = _mm_set1_epi16(static_cast<short>(0xbf80));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k));
    const __m128i h = e4m3 ? _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(v), 7), e4m3_bits)
                           : _mm_slli_epi16(_mm_cvtepu8_epi16(v), 8);
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtph_ps(h), s));
  }
  fp8_row_tail(codes, k, K, scale, values, out);
}

// 8 NF4 codes (4 bytes) -> 8 levels: vpermps on each half of the 16-level table, bit 3 picks.
void nf4_row(const uint8_t* packed, int64_t K, const uint16_t* absmax, int64_t block, const float* levels,
             float* out) {
  const __m256 low_levels = _mm256_loadu_ps(levels), high_levels = _mm256_loadu_ps(levels + 8);
  const __m128i low4 = _mm_set1_epi8(0x0f);
  int64_t k = 0;
  if (block % 8 == 0) {
    for (; k + 8 <= K; k += 8) {
      int32_t four;
      __builtin_memcpy(&four, packed + k / 2, 4);
      const __m128i b = _mm_cvtsi32_si128(four);
      const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
      const __m256 value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_levels, idx),
                                            _mm256_permutevar8x32_ps(high_levels, idx),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
      _mm256_storeu_ps(out + k, _mm256_mul_ps(value, _mm256_set1_ps(_cvtsh_ss(absmax[k / block]))));
    }
  }
  nf4_row_tail(packed, k, K, absmax, block, levels, out);
}

}  // namespace

const KernelTable* avx2_table() {
  static const KernelTable table{"avx2",           &quantize<Avx2>, &gemm<Avx2>,  &quantize_row_impl,
                                 &packed_gemv<Avx2>, &rms_norm_impl,  &silu_mul_impl, &attend_impl,
                                 &fp8_row,          &nf4_row};
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
