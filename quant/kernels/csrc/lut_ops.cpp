// quantserve::fp8_linear and quantserve::nf4_linear: the formats whose codes are looked up, not
// multiplied (float8, NormalFloat 4). Decode (one to a few rows a step) runs in the native
// decode step's packed tiles; these ops serve the torch path: prefill and callers without the
// native step.
//
// De-quantization runs in the active ISA's row functions (qs_kernels.h: fp8 through fp16 bits
// and vcvtph2ps, NF4 levels looked up with vpermps).
//
// Fewer than kDequantRows activation rows: the weight is de-quantized 16 rows at a time into
// a thread's scratch (never the whole matrix) and multiplied there by the float32 tile kernel
// of the active ISA. From kDequantRows on (prefill) the GEMM is compute-bound: the weight is
// de-quantized once and torch's float32 GEMM runs, as the int4 op does. Either way the weights
// are exactly the reference's (x · dequantize(w)ᵀ) and the activations are not rounded.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <optional>
#include <vector>

#include "qs_kernels.h"
#include "qs_runtime.h"

namespace qs {
namespace {

// Writes rows [n0, n1) of the de-quantized weight, float32 [n1 - n0, K], to `out` (with the ISA
// table the op looked up once: `dequant` and the strip kernel run on the same one).
using DequantRows = std::function<void(int64_t n0, int64_t n1, float* out)>;

at::Tensor lookup_linear(const char* op, const KernelTable& table, const at::Tensor& x, int64_t N, int64_t K,
                         const DequantRows& dequant,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, " takes float32 or bfloat16 CPU activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": activations' last dimension must be ", K);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, op, ": bias must have ", N, " elements");
    b = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  if (M >= kDequantRows || K % kBlock != 0) {
    at::Tensor w = at::empty({N, K}, at::kFloat);
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K),
                     [&](int64_t n0, int64_t n1) { dequant(n0, n1, w.data_ptr<float>() + n0 * K); });
    return at::linear(x2, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt)
        .to(x.scalar_type())
        .view(out_shape);
  }
  at::Tensor y = at::empty({M, N}, at::kFloat);
  if (M > 0 && N > 0) {
    const float* xd = x2.data_ptr<float>();
    float* yd = y.data_ptr<float>();
    const float* bd = b.defined() ? b.data_ptr<float>() : nullptr;
    const int64_t strips = (N + kTile - 1) / kTile;
    const int64_t grain = std::max<int64_t>(1, 65536 / (kTile * K * std::max<int64_t>(M, 1)));
    at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
      thread_local std::vector<float> weights, out;
      weights.resize(kTile * K);
      out.resize(M * kTile);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t n0 = s * kTile, rows = std::min(N, n0 + kTile) - n0;
        dequant(n0, n0 + rows, weights.data());
        PackedMatrix strip{};
        strip.kind = PackKind::f32;
        strip.N = rows;
        strip.K = K;
        strip.tiles = 1;
        strip.f32 = weights.data();
        DecodeActs acts{};
        acts.M = M;
        acts.K = K;
        acts.x = xd;
        table.packed_gemv(strip, acts, 0, 1, out.data(), kTile);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < rows; ++j) yd[m * N + n0 + j] = out[m * kTile + j] + (bd ? bd[n0 + j] : 0.0f);
      }
    });
  }
  return y.to(x.scalar_type()).view(out_shape);
}

// The value of every float8 code as float32 (the NaN codes of e4m3fn included).
const std::array<float, 256>& fp8_values(bool e4m3) {
  static const auto build = [](bool e4m3_format) {
    std::array<float, 256> values{};
    for (int code = 0; code < 256; ++code)
      values[code] = e4m3_format ? static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(code),
                                                                          c10::Float8_e4m3fn::from_bits()))
                                 : static_cast<float>(
                                       c10::Float8_e5m2(static_cast<uint8_t>(code), c10::Float8_e5m2::from_bits()));
    return values;
  };
  static const std::array<float, 256> e4m3_values = build(true), e5m2_values = build(false);
  return e4m3 ? e4m3_values : e5m2_values;
}

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& weight_fp8, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias) {
  const bool e4m3 = weight_fp8.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(weight_fp8.device().is_cpu() && weight_fp8.dim() == 2 && (e4m3 || weight_fp8.scalar_type() == at::kFloat8_e5m2),
              "fp8_linear: weight_fp8 must be float8_e4m3fn or float8_e5m2 [N, K] on CPU");
  const int64_t N = weight_fp8.size(0), K = weight_fp8.size(1);
  TORCH_CHECK(scale.device().is_cpu() && scale.numel() == N, "fp8_linear: scale must have N = ", N, " elements");
  const at::Tensor w = weight_fp8.contiguous(), s = scale.to(at::kFloat).contiguous();
  const uint8_t* codes = static_cast<const uint8_t*>(w.data_ptr());
  const float* sd = s.data_ptr<float>();
  const std::array<float, 256>& values = fp8_values(e4m3);
  const KernelTable& table = active_kernel_table();
  const DequantRows dequant = [&](int64_t n0, int64_t n1, float* out) {
    for (int64_t n = n0; n < n1; ++n) table.fp8_row(codes + n * K, K, sd[n], e4m3, values.data(), out + (n - n0) * K);
  };
  return lookup_linear("fp8_linear", table, x, N, K, dequant, bias);
}

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                      int64_t block_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2,
              "nf4_linear: packed must be uint8 [N, K / 2] on CPU");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(block_size > 0 && block_size % 2 == 0 && K % block_size == 0, "nf4_linear: K = ", K,
              " is not a multiple of block_size ", block_size);
  const int64_t blocks = K / block_size;
  TORCH_CHECK(absmax.scalar_type() == at::kHalf && absmax.dim() == 2 && absmax.size(0) == N && absmax.size(1) == blocks,
              "nf4_linear: absmax must be float16 [", N, ", ", blocks, "]");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "nf4_linear: code must be float32 [16]");
  const at::Tensor p = packed.contiguous(), a = absmax.contiguous(), c = code.contiguous();
  const uint8_t* pd = p.data_ptr<uint8_t>();
  const at::Half* ad = a.data_ptr<at::Half>();
  const float* levels = c.data_ptr<float>();
  const KernelTable& table = active_kernel_table();
  const DequantRows dequant = [&](int64_t n0, int64_t n1, float* out) {
    for (int64_t n = n0; n < n1; ++n)
      table.nf4_row(pd + n * (K / 2), K, reinterpret_cast<const uint16_t*>(ad + n * blocks), block_size, levels,
                    out + (n - n0) * K);
  };
  return lookup_linear("nf4_linear", table, x, N, K, dequant, bias);
}

}  // namespace
}  // namespace qs

TORCH_LIBRARY_FRAGMENT(quantserve, m) {
  m.def("fp8_linear(Tensor x, Tensor weight_fp8, Tensor scale, Tensor? bias) -> Tensor");
  m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor code, int block_size, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantserve, CPU, m) {
  m.impl("fp8_linear", &qs::fp8_linear);
  m.impl("nf4_linear", &qs::nf4_linear);
}
