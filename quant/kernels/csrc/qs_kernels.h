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
};

constexpr int64_t kBlock = 32;  // activation quantization block
constexpr int64_t kKPad = 128;  // quantized activation rows are zero-padded to a multiple of this

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
  const uint16_t* scales;  // [N, K / group_size], fp16 bits
  const uint16_t* mins;    // [N, K / group_size], fp16 bits
  int64_t group_size;
};

struct KernelTable {
  const char* name;
  // Quantize activation rows [m0, m1) into args.act.
  void (*quantize)(const LinearArgs& args, int64_t m0, int64_t m1);
  // Compute output features [n0, n1) for every row.
  void (*gemm)(const LinearArgs& args, int64_t n0, int64_t n1);
};

// nullptr when the unit was compiled out (non-x86 build).
const KernelTable* avx2_table();
const KernelTable* avx512_table();

}  // namespace qs
