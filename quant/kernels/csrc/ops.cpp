// torch glue: argument checks, scratch buffers, threading and the quantserve:: op registry.
// Compiled for the x86-64 baseline; the kernels themselves live in the ISA units and are
// picked at run time: the best the CPU supports, unless Python chose one with set_isa
// (quant.kernels.configure; no environment is read here).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <string>
#include <vector>

#include "qs_kernels.h"

namespace qs {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (std::string(isa) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::string(isa) == "avx512vnni")
    return cpu_has("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
  return false;
}

// Kernel tables this CPU can run, best first.
std::vector<const KernelTable*> usable_tables() {
  std::vector<const KernelTable*> tables;
  if (avx512_table() && cpu_has("avx512vnni")) tables.push_back(avx512_table());
  if (avx2_table() && cpu_has("avx2")) tables.push_back(avx2_table());
  return tables;
}

const KernelTable* table_named(const std::string& name) {
  auto tables = usable_tables();
  if (name.empty() || name == "auto") return tables.empty() ? nullptr : tables.front();
  for (const KernelTable* t : tables)
    if (name == t->name) return t;
  return nullptr;
}

std::atomic<const KernelTable*>& active_table() {
  static std::atomic<const KernelTable*> table{table_named("auto")};  // the best available
  return table;
}

const KernelTable& require_table() {
  const KernelTable* t = active_table().load();
  TORCH_CHECK(t != nullptr, "quantserve kernels: this CPU has no supported ISA (need AVX2, FMA and F16C)");
  return *t;
}

std::string isa() {
  const KernelTable* t = active_table().load();
  return t ? t->name : "none";
}

std::string set_isa(const std::string& name) {
  const KernelTable* t = table_named(name);
  TORCH_CHECK(t != nullptr, "quantserve kernels: ISA '", name, "' is not available on this CPU");
  active_table().store(t);
  return t->name;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : usable_tables()) names.emplace_back(t->name);
  return names;
}

// Scratch for the quantized activations, reused across calls by the calling thread.
uint8_t* scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

at::Tensor float_vector(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device().is_cpu() && t->numel() == n, what, " must be a CPU tensor with ", n, " elements");
  return t->to(at::kFloat).contiguous();
}

at::Tensor run(LinearArgs args, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const int64_t K = args.K, N = args.N;
  TORCH_CHECK(x.device().is_cpu(), "quantserve kernels run on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quantserve kernels take float32 or bfloat16 activations, got ", x.scalar_type());
  TORCH_CHECK(K > 0, "quantserve kernels need at least one input feature");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "activations' last dimension must be ", K);
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor b = float_vector(bias, N, "bias");
  if (M == 0 || N == 0) return y.view(out_shape);

  const KernelTable& table = require_table();
  args.x = x2.data_ptr();
  args.x_dtype = x.scalar_type() == at::kFloat ? Dtype::f32 : Dtype::bf16;
  args.ldx = x2.stride(0);
  args.M = M;
  args.y = y.data_ptr();
  args.y_dtype = args.x_dtype;
  args.bias = b.defined() ? b.data_ptr<float>() : nullptr;

  QuantizedActs& act = args.act;
  act.k_pad = round_up(K, kKPad);
  act.scales_stride = args.kind == Kind::int8_row ? 1 : act.k_pad / kBlock;
  act.groups = args.kind == Kind::int4 ? K / args.group_size : 0;
  const size_t codes_bytes = M * act.k_pad, scale_count = M * act.scales_stride, sum_count = M * act.groups;
  uint8_t* buf = scratch(codes_bytes + sizeof(float) * (scale_count + sum_count) + 64);
  act.codes = buf;
  act.scales = reinterpret_cast<float*>(buf + round_up(codes_bytes, 64));
  act.sums = act.groups ? act.scales + scale_count : nullptr;

  // Thread grains: enough work per task that waking the pool pays off.
  const int64_t row_grain = std::max<int64_t>(1, 65536 / K);
  at::parallel_for(0, M, row_grain, [&](int64_t m0, int64_t m1) { table.quantize(args, m0, m1); });
  constexpr int64_t kRowsPerTask = 16;  // a multiple of every kernel's tile width
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t task_grain = std::max<int64_t>(1, 131072 / (kRowsPerTask * K * M));  // >= ~128K MACs a task
  at::parallel_for(0, tasks, task_grain, [&](int64_t t0, int64_t t1) {
    table.gemm(args, t0 * kRowsPerTask, std::min(N, t1 * kRowsPerTask));
  });
  return y.view(out_shape);
}

void check_int8_weight(const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2, "w_int8 must be int8 [N, K] on CPU");
  TORCH_CHECK(scale.numel() == w.size(0), "scale must have N = ", w.size(0), " elements");
}

at::Tensor int8_any(Kind kind, const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& scale,
                    const std::optional<at::Tensor>& bias, float act_scale = 0.0f) {
  check_int8_weight(w_int8, scale);
  const at::Tensor w = w_int8.contiguous();
  const at::Tensor s = float_vector(scale, w.size(0), "scale");
  LinearArgs args{};
  args.kind = kind;
  args.K = w.size(1);
  args.N = w.size(0);
  args.w_int8 = w.data_ptr<int8_t>();
  args.w_scale = s.data_ptr<float>();
  args.act_scale = act_scale;
  return run(args, x, bias);
}

int64_t rows_of(const at::Tensor& x, int64_t K) { return x.numel() / std::max<int64_t>(K, 1); }

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  check_int8_weight(w_int8, scale);
  if (rows_of(x, w_int8.size(1)) >= kDequantRows) {
    // float32 GEMM for bfloat16 activations too: the weights stay exact, one rounding of y at the end
    const at::Tensor w = at::mul(w_int8.to(at::kFloat), scale.to(at::kFloat).reshape({-1, 1}));
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
    return at::linear(x.to(at::kFloat), w, b).to(x.scalar_type());
  }
  return int8_any(Kind::int8_block, x, w_int8, scale, bias);
}

at::Tensor int8_dynamic_linear(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& w_scale,
                               const std::optional<at::Tensor>& bias) {
  // the row's dot product is accumulated in int32: K * 127 * 128 must stay below 2^31
  TORCH_CHECK(w_int8.size(1) <= 65536, "int8_dynamic_linear: K > 65536 could overflow int32 accumulators");
  return int8_any(Kind::int8_row, x, w_int8, w_scale, bias);
}

// W8A8 static: every row quantized with the one calibrated activation scale (no absmax pass), then
// the int8_row GEMM; activations beyond 127 x act_scale saturate, as the calibration chose.
at::Tensor int8_static_linear(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& w_scale,
                              const at::Tensor& act_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_int8.size(1) <= 65536, "int8_static_linear: K > 65536 could overflow int32 accumulators");
  TORCH_CHECK(act_scale.numel() == 1, "int8_static_linear: act_scale must hold one value");
  const float scale = act_scale.to(at::kFloat).item<float>();
  TORCH_CHECK(scale > 0.0f && std::isfinite(scale), "int8_static_linear: act_scale must be finite and > 0");
  return int8_any(Kind::int8_row, x, w_int8, w_scale, bias, scale);
}

// w[n, k] = code * scale + min, float32 [N, K]; even k in the low nibble.
at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                           int64_t group_size) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, groups = K / group_size;
  at::Tensor w = at::empty({N, K}, packed.options().dtype(at::kFloat));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* mn = mins.data_ptr<at::Half>();
  float* out = w.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = static_cast<float>(s[n * groups + g]), minimum = static_cast<float>(mn[n * groups + g]);
        const uint8_t* src = p + n * (K / 2) + g * (group_size / 2);
        float* dst = out + n * K + g * group_size;
        for (int64_t i = 0; i < group_size / 2; ++i) {
          dst[2 * i] = static_cast<float>(src[i] & 15) * scale + minimum;
          dst[2 * i + 1] = static_cast<float>(src[i] >> 4) * scale + minimum;
        }
      }
  });
  return w;
}

at::Tensor dequantized_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                              const at::Tensor& mins, int64_t group_size, const std::optional<at::Tensor>& bias) {
  // float32 GEMM for bfloat16 activations too: the weights stay exact, one rounding of y at the end
  const at::Tensor w = dequantize_int4(packed, scales, mins, group_size);
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
  return at::linear(x.to(at::kFloat), w, b).to(x.scalar_type());
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2,
              "packed must be uint8 [N, K / 2] on CPU");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(group_size % 32 == 0 && group_size > 0 && (group_size <= 64 || group_size % 128 == 0),
              "int4_linear: group_size must be 32, 64 or a multiple of 128, got ", group_size);
  TORCH_CHECK(K % group_size == 0, "int4_linear: K = ", K, " is not a multiple of group_size ", group_size);
  const int64_t groups = K / group_size;
  for (const at::Tensor* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == N && t->size(1) == groups,
                "int4 scales and mins must be float16 [", N, ", ", groups, "]");
  const at::Tensor p = packed.contiguous(), s = scales.contiguous(), mn = mins.contiguous();
  if (rows_of(x, K) >= kDequantRows)
    return dequantized_linear(x, p, s, mn, group_size, bias);
  LinearArgs args{};
  args.kind = Kind::int4;
  args.K = K;
  args.N = N;
  args.packed = p.data_ptr<uint8_t>();
  args.scales = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  args.mins = reinterpret_cast<const uint16_t*>(mn.data_ptr<at::Half>());
  args.group_size = group_size;
  return run(args, x, bias);
}

}  // namespace
}  // namespace qs

TORCH_LIBRARY(quantserve, m) {
  m.def("int8_linear(Tensor x, Tensor w_int8, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int8_dynamic_linear(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) -> Tensor");
  m.def("int8_static_linear(Tensor x, Tensor w_int8, Tensor w_scale, Tensor act_scale, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group_size, Tensor? bias) -> Tensor");
  m.def("isa() -> str", &qs::isa);
  m.def("set_isa(str name) -> str", &qs::set_isa);
  m.def("available_isas() -> str[]", &qs::available_isas);
}

TORCH_LIBRARY_IMPL(quantserve, CPU, m) {
  m.impl("int8_linear", &qs::int8_linear);
  m.impl("int8_dynamic_linear", &qs::int8_dynamic_linear);
  m.impl("int8_static_linear", &qs::int8_static_linear);
  m.impl("int4_linear", &qs::int4_linear);
}
