// quantserve::int8_g32_linear: int8 weights with one fp16 scale per 32 inputs (llama.cpp's
// Q8_0 layout), for any number of activation rows. The tiles come from the ISA units'
// int8 kernels (Kind::int8_g32); threads and scratch as in ops.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "qs_kernels.h"
#include "qs_runtime.h"

namespace qs {
namespace {

uint8_t* g32_scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

at::Tensor int8_g32_linear(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_int8.device().is_cpu() && w_int8.scalar_type() == at::kChar && w_int8.dim() == 2,
              "int8_g32_linear: w_int8 must be int8 [N, K] on CPU");
  const int64_t N = w_int8.size(0), K = w_int8.size(1);
  TORCH_CHECK(K > 0 && K % kBlock == 0, "int8_g32_linear: K = ", K, " is not a positive multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) == K / kBlock,
              "int8_g32_linear: scales must be float16 [", N, ", ", K / kBlock, "]");
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_g32_linear takes float32 or bfloat16 CPU activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "activations' last dimension must be ", K);
  const at::Tensor w = w_int8.contiguous(), s = scales.contiguous();
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have ", N, " elements");
    b = bias->to(at::kFloat).contiguous();
  }
  if (M == 0 || N == 0) return y.view(out_shape);

  const KernelTable& table = active_kernel_table();
  LinearArgs args{};
  args.kind = Kind::int8_g32;
  args.K = K;
  args.N = N;
  args.w_int8 = w.data_ptr<int8_t>();
  args.scales = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  args.x = x2.data_ptr();
  args.x_dtype = x.scalar_type() == at::kFloat ? Dtype::f32 : Dtype::bf16;
  args.ldx = x2.stride(0);
  args.M = M;
  args.y = y.data_ptr();
  args.y_dtype = args.x_dtype;
  args.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  QuantizedActs& act = args.act;
  act.k_pad = round_up(K, kKPad);
  act.scales_stride = act.k_pad / kBlock;
  act.groups = 0;
  const size_t codes_bytes = M * act.k_pad, scale_count = M * act.scales_stride;
  uint8_t* buf = g32_scratch(codes_bytes + sizeof(float) * scale_count + 64);
  act.codes = buf;
  act.scales = reinterpret_cast<float*>(buf + round_up(codes_bytes, 64));
  act.sums = nullptr;

  const int64_t row_grain = std::max<int64_t>(1, 65536 / K);
  at::parallel_for(0, M, row_grain, [&](int64_t m0, int64_t m1) { table.quantize(args, m0, m1); });
  constexpr int64_t kRowsPerTask = 16;  // a multiple of every kernel's tile width
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t task_grain = std::max<int64_t>(1, 131072 / (kRowsPerTask * K * M));
  at::parallel_for(0, tasks, task_grain, [&](int64_t t0, int64_t t1) {
    table.gemm(args, t0 * kRowsPerTask, std::min(N, t1 * kRowsPerTask));
  });
  return y.view(out_shape);
}

}  // namespace
}  // namespace qs

TORCH_LIBRARY_FRAGMENT(quantserve, m) {
  m.def("int8_g32_linear(Tensor x, Tensor w_int8, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantserve, CPU, m) { m.impl("int8_g32_linear", &qs::int8_g32_linear); }
