// Interface between the torch glue (ops.cpp) and the per-ISA kernel translation units.
// Torch-free on purpose: the ISA units are compiled for AVX2 / AVX-512 and must not
// instantiate any inline function that the baseline unit could also pick up (ODR).
#pragma once

#include <cstdint>

namespace qs {

enum class Dtype : int32_t { f32 = 0, bf16 = 1 };

enum class Kind : int32_t {
  int8_block = 0,  // int8 weights, per-channel scale; activations int8 per 32-block
  int8_row = 1,    // int8 weights, per-channel scale; activations int8 per row (W8A8 dynamic)
  int4 = 2,        // packed 4-bit codes with fp16 scale and min per group; activations int8 per 32-block
  int8_g32 = 3,    // int8 weights, one fp16 scale per 32 inputs (llama.cpp's Q8_0); activations int8 per 32-block
};

constexpr int64_t kBlock = 32;  // activation quantization block
constexpr int64_t kKPad = 128;  // quantized activation rows are zero-padded to a multiple of this
// From this many activation rows on (prefill), the weight-only ops are compute-bound: the weight
// is de-quantized once (O(N·K)) and torch's float32 GEMM beats integer dot products with a float
// multiply per 32-block (O(M·N·K/32) float work); the activations are not rounded to int8.
constexpr int64_t kDequantRows = 128;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Activations quantized once per call, shared by every output tile.
struct QuantizedActs {
  uint8_t* codes;  // [M, k_pad]: int8 codes (layout chosen by the ISA unit)
  float* scales;   // [M, scales_stride]: one per 32-block, or one per row (int8_row)
  float* sums;     // [M, groups]: float sum of x over each weight group (int4 only)
  int64_t k_pad;
  int64_t scales_stride;
  int64_t groups;
};

// One linear call y[M, N] = x[M, K] · Wᵀ (+ bias); x rows are `ldx` elements apart.
struct LinearArgs {
  Kind kind;
  const void* x;
  Dtype x_dtype;
  int64_t ldx;
  int64_t M, K, N;
  void* y;  // [M, N] contiguous, y_dtype
  Dtype y_dtype;
  const float* bias;  // [N] or nullptr
  QuantizedActs act;
  const int8_t* w_int8;    // [N, K]
  const float* w_scale;    // [N]
  const uint8_t* packed;   // [N, K / 2]
  const uint16_t* scales;  // [N, K / group_size], fp16 bits (int8_g32: [N, K / 32])
  const uint16_t* mins;    // [N, K / group_size], fp16 bits
  int64_t group_size;
  float act_scale;  // int8_row: > 0 is a calibrated per-tensor scale used for every row (W8A8 static)
};

// ---- the native decode step (decoder.cpp) ------------------------------------------
// Weights are repacked once into tiles of kTile output rows, each tile one contiguous,
// 64-byte aligned run of `tile_bytes` (a header of per-row scales, then the codes), so that
// a decode GEMV streams memory sequentially and keeps one SIMD lane per output row: no
// horizontal sums, and a scale multiply per 32 inputs covers 16 rows at once.
constexpr int64_t kTile = 16;

enum class PackKind : int32_t {
  f32 = 0,       // not repacked: row-major float32 [N, K], read in place
  int8 = 1,      // header float32 scale[16]; then per 4 inputs: int8 w[16 rows][4]
  int4 = 2,      // header fp16 scale[groups][16], fp16 min[groups][16]; then per 8 inputs k..k+7:
                 //   uint8 [16 rows][4], byte i = code(k + i) | code(k + 4 + i) << 4
  int8_g32 = 3,  // header fp16 scale[K / 32][16]; then per 4 inputs: int8 w[16 rows][4]
  fp8_e4m3 = 4,  // header float32 scale[16] (x 2^8, see below); then per input: fp8 w[16 rows]
  fp8_e5m2 = 5,  // header float32 scale[16]; then per input: fp8 w[16 rows]
  nf4 = 6,       // header fp16 absmax[K / group_size][16]; codes as int4 (NF4 level indices)
  f16 = 7,       // no header; per input: fp16 w[16 rows] (the fp16 mode's weights as they are)
  bf16 = 8,      // no header; per input: bf16 w[16 rows]
};
// f16 and bf16 weights are widened exactly to float32 (vcvtph2ps; a bf16 is the top half of a
// float32) and multiplied with float32 activations: the result is the float32 matmul of the
// same weight values, at half the bytes. Decode is memory-bound, so bf16 dot products
// (vdpbf16ps), which would also round the activations to bf16, would not be faster.
// fp8 codes become fp16 bits with two integer ops and are widened exactly by vcvtph2ps
// (subnormals included): e5m2 is the top byte of an fp16; e4m3 shifted into an fp16 is its
// value / 2^8 (exponent bias 7 against 15), so the e4m3 header holds scale * 2^8. The NaN
// codes of e4m3fn read as 480: our quantizer never writes them.
//
// nf4 levels as int8 dot-product operands: level = (coarse + fine / 254) / 127 with
// coarse = round(127 * level) and fine = round(254 * (127 * level - coarse)), both int8 and
// looked up in registers (vpshufb); off by at most 1.6e-5 x absmax, 30x below the float16
// rounding of the stored absmax itself.
// Headers are zero-padded to a multiple of 64 bytes; rows past N hold zeros.

struct PackedMatrix {
  PackKind kind;
  int64_t N, K;
  int64_t tiles;       // ceil(N / kTile)
  int64_t group_size;  // int4 and nf4
  int64_t header_bytes, tile_bytes;
  int8_t nf4_coarse[16], nf4_fine[16];  // nf4 only
  const uint8_t* data;  // tiles (not f32)
  const float* f32;     // [N, K] (f32 only)
};

// M activation rows prepared once per matmul and shared by every tile (K % 32 == 0).
struct DecodeActs {
  int64_t M, K;
  const float* x;            // [M, K] float activations (f32 kernels)
  const int8_t* codes;       // [M, K] int8 codes in natural order
  const float* scales;       // [M, K / 32] block scales
  const float* block_sums;   // [M, K / 32] float sum of x over each block (int4 min term)
  const int32_t* code_sums;  // [M, K / 32] sum of the codes of each block (unsigned-operand offset)
};

struct KernelTable {
  const char* name;
  // Quantize activation rows [m0, m1) into args.act.
  void (*quantize)(const LinearArgs& args, int64_t m0, int64_t m1);
  // Compute output features [n0, n1) for every row.
  void (*gemm)(const LinearArgs& args, int64_t n0, int64_t n1);

  // -- decode step --
  // One row x[K] into codes/scales/block_sums/code_sums (same arithmetic as `quantize`); per_row:
  // one scale for the whole row (int8_row, W8A8 dynamic), written to every block's slot;
  // fixed_scale > 0 (with per_row): that calibrated scale instead of the row's absmax (W8A8 static).
  void (*quantize_row)(const float* x, int64_t K, int8_t* codes, float* scales, float* block_sums,
                       int32_t* code_sums, bool per_row, float fixed_scale);
  // Tiles [t0, t1) for every row: y[m * ldy + (n - t0 * kTile)] for the tile's rows n
  // (all kTile rows of each tile are written, padding rows included).
  void (*packed_gemv)(const PackedMatrix& w, const DecodeActs& a, int64_t t0, int64_t t1, float* y, int64_t ldy);
  // out = x * rsqrt(mean(x^2) + eps) * w
  void (*rms_norm)(const float* x, const float* w, int64_t n, float eps, float* out);
  // out = silu(gate) * up
  void (*silu_mul)(const float* gate, const float* up, int64_t n, float* out);
  // One query head over `length` cached positions (rows `head_dim` apart): softmax(q·K * scale) · V.
  // `scores` has room for `length` floats.
  void (*attend)(const float* q, const float* keys, const float* values, int64_t length, int64_t head_dim,
                 float scale, float* scores, float* out);

  // -- de-quantization of the lookup formats (lut_ops.cpp: the torch path, prefill) --
  // One row of fp8 codes [K] -> out[K] = value(code) * scale; `values` (256 floats) for a tail.
  void (*fp8_row)(const uint8_t* codes, int64_t K, float scale, bool e4m3, const float* values, float* out);
  // One row of NF4 nibbles [K / 2] (even k low) -> out[K] = levels[code] * absmax[k / block].
  void (*nf4_row)(const uint8_t* packed, int64_t K, const uint16_t* absmax, int64_t block, const float* levels,
                  float* out);
};

// nullptr when the unit was compiled out (non-x86 build).
const KernelTable* avx2_table();
const KernelTable* avx512_table();

}  // namespace qs
