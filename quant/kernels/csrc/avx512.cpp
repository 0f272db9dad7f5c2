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

#include "qs_decode_impl.h"

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

  // Two fp16 weight scales (blocks b, b+1; `count` of them valid) spread like scales_2.
  static __m512 half_scales_2(const uint16_t* p, int64_t count) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(load_halves(p, count)));
  }

  // kG32: one fp16 weight scale per 32-block (int8_g32) folded into the blocks' float multiply.
  template <int MR, int NR, bool kPerRow, bool kG32>
  static void int8_tile(const LinearArgs& a, int64_t m, const int64_t* n, float (&out)[MR][NR]) {
    const uint8_t* x[MR];
    const float* xs[MR];
    const int8_t* w[NR];
    for (int i = 0; i < MR; ++i) {
      x[i] = a.act.codes + (m + i) * a.act.k_pad;
      xs[i] = a.act.scales + (m + i) * a.act.scales_stride;
    }
    for (int j = 0; j < NR; ++j) w[j] = a.w_int8 + n[j] * a.K;
    const int64_t w_blocks = a.K / kBlock;  // int8_g32 needs K % 32 == 0 (checked by its op)
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
      __m512 wd[NR];
      if (kG32)
        for (int j = 0; j < NR; ++j)
          wd[j] = half_scales_2(a.scales + n[j] * w_blocks + k0 / kBlock, min64(2, w_blocks - k0 / kBlock));
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
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), kG32 ? _mm512_mul_ps(s, wd[j]) : s, acc[i][j]);
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
      int8_tile<MR, NR, K == Kind::int8_row, K == Kind::int8_g32>(a, m, n, out);
  }

  // ---- decode step: packed tiles of 16 rows, one int32/float lane per output row ----------
  static constexpr int kMaxRows = 4;  // activation rows per pass over a tile

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
        __m512 acc[MR][4];
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
          __m512 wv[4];
          for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_ps(wr[j] + k);
          for (int i = 0; i < MR; ++i) {
            const __m512 xv = _mm512_loadu_ps(x[i] + k);
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
          }
        }
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < 4; ++j)
            y[(m0 + i) * ldy + (t - t0) * kTile + r0 + j] = n0 + j < w.N ? _mm512_reduce_add_ps(acc[i][j]) : 0.0f;
      }
    }
  }

  // int8 weights, stored signed and flipped to w + 128 for vpdpbusd's unsigned operand; the
  // excess 128 * sum(x codes) of each block is subtracted exactly, in int32.
  // kG32: one fp16 scale per row and block (header); else one float32 scale per row at the end.
  template <int MR, bool kG32>
  static void int8_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                         int64_t ldy) {
    const int64_t K = w.K, blocks = K / kBlock;
    const int8_t* x[MR];
    const float* xs[MR];
    const int32_t* cs[MR];
    for (int i = 0; i < MR; ++i) {
      x[i] = a.codes + (m0 + i) * K;
      xs[i] = a.scales + (m0 + i) * blocks;
      cs[i] = a.code_sums + (m0 + i) * blocks;
    }
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint8_t* codes = tile + w.header_bytes;
      __m512 acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* cb = codes + b * (kBlock * kTile);
        __m512i dot[MR];
        for (int i = 0; i < MR; ++i) dot[i] = _mm512_setzero_si512();
        for (int c = 0; c < 8; ++c) {
          prefetch_ahead(cb + 64 * c);
          const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(cb + 64 * c), flip);
          for (int i = 0; i < MR; ++i)
            dot[i] = _mm512_dpbusd_epi32(dot[i], v, _mm512_set1_epi32(load_i32(x[i] + b * kBlock + 4 * c)));
        }
        __m512 wd = _mm512_setzero_ps();
        if (kG32) wd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + b * 2 * kTile)));
        for (int i = 0; i < MR; ++i) {
          const __m512i exact = _mm512_sub_epi32(dot[i], _mm512_set1_epi32(128 * cs[i][b]));
          const __m512 s = _mm512_set1_ps(xs[i][b]);
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), kG32 ? _mm512_mul_ps(wd, s) : s, acc[i]);
        }
      }
      if (!kG32) {
        const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(tile));
        for (int i = 0; i < MR; ++i) acc[i] = _mm512_mul_ps(acc[i], ws);
      }
      for (int i = 0; i < MR; ++i) _mm512_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile, acc[i]);
    }
  }

  // 4-bit codes: per 8 inputs one 64-byte step, low nibbles = inputs k..k+3 of each row,
  // high nibbles = k+4..k+7; two vpdpbusd against the broadcast activation quads. The high
  // nibbles stay in place (v & 0xf0 = 16 x code) in their own accumulator, divided by 16 once
  // per block: exact (a block's sum is below 4 x 2 x 240 x 127 x 16 < 2^31 and a multiple of 16)
  // and one instruction per step cheaper than shifting every step.
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
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint16_t* d_half = reinterpret_cast<const uint16_t*>(tile);
      const uint16_t* min_half = d_half + groups * kTile;
      const uint8_t* codes = tile + w.header_bytes;
      __m512 acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t gi = 0; gi < groups; ++gi) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d_half + gi * kTile)));
        for (int64_t bb = 0; bb < per_group; ++bb) {
          const int64_t b = gi * per_group + bb;
          const uint8_t* cb = codes + b * (kBlock * kTile / 2);
          __m512i dot[MR], dot16[MR];
          for (int i = 0; i < MR; ++i) dot[i] = dot16[i] = _mm512_setzero_si512();
          for (int c = 0; c < 4; ++c) {
            prefetch_ahead(cb + 64 * c);
            const __m512i v = _mm512_loadu_si512(cb + 64 * c);
            const __m512i lo = _mm512_and_si512(v, low4);
            const __m512i hi16 = _mm512_andnot_si512(low4, v);
            for (int i = 0; i < MR; ++i) {
              const int8_t* xp = x[i] + b * kBlock + 8 * c;
              dot[i] = _mm512_dpbusd_epi32(dot[i], lo, _mm512_set1_epi32(load_i32(xp)));
              dot16[i] = _mm512_dpbusd_epi32(dot16[i], hi16, _mm512_set1_epi32(load_i32(xp + 4)));
            }
          }
          for (int i = 0; i < MR; ++i) {
            const __m512i sum = _mm512_add_epi32(dot[i], _mm512_srai_epi32(dot16[i], 4));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(xs[i][b])), acc[i]);
          }
        }
        // min term: min[row, g] * (sum of x over the group)
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(min_half + gi * kTile)));
        for (int i = 0; i < MR; ++i) {
          float group_sum = 0.0f;
          for (int64_t bb = 0; bb < per_group; ++bb) group_sum += bs[i][gi * per_group + bb];
          acc[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(group_sum), acc[i]);
        }
      }
      for (int i = 0; i < MR; ++i) _mm512_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile, acc[i]);
    }
  }

  // fp8 codes (one input of 16 rows per 16 bytes) widened to float32 and multiplied in fp32:
  // the weights are exact, nothing is rounded but the sums. Four accumulators per row (one per
  // input of a 64-byte line) hide the FMA latency; the same four for any number of rows.
  template <int MR, bool kE4M3>
  static void fp8_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                        int64_t ldy) {
    const int64_t K = w.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * K;
    // 16 codes -> 16 fp16 bit patterns on 256-bit registers (three ports, not two), then widened
    const __m256i e4m3_bits = _mm256_set1_epi16(static_cast<short>(0xbf80));
    auto widen = [&](const uint8_t* p) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m256i h = kE4M3 ? _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(v), 7), e4m3_bits)
                              : _mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 8);
      return _mm512_cvtph_ps(h);
    };
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint8_t* codes = tile + w.header_bytes;
      __m512 acc[MR][4];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 4) {
        const uint8_t* line = codes + k * kTile;
        prefetch_ahead(line);
        const __m512 wv[4] = {widen(line), widen(line + 16), widen(line + 32), widen(line + 48)};
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], _mm512_set1_ps(x[i][k + j]), acc[i][j]);
      }
      const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(tile));
      for (int i = 0; i < MR; ++i) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
        _mm512_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile, _mm512_mul_ps(sum, ws));
      }
    }
  }

  // f16 / bf16 weights (one input of 16 rows per 32 bytes) widened exactly to float32 and
  // multiplied in fp32, four accumulators per row as fp8_tiles; no scale.
  template <int MR, bool kBF16>
  static void half_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                         int64_t ldy) {
    const int64_t K = w.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * K;
    auto widen = [](const uint8_t* p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return kBF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)) : _mm512_cvtph_ps(v);
    };
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* codes = w.data + t * w.tile_bytes + w.header_bytes;
      __m512 acc[MR][4];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 4) {
        const uint8_t* lines = codes + k * kTile * 2;
        prefetch_ahead(lines);
        prefetch_ahead(lines + 64);
        const __m512 wv[4] = {widen(lines), widen(lines + 32), widen(lines + 64), widen(lines + 96)};
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], _mm512_set1_ps(x[i][k + j]), acc[i][j]);
      }
      for (int i = 0; i < MR; ++i)
        _mm512_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile,
                         _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3])));
    }
  }

  // nf4: the int4 tile layout; each nibble looks up its level's coarse and fine int8 parts
  // (qs_kernels.h) with vpshufb, stored + 128 as vpdpbusd's unsigned operand, and the
  // 128 * sum(x codes) excess of each block is subtracted exactly. Lows and highs accumulate
  // apart (four independent chains per row).
  template <int MR>
  static void nf4_tiles(const PackedMatrix& w, const DecodeActs& a, int64_t m0, int64_t t0, int64_t t1, float* y,
                        int64_t ldy) {
    const int64_t K = w.K, blocks = K / kBlock, per_group = w.group_size / kBlock;
    const int8_t* x[MR];
    const float* xs[MR];
    const int32_t* cs[MR];
    for (int i = 0; i < MR; ++i) {
      x[i] = a.codes + (m0 + i) * K;
      xs[i] = a.scales + (m0 + i) * blocks;
      cs[i] = a.code_sums + (m0 + i) * blocks;
    }
    alignas(16) uint8_t coarse_u8[16], fine_u8[16];
    for (int c = 0; c < 16; ++c) {
      coarse_u8[c] = static_cast<uint8_t>(w.nf4_coarse[c] + 128);
      fine_u8[c] = static_cast<uint8_t>(w.nf4_fine[c] + 128);
    }
    const __m512i coarse = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(coarse_u8)));
    const __m512i fine = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(fine_u8)));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512 fine_weight = _mm512_set1_ps(1.0f / 254.0f), inv_127 = _mm512_set1_ps(1.0f / 127.0f);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w.data + t * w.tile_bytes;
      const uint16_t* absmax = reinterpret_cast<const uint16_t*>(tile);
      const uint8_t* codes = tile + w.header_bytes;
      __m512 acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const __m512 d = _mm512_mul_ps(
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(absmax + (b / per_group) * kTile))),
            inv_127);
        const uint8_t* cb = codes + b * (kBlock * kTile / 2);
        __m512i dc_lo[MR], dc_hi[MR], df_lo[MR], df_hi[MR];
        for (int i = 0; i < MR; ++i) dc_lo[i] = dc_hi[i] = df_lo[i] = df_hi[i] = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c) {
          prefetch_ahead(cb + 64 * c);
          const __m512i v = _mm512_loadu_si512(cb + 64 * c);
          const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          const __m512i c_lo = _mm512_shuffle_epi8(coarse, lo), c_hi = _mm512_shuffle_epi8(coarse, hi);
          const __m512i f_lo = _mm512_shuffle_epi8(fine, lo), f_hi = _mm512_shuffle_epi8(fine, hi);
          for (int i = 0; i < MR; ++i) {
            const int8_t* xp = x[i] + b * kBlock + 8 * c;
            const __m512i xl = _mm512_set1_epi32(load_i32(xp)), xh = _mm512_set1_epi32(load_i32(xp + 4));
            dc_lo[i] = _mm512_dpbusd_epi32(dc_lo[i], c_lo, xl);
            dc_hi[i] = _mm512_dpbusd_epi32(dc_hi[i], c_hi, xh);
            df_lo[i] = _mm512_dpbusd_epi32(df_lo[i], f_lo, xl);
            df_hi[i] = _mm512_dpbusd_epi32(df_hi[i], f_hi, xh);
          }
        }
        for (int i = 0; i < MR; ++i) {
          const __m512i excess = _mm512_set1_epi32(128 * cs[i][b]);
          const __m512i dc = _mm512_sub_epi32(_mm512_add_epi32(dc_lo[i], dc_hi[i]), excess);
          const __m512i df = _mm512_sub_epi32(_mm512_add_epi32(df_lo[i], df_hi[i]), excess);
          // coarse + fine / 254: the block's dot product with the levels x 127
          const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(df), fine_weight, _mm512_cvtepi32_ps(dc));
          acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(xs[i][b])), acc[i]);
        }
      }
      for (int i = 0; i < MR; ++i) _mm512_storeu_ps(y + (m0 + i) * ldy + (t - t0) * kTile, acc[i]);
    }
  }
};

// fp8 codes widened to fp16 bits with the tiles' integer trick (qs_kernels.h), 16 at a time.
void fp8_row(const uint8_t* codes, int64_t K, float scale, bool e4m3, const float* values, float* out) {
  const __m512 s = _mm512_set1_ps(e4m3 ? scale * 256.0f : scale);
  const __m256i e4m3_bits = _mm256_set1_epi16(static_cast<short>(0xbf80));
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k));
    const __m256i h = e4m3 ? _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(v), 7), e4m3_bits)
                           : _mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 8);
    _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_cvtph_ps(h), s));
  }
  fp8_row_tail(codes, k, K, scale, values, out);
}

// 16 NF4 codes (8 bytes) -> 16 levels with one vpermps over the 16-level table.
void nf4_row(const uint8_t* packed, int64_t K, const uint16_t* absmax, int64_t block, const float* levels,
             float* out) {
  const __m512 table = _mm512_loadu_ps(levels);
  const __m128i low4 = _mm_set1_epi8(0x0f);
  int64_t k = 0;
  if (block % 16 == 0) {
    for (; k + 16 <= K; k += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + k / 2));
      const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
      const __m512 a = _mm512_set1_ps(_cvtsh_ss(absmax[k / block]));
      _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), a));
    }
  }
  nf4_row_tail(packed, k, K, absmax, block, levels, out);
}

}  // namespace

const KernelTable* avx512_table() {
  static const KernelTable table{"avx512vnni",    &quantize<Avx512Vnni>, &gemm<Avx512Vnni>,
                                 &quantize_row_impl, &packed_gemv<Avx512Vnni>, &rms_norm_impl,
                                 &silu_mul_impl,  &attend_impl,         &fp8_row,
                                 &nf4_row};
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
