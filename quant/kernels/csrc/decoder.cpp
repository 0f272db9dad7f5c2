// The native decode step of a Llama-family model: `quantserve.NativeDecoder` is built once from
// the model's weights (repacked into 16-row tiles, see qs_kernels.h) and the runner's KV cache
// tensors; each `decode()` runs the whole step for B sequences in one call on one persistent
// thread team (qs_runtime.h): embedding lookup, per layer RMSNorm -> q/k/v (one activation
// quantization) -> RoPE -> KV write -> attention -> o_proj + residual -> RMSNorm -> gate/up (one
// quantization) -> SiLU·mul -> down + residual, final norm and output head.
//
// Threading: every thread walks the same sequence of phases, separated by barriers (5 per
// layer). Inside a phase, threads take work items (ranges of weight tiles, or attention heads)
// from a shared counter, so a thread that loses its core to another process delays only the
// items it holds. Activation preparation (norm + quantization, a few KB) is repeated by every
// thread into its own scratch instead of costing another barrier.
//
// Arithmetic of the torch path: activations are quantized exactly as the quantserve ops do
// (int8 per 32-block), integer dot products are exact, only float summation order differs (and
// attention, SiLU and RMSNorm are our own code). Quantized activations are piecewise in their
// inputs, so over 30 layers those 1e-7 differences grow as they do between the torch path's own
// ISA variants; tests/app/test_native_runner.py checks every phase against the torch ops on the
// step's own inputs. Each output is computed by one item in an order that depends neither on
// the batch nor on the thread count: batched decoding equals one-by-one decoding bit for bit.
//
// `quantserve.NativeLinear` runs one packed matrix on the team (kernel tests and benchmarks).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "qs_kernels.h"
#include "qs_runtime.h"

namespace qs {
namespace {

int64_t round64(int64_t v) { return (v + 63) / 64 * 64; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- packing -------------------------------------------------------------------------

// Whether a kind's kernel reads int8 activation codes (the float kernels read the floats).
bool reads_codes(PackKind kind) {
  return kind != PackKind::f32 && kind != PackKind::fp8_e4m3 && kind != PackKind::fp8_e5m2 && kind != PackKind::f16 &&
         kind != PackKind::bf16;
}

// A matrix as the decode kernels read it, with the tensors that keep its memory alive.
struct Packed {
  PackedMatrix m{};
  bool per_row_acts = false;  // int8_row: activations quantized with one scale per row (W8A8 dynamic)
  float act_scale = 0.0f;     // int8_static: that calibrated scale for every row (W8A8 static)
  at::Tensor storage;  // packed tiles (uint8), or the float32 weight read in place
  at::Tensor bias;     // float32 [N], or undefined
  std::string kind;

  int64_t bytes_read() const {  // per GEMV call
    return m.kind == PackKind::f32 ? m.N * m.K * 4 : m.tiles * m.tile_bytes;
  }
};

bool reads_codes(const Packed& p) { return reads_codes(p.m.kind); }

// How a phase prepares the activations of the matmuls that share them.
enum class ActQuant { none, per_block, per_row };

ActQuant act_quant(const Packed& p) {
  return !reads_codes(p) ? ActQuant::none : p.per_row_acts ? ActQuant::per_row : ActQuant::per_block;
}

// One preparation for matmuls that share their input (q/k/v, gate/up): they must agree on it,
// static scales included (checked when the decoder is finalized).
ActQuant shared_act_quant(std::initializer_list<const Packed*> group) {
  ActQuant quant = ActQuant::none;
  for (const Packed* p : group) {
    const ActQuant q = act_quant(*p);
    TORCH_CHECK(quant == ActQuant::none || q == ActQuant::none || q == quant,
                "native decode: matmuls sharing an input mix per-row and per-block activation scales");
    if (q != ActQuant::none) quant = q;
  }
  return quant;
}

// The calibrated activation scale the group shares (0: none, scales computed per row or block).
float shared_act_scale(std::initializer_list<const Packed*> group) {
  float scale = 0.0f;
  for (const Packed* p : group) {
    if (!reads_codes(*p)) continue;
    TORCH_CHECK(scale == 0.0f || p->act_scale == scale,
                "native decode: matmuls sharing an input have different static activation scales");
    scale = p->act_scale;
  }
  return scale;
}

at::Tensor checked(const at::Tensor& t, at::ScalarType dtype, std::vector<int64_t> shape, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes().vec() == shape, what, " must be a CPU ",
              c10::toString(dtype), " tensor of shape ", c10::IntArrayRef(shape), ", got ", t.scalar_type(), " ",
              t.sizes());
  return t.contiguous();
}

void init_tiles(Packed& p, PackKind kind, int64_t N, int64_t K, int64_t header_bytes, int64_t code_bytes) {
  TORCH_CHECK(K > 0 && K % kBlock == 0, "native decode: in_features must be a positive multiple of 32, got ", K);
  p.m.kind = kind;
  p.m.N = N;
  p.m.K = K;
  p.m.tiles = ceil_div(N, kTile);
  p.m.header_bytes = round64(header_bytes);
  p.m.tile_bytes = p.m.header_bytes + round64(code_bytes);
  p.storage = at::zeros({p.m.tiles * p.m.tile_bytes + 64}, at::kByte);  // CPU allocations are 64-byte aligned
  p.m.data = p.storage.data_ptr<uint8_t>();
}

// int8 codes [N, K] into the tiles' "per 4 inputs: w[16 rows][4]" steps.
void pack_int8_codes(Packed& p, const int8_t* w) {
  const int64_t N = p.m.N, K = p.m.K;
  for (int64_t t = 0; t < p.m.tiles; ++t) {
    uint8_t* codes = p.storage.data_ptr<uint8_t>() + t * p.m.tile_bytes + p.m.header_bytes;
    for (int64_t r = 0; r < kTile && t * kTile + r < N; ++r) {
      const int8_t* row = w + (t * kTile + r) * K;
      for (int64_t c = 0; c < K / 4; ++c) std::memcpy(codes + c * 64 + r * 4, row + 4 * c, 4);
    }
  }
}

// 4-bit codes [N, K / 2] (even k in the low nibble) into the tiles' "per 8 inputs: [16 rows][4]
// bytes, byte i = code(k + i) | code(k + 4 + i) << 4" steps (int4 and nf4).
void pack_nibble_codes(Packed& p, const uint8_t* src) {
  const int64_t N = p.m.N, K = p.m.K;
  auto code = [&](int64_t n, int64_t k) -> uint8_t {
    const uint8_t byte = src[n * (K / 2) + k / 2];
    return k % 2 == 0 ? (byte & 0x0f) : (byte >> 4);
  };
  for (int64_t n = 0; n < N; ++n) {
    uint8_t* codes = p.storage.data_ptr<uint8_t>() + (n / kTile) * p.m.tile_bytes + p.m.header_bytes;
    const int64_t r = n % kTile;
    for (int64_t step = 0; step < K / 8; ++step)
      for (int64_t i = 0; i < 4; ++i)
        codes[step * 64 + r * 4 + i] = code(n, 8 * step + i) | (code(n, 8 * step + 4 + i) << 4);
  }
}

// One fp16 value per row and group into the tiles' headers: header[g * 16 + row] at `offset` halves.
void pack_half_header(Packed& p, const uint16_t* values, int64_t groups, int64_t offset) {
  for (int64_t n = 0; n < p.m.N; ++n) {
    uint16_t* header = reinterpret_cast<uint16_t*>(p.storage.data_ptr<uint8_t>() + (n / kTile) * p.m.tile_bytes);
    for (int64_t g = 0; g < groups; ++g) header[offset + g * kTile + n % kTile] = values[n * groups + g];
  }
}

// The coarse and fine int8 parts of the 16 NF4 levels (qs_kernels.h).
void set_nf4_tables(Packed& p, const at::Tensor& code) {
  const at::Tensor levels = checked(code, at::kFloat, {16}, "nf4 code table");
  for (int c = 0; c < 16; ++c) {
    const float scaled = 127.0f * levels.data_ptr<float>()[c];
    TORCH_CHECK(std::fabs(scaled) <= 127.0f, "nf4 levels must lie in [-1, 1]");
    const float coarse = std::nearbyint(scaled);
    p.m.nf4_coarse[c] = static_cast<int8_t>(coarse);
    p.m.nf4_fine[c] = static_cast<int8_t>(std::nearbyint(254.0f * (scaled - coarse)));
  }
}

Packed pack(const std::string& kind, const std::vector<at::Tensor>& t, int64_t group_size,
            const std::optional<at::Tensor>& bias) {
  Packed p;
  p.kind = kind;
  if (kind == "f32") {
    TORCH_CHECK(t.size() == 1 && t[0].dim() == 2, "f32 linear takes [weight [N, K] float32]");
    const int64_t N = t[0].size(0), K = t[0].size(1);
    TORCH_CHECK(K % kBlock == 0, "native decode: in_features must be a multiple of 32, got ", K);
    p.storage = checked(t[0], at::kFloat, {N, K}, "f32 weight");
    p.m.kind = PackKind::f32;
    p.m.N = N;
    p.m.K = K;
    p.m.tiles = ceil_div(N, kTile);
    p.m.f32 = p.storage.data_ptr<float>();
  } else if (kind == "int8" || kind == "int8_row" || kind == "int8_static" || kind == "int8_g32") {
    const bool is_static = kind == "int8_static";
    TORCH_CHECK(t.size() == (is_static ? 3u : 2u) && t[0].dim() == 2, kind,
                is_static ? " linear takes [weight_int8 [N, K], scale [N], act_scale [1]]"
                          : " linear takes [weight_int8 [N, K], scales]");
    const int64_t N = t[0].size(0), K = t[0].size(1);
    const at::Tensor w = checked(t[0], at::kChar, {N, K}, "weight_int8");
    if (kind != "int8_g32") {  // int8_row / int8_static: the int8 tiles, fed activations with one scale per row
      p.per_row_acts = kind == "int8_row" || is_static;
      if (is_static) {
        TORCH_CHECK(t[2].numel() == 1, "int8_static act_scale must hold one value");
        p.act_scale = t[2].to(at::kFloat).item<float>();
        TORCH_CHECK(p.act_scale > 0.0f && std::isfinite(p.act_scale), "int8_static act_scale must be finite and > 0");
      }
      const at::Tensor s = checked(t[1].to(at::kFloat), at::kFloat, {N}, "int8 scale");
      init_tiles(p, PackKind::int8, N, K, kTile * 4, K * kTile);
      for (int64_t n = 0; n < N; ++n)
        reinterpret_cast<float*>(p.storage.data_ptr<uint8_t>() + (n / kTile) * p.m.tile_bytes)[n % kTile] =
            s.data_ptr<float>()[n];
    } else {
      const int64_t blocks = K / kBlock;
      const at::Tensor s = checked(t[1], at::kHalf, {N, blocks}, "int8_g32 scales");
      init_tiles(p, PackKind::int8_g32, N, K, blocks * kTile * 2, K * kTile);
      pack_half_header(p, reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()), blocks, 0);
    }
    pack_int8_codes(p, w.data_ptr<int8_t>());
  } else if (kind == "int4") {
    TORCH_CHECK(t.size() == 3 && t[0].dim() == 2, "int4 linear takes [packed [N, K/2], scales, mins]");
    const int64_t N = t[0].size(0), K = t[0].size(1) * 2;
    TORCH_CHECK(group_size > 0 && group_size % kBlock == 0 && K % group_size == 0,
                "native decode: int4 group_size must be a multiple of 32 dividing K, got ", group_size);
    const int64_t groups = K / group_size;
    const at::Tensor packed = checked(t[0], at::kByte, {N, K / 2}, "int4 packed");
    const at::Tensor s = checked(t[1], at::kHalf, {N, groups}, "int4 scales");
    const at::Tensor mn = checked(t[2], at::kHalf, {N, groups}, "int4 mins");
    init_tiles(p, PackKind::int4, N, K, 2 * groups * kTile * 2, K / 2 * kTile);
    p.m.group_size = group_size;
    pack_half_header(p, reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()), groups, 0);
    pack_half_header(p, reinterpret_cast<const uint16_t*>(mn.data_ptr<at::Half>()), groups, groups * kTile);
    pack_nibble_codes(p, packed.data_ptr<uint8_t>());
  } else if (kind == "fp8_e4m3" || kind == "fp8_e5m2") {
    const bool e4m3 = kind == "fp8_e4m3";
    TORCH_CHECK(t.size() == 2 && t[0].dim() == 2, kind, " linear takes [weight_fp8 [N, K], scale [N]]");
    const int64_t N = t[0].size(0), K = t[0].size(1);
    const at::Tensor w = checked(t[0], e4m3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2, {N, K}, "fp8 weight");
    const at::Tensor s = checked(t[1].to(at::kFloat), at::kFloat, {N}, "fp8 scale");
    init_tiles(p, e4m3 ? PackKind::fp8_e4m3 : PackKind::fp8_e5m2, N, K, kTile * 4, K * kTile);
    const float factor = e4m3 ? 256.0f : 1.0f;  // e4m3 codes read as fp16 are value / 2^8
    const uint8_t* src = static_cast<const uint8_t*>(w.data_ptr());
    for (int64_t n = 0; n < N; ++n) {
      uint8_t* tile = p.storage.data_ptr<uint8_t>() + (n / kTile) * p.m.tile_bytes;
      reinterpret_cast<float*>(tile)[n % kTile] = s.data_ptr<float>()[n] * factor;
      uint8_t* codes = tile + p.m.header_bytes;
      for (int64_t k = 0; k < K; ++k) codes[k * kTile + n % kTile] = src[n * K + k];
    }
  } else if (kind == "nf4") {
    TORCH_CHECK(t.size() == 3 && t[0].dim() == 2, "nf4 linear takes [packed [N, K/2], absmax, code [16]]");
    const int64_t N = t[0].size(0), K = t[0].size(1) * 2;
    TORCH_CHECK(group_size > 0 && group_size % kBlock == 0 && K % group_size == 0,
                "native decode: nf4 block size must be a multiple of 32 dividing K, got ", group_size);
    const int64_t groups = K / group_size;
    const at::Tensor packed = checked(t[0], at::kByte, {N, K / 2}, "nf4 packed");
    const at::Tensor absmax = checked(t[1], at::kHalf, {N, groups}, "nf4 absmax");
    init_tiles(p, PackKind::nf4, N, K, groups * kTile * 2, K / 2 * kTile);
    p.m.group_size = group_size;
    set_nf4_tables(p, t[2]);
    pack_half_header(p, reinterpret_cast<const uint16_t*>(absmax.data_ptr<at::Half>()), groups, 0);
    pack_nibble_codes(p, packed.data_ptr<uint8_t>());
  } else if (kind == "f16" || kind == "bf16") {
    const bool bf16 = kind == "bf16";
    TORCH_CHECK(t.size() == 1 && t[0].dim() == 2, kind, " linear takes [weight [N, K]]");
    const int64_t N = t[0].size(0), K = t[0].size(1);
    const at::Tensor w = checked(t[0], bf16 ? at::kBFloat16 : at::kHalf, {N, K}, "half weight");
    init_tiles(p, bf16 ? PackKind::bf16 : PackKind::f16, N, K, 0, K * kTile * 2);
    const uint16_t* src = static_cast<const uint16_t*>(w.data_ptr());
    for (int64_t n = 0; n < N; ++n) {
      uint16_t* codes = reinterpret_cast<uint16_t*>(p.storage.data_ptr<uint8_t>() + (n / kTile) * p.m.tile_bytes);
      for (int64_t k = 0; k < K; ++k) codes[k * kTile + n % kTile] = src[n * K + k];
    }
  } else {
    TORCH_CHECK(false, "native decode: unknown linear kind '", kind,
                "' (f32, f16, bf16, int8, int8_row, int8_static, int4, int8_g32, fp8_e4m3, fp8_e5m2, nf4)");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == p.m.N, "bias must have ", p.m.N, " elements");
    p.bias = bias->to(at::kFloat).contiguous();
  }
  return p;
}

// ---- per-thread scratch and activation preparation ------------------------------------

struct Scratch {
  std::vector<float> x;           // [rows, k_max] normalized activations
  std::vector<int8_t> codes;      // [rows, k_max]
  std::vector<float> scales;      // [rows, k_max / 32]
  std::vector<float> block_sums;  // [rows, k_max / 32]
  std::vector<int32_t> code_sums;
  std::vector<float> y;       // one item's outputs
  std::vector<float> scores;  // attention, [max_len]

  void resize(int64_t rows, int64_t k_max, int64_t y_floats, int64_t max_len) {
    x.assign(rows * k_max, 0.0f);
    codes.assign(rows * k_max, 0);
    scales.assign(rows * k_max / kBlock, 0.0f);
    block_sums.assign(rows * k_max / kBlock, 0.0f);
    code_sums.assign(rows * k_max / kBlock, 0);
    y.assign(y_floats, 0.0f);
    scores.assign(std::max<int64_t>(max_len, 1), 0.0f);
  }

  // acts for `rows` rows of `src` [rows, K]: optionally RMS-normalized, quantized if asked.
  DecodeActs prepare(const KernelTable& kt, const float* src, int64_t rows, int64_t K, const float* norm, float eps,
                     ActQuant quantize, float fixed_scale = 0.0f) {
    DecodeActs a{};
    a.M = rows;
    a.K = K;
    a.x = src;
    if (norm != nullptr) {
      for (int64_t b = 0; b < rows; ++b) kt.rms_norm(src + b * K, norm, K, eps, x.data() + b * K);
      a.x = x.data();
    }
    if (quantize != ActQuant::none) {
      const int64_t blocks = K / kBlock;
      for (int64_t b = 0; b < rows; ++b)
        kt.quantize_row(a.x + b * K, K, codes.data() + b * K, scales.data() + b * blocks,
                        block_sums.data() + b * blocks, code_sums.data() + b * blocks,
                        quantize == ActQuant::per_row, fixed_scale);
      a.codes = codes.data();
      a.scales = scales.data();
      a.block_sums = block_sums.data();
      a.code_sums = code_sums.data();
    }
    return a;
  }
};

// Tiles per work item: about 8 items per thread, at most ~256 KB of weights each, and a
// multiple of `align` tiles (an attention head's rows stay in one item for RoPE).
int64_t tiles_per_item(const Packed& p, int threads, int64_t align = 1) {
  const int64_t tile_bytes = std::max<int64_t>(1, p.bytes_read() / std::max<int64_t>(1, p.m.tiles));
  int64_t per = ceil_div(p.m.tiles, 8 * threads);
  per = std::min(per, std::max<int64_t>(1, (256 << 10) / tile_bytes));
  return std::max<int64_t>(align, per / align * align);
}

// ---- NativeLinear ------------------------------------------------------------------------

class NativeLinear : public torch::CustomClassHolder {
 public:
  NativeLinear(const std::string& kind, std::vector<at::Tensor> tensors, int64_t group_size,
               std::optional<at::Tensor> bias, int64_t threads)
      : team_(shared_team(static_cast<int>(threads))) {
    copies_.push_back(pack(kind, tensors, group_size, bias));
    per_item_ = tiles_per_item(copies_[0], team_->size());
    items_ = ceil_div(copies_[0].m.tiles, per_item_);
    scratch_.resize(team_->size());
  }

  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = run(x, 1, 1);
    return y;
  }

  // Seconds per GEMV of `iters` back-to-back calls inside one team job, as the decode step runs
  // its matmuls (activation preparation, work items, a barrier), cycling through `copies`
  // separate copies of the packed weights so that they come from memory, not from cache.
  double bench(const at::Tensor& x, int64_t iters, int64_t copies) {
    TORCH_CHECK(iters >= 1 && copies >= 1, "bench takes iters >= 1 and copies >= 1");
    while (static_cast<int64_t>(copies_.size()) < copies) {
      Packed c = copies_[0];
      c.storage = c.storage.clone();
      if (c.m.kind == PackKind::f32)
        c.m.f32 = c.storage.data_ptr<float>();
      else
        c.m.data = c.storage.data_ptr<uint8_t>();
      copies_.push_back(std::move(c));
    }
    const auto start = std::chrono::steady_clock::now();
    run(x, iters, copies);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
  }

  int64_t weight_bytes() const { return copies_[0].bytes_read(); }
  std::string kernel() const { return active_kernel_table().name; }

 private:
  at::Tensor run(const at::Tensor& x_in, int64_t iters, int64_t copies) {
    const int64_t K = copies_[0].m.K, N = copies_[0].m.N;
    TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(1) == K,
                "NativeLinear takes float32 [M, ", K, "]");
    const at::Tensor x = x_in.contiguous();
    const int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N}, at::kFloat);
    if (M == 0) return y;
    std::lock_guard<std::mutex> lock(call_mutex_);  // one call at a time owns the scratch
    kt_ = &active_kernel_table();
    x_ = x.data_ptr<float>();
    y_ = y.data_ptr<float>();
    M_ = M;
    iters_ = iters;
    copies_used_ = copies;
    if (M > scratch_rows_) {
      for (auto& s : scratch_) s.resize(M, K, M * per_item_ * kTile, 0);
      scratch_rows_ = M;
    }
    counters_ = std::vector<ItemCounter>(iters);
    team_->run(&NativeLinear::job, this);
    return y;
  }

  static void job(void* ctx, int thread) { static_cast<NativeLinear*>(ctx)->work(thread); }

  void work(int thread) {
    Scratch& s = scratch_[thread];
    for (int64_t it = 0; it < iters_; ++it) {
      const Packed& p = copies_[it % copies_used_];
      const DecodeActs a = s.prepare(*kt_, x_, M_, p.m.K, nullptr, 0.0f, act_quant(p), p.act_scale);
      const float* bias = p.bias.defined() ? p.bias.data_ptr<float>() : nullptr;
      ItemCounter& counter = counters_[it];
      for (int64_t item = counter.take(); item < items_; item = counter.take()) {
        const int64_t t0 = item * per_item_, t1 = std::min(p.m.tiles, t0 + per_item_);
        const int64_t ldy = (t1 - t0) * kTile;
        kt_->packed_gemv(p.m, a, t0, t1, s.y.data(), ldy);
        const int64_t n0 = t0 * kTile, n1 = std::min(p.m.N, t1 * kTile);
        for (int64_t m = 0; m < M_; ++m)
          for (int64_t n = n0; n < n1; ++n) y_[m * p.m.N + n] = s.y[m * ldy + n - n0] + (bias ? bias[n] : 0.0f);
      }
      if (it + 1 < iters_) team_->barrier();
    }
  }

  std::vector<Packed> copies_;  // [0]: the weights; more only for bench()
  std::shared_ptr<SpinTeam> team_;
  int64_t per_item_ = 1, items_ = 0, scratch_rows_ = 0, iters_ = 1, copies_used_ = 1;
  std::vector<Scratch> scratch_;
  std::vector<ItemCounter> counters_;
  std::mutex call_mutex_;
  const KernelTable* kt_ = nullptr;
  const float* x_ = nullptr;
  float* y_ = nullptr;
  int64_t M_ = 0;
};

// ---- NativeDecoder -------------------------------------------------------------------------

enum Role : int { kQ = 0, kK, kV, kO, kGate, kUp, kDown, kRoles };

int role_of(const std::string& name) {
  static const char* names[kRoles] = {"q", "k", "v", "o", "gate", "up", "down"};
  for (int r = 0; r < kRoles; ++r)
    if (name == names[r]) return r;
  TORCH_CHECK(name == "head", "native decode: unknown linear role '", name, "'");
  return -1;
}

struct Layer {
  at::Tensor attn_norm, mlp_norm;
  Packed linears[kRoles];
  bool present[kRoles] = {};
};

// A work item: tiles [t0, t1) of one matrix (`role`); gate/up items cover both matrices.
struct Item {
  int role;
  int64_t t0, t1;
};

class NativeDecoder : public torch::CustomClassHolder {
 public:
  // dims: hidden, heads, kv_heads, head_dim, intermediate, vocab, layers
  NativeDecoder(std::vector<int64_t> dims, double eps, at::Tensor k_cache, at::Tensor v_cache, at::Tensor cos,
                at::Tensor sin, int64_t threads)
      : eps_(static_cast<float>(eps)), team_(shared_team(static_cast<int>(threads))) {
    TORCH_CHECK(dims.size() == 7, "NativeDecoder dims: hidden, heads, kv_heads, head_dim, intermediate, vocab, layers");
    hidden_ = dims[0];
    heads_ = dims[1];
    kv_heads_ = dims[2];
    head_dim_ = dims[3];
    intermediate_ = dims[4];
    vocab_ = dims[5];
    const int64_t layers = dims[6];
    TORCH_CHECK(heads_ > 0 && kv_heads_ > 0 && heads_ % kv_heads_ == 0, "heads must be a multiple of kv_heads");
    TORCH_CHECK(head_dim_ % kTile == 0, "native decode: head_dim must be a multiple of 16, got ", head_dim_);
    TORCH_CHECK(hidden_ % kBlock == 0 && intermediate_ % kBlock == 0 && (heads_ * head_dim_) % kBlock == 0,
                "native decode: hidden, intermediate and heads x head_dim must be multiples of 32");
    for (const at::Tensor* c : {&k_cache, &v_cache})
      TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 5 &&
                      c->size(0) == layers && c->size(2) == kv_heads_ && c->size(4) == head_dim_,
                  "KV cache must be contiguous float32 [layers, slots, kv_heads, max_len, head_dim]");
    slots_ = k_cache.size(1);
    max_len_ = k_cache.size(3);
    TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "K and V caches differ in shape");
    k_cache_ = k_cache;
    v_cache_ = v_cache;
    cos_ = checked(cos, at::kFloat, {max_len_, head_dim_}, "rope cos");
    sin_ = checked(sin, at::kFloat, {max_len_, head_dim_}, "rope sin");
    layers_.resize(layers);
  }

  void set_embedding(const std::string& kind, std::vector<at::Tensor> t) {
    if (kind == "f32") {
      TORCH_CHECK(t.size() == 1, "f32 embedding takes [weight]");
      embed_ = checked(t[0], at::kFloat, {vocab_, hidden_}, "embedding");
    } else if (kind == "int8_g32") {
      TORCH_CHECK(t.size() == 2, "int8_g32 embedding takes [weight_int8, scales]");
      embed_ = checked(t[0], at::kChar, {vocab_, hidden_}, "embedding codes");
      embed_scales_ = checked(t[1], at::kHalf, {vocab_, hidden_ / kBlock}, "embedding scales");
    } else if (kind == "f16" || kind == "bf16") {
      TORCH_CHECK(t.size() == 1, kind, " embedding takes [weight]");
      embed_ = checked(t[0], kind == "f16" ? at::kHalf : at::kBFloat16, {vocab_, hidden_}, "embedding");
    } else {
      TORCH_CHECK(false, "native decode: embedding kind must be f32, f16, bf16 or int8_g32, got ", kind);
    }
  }

  void set_norms(int64_t layer, at::Tensor attn_norm, at::Tensor mlp_norm) {
    Layer& l = layer_at(layer);
    l.attn_norm = checked(attn_norm.to(at::kFloat), at::kFloat, {hidden_}, "input_layernorm weight");
    l.mlp_norm = checked(mlp_norm.to(at::kFloat), at::kFloat, {hidden_}, "post_attention_layernorm weight");
  }

  void set_final_norm(at::Tensor w) { final_norm_ = checked(w.to(at::kFloat), at::kFloat, {hidden_}, "final norm"); }

  void set_linear(int64_t layer, const std::string& role_name, const std::string& kind, std::vector<at::Tensor> t,
                  int64_t group_size, std::optional<at::Tensor> bias) {
    const int role = role_of(role_name);
    Packed p = pack(kind, t, group_size, bias);
    const int64_t q_dim = heads_ * head_dim_, kv_dim = kv_heads_ * head_dim_;
    const int64_t want[kRoles][2] = {{q_dim, hidden_},       {kv_dim, hidden_},       {kv_dim, hidden_},
                                     {hidden_, q_dim},       {intermediate_, hidden_}, {intermediate_, hidden_},
                                     {hidden_, intermediate_}};
    if (role < 0) {
      TORCH_CHECK(p.m.N == vocab_ && p.m.K == hidden_, "head must be [vocab, hidden]");
      head_ = std::move(p);
      has_head_ = true;
      return;
    }
    TORCH_CHECK(p.m.N == want[role][0] && p.m.K == want[role][1], "linear ", role_name, " of layer ", layer,
                " must be [", want[role][0], ", ", want[role][1], "], got [", p.m.N, ", ", p.m.K, "]");
    Layer& l = layer_at(layer);
    l.linears[role] = std::move(p);
    l.present[role] = true;
  }

  // Checks that every piece is set and plans the work items and scratch.
  void finalize() {
    TORCH_CHECK(embed_.defined() && final_norm_.defined() && has_head_, "NativeDecoder: embedding, final norm or head missing");
    for (size_t i = 0; i < layers_.size(); ++i) {
      TORCH_CHECK(layers_[i].attn_norm.defined(), "NativeDecoder: layer ", i, " has no norms");
      for (int r = 0; r < kRoles; ++r) TORCH_CHECK(layers_[i].present[r], "NativeDecoder: layer ", i, " misses a linear");
      const Packed* l = layers_[i].linears;
      shared_act_quant({&l[kQ], &l[kK], &l[kV]});
      shared_act_quant({&l[kGate], &l[kUp]});
      shared_act_scale({&l[kQ], &l[kK], &l[kV]});  // the step quantizes their shared input once
      shared_act_scale({&l[kGate], &l[kUp]});
    }
    const int threads = team_->size();
    const Layer& first = layers_.front();
    const int64_t head_tiles = head_dim_ / kTile;
    // q/k/v: whole heads per item, for RoPE and the cache write in the item's epilogue
    qkv_items_.clear();
    for (int r : {kQ, kK, kV}) {
      const int64_t per = tiles_per_item(first.linears[r], threads, head_tiles);
      for (int64_t t = 0; t < first.linears[r].m.tiles; t += per)
        qkv_items_.push_back({r, t, std::min(first.linears[r].m.tiles, t + per)});
    }
    auto plan = [&](const Packed& p, int role) {
      std::vector<Item> items;
      const int64_t per = tiles_per_item(p, threads);
      for (int64_t t = 0; t < p.m.tiles; t += per) items.push_back({role, t, std::min(p.m.tiles, t + per)});
      return items;
    };
    o_items_ = plan(first.linears[kO], kO);
    gate_up_items_ = plan(first.linears[kGate], kGate);  // each item also covers the same tiles of up
    down_items_ = plan(first.linears[kDown], kDown);
    head_items_ = plan(head_, -1);
    int64_t item_rows = 0;
    for (const auto* items : {&qkv_items_, &o_items_, &down_items_, &head_items_})
      for (const Item& it : *items) item_rows = std::max(item_rows, (it.t1 - it.t0) * kTile);
    for (const Item& it : gate_up_items_) item_rows = std::max(item_rows, 2 * (it.t1 - it.t0) * kTile);
    const int64_t k_max = std::max({hidden_, intermediate_, heads_ * head_dim_});
    scratch_.resize(threads);
    for (auto& s : scratch_) s.resize(slots_, k_max, slots_ * item_rows, max_len_);
    h_.assign(slots_ * hidden_, 0.0f);
    q_.assign(slots_ * heads_ * head_dim_, 0.0f);
    attn_.assign(slots_ * heads_ * head_dim_, 0.0f);
    act_.assign(slots_ * intermediate_, 0.0f);
    counters_ = std::vector<ItemCounter>(layers_.size() * 5 + 1);
    finalized_ = true;
  }

  // One step: row `rows[b]` of the cache gets token `tokens[b]` at `positions[b]`; returns logits [B, vocab].
  at::Tensor decode(std::vector<int64_t> rows, std::vector<int64_t> positions, std::vector<int64_t> tokens) {
    TORCH_CHECK(finalized_, "NativeDecoder.decode before finalize()");
    const int64_t B = static_cast<int64_t>(rows.size());
    TORCH_CHECK(B >= 1 && B <= slots_ && positions.size() == rows.size() && tokens.size() == rows.size(),
                "decode takes 1 to ", slots_, " rows, with one position and one token each");
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(rows[b] >= 0 && rows[b] < slots_, "cache row ", rows[b], " out of range");
      TORCH_CHECK(positions[b] >= 0 && positions[b] < max_len_, "position ", positions[b], " out of range");
      TORCH_CHECK(tokens[b] >= 0 && tokens[b] < vocab_, "token ", tokens[b], " out of range");
      for (int64_t c = 0; c < b; ++c) TORCH_CHECK(rows[c] != rows[b], "cache row ", rows[b], " given twice");
    }
    at::Tensor logits = at::empty({B, vocab_}, at::kFloat);
    std::lock_guard<std::mutex> lock(call_mutex_);  // one step at a time owns the state
    kt_ = &active_kernel_table();
    B_ = B;
    rows_ = rows.data();
    positions_ = positions.data();
    logits_ = logits.data_ptr<float>();
    embed(tokens);
    for (auto& c : counters_) c.next.store(0, std::memory_order_relaxed);
    team_->run(&NativeDecoder::job, this);
    return logits;
  }

  std::string describe() const {
    std::ostringstream out;
    out << "layers=" << layers_.size() << " threads=" << team_->size() << " kinds:";
    for (int r = 0; r < kRoles && !layers_.empty(); ++r) out << " " << layers_.front().linears[r].kind;
    out << " head=" << head_.kind << " packed_bytes=" << packed_bytes();
    return out.str();
  }

  int64_t packed_bytes() const {  // memory the repacked tiles take (float weights are read in place)
    int64_t total = head_.m.kind == PackKind::f32 ? 0 : head_.storage.numel();
    for (const Layer& l : layers_)
      for (const Packed& p : l.linears)
        if (p.storage.defined() && p.m.kind != PackKind::f32) total += p.storage.numel();
    return total;
  }

  int64_t threads() const { return team_->size(); }

  int64_t weight_bytes_per_step() const {  // weights one decode step reads (any batch size)
    int64_t total = head_.bytes_read();
    for (const Layer& l : layers_)
      for (const Packed& p : l.linears) total += p.bytes_read();
    return total;
  }

  // Record the inputs of every matmul of the following steps, for checks against the torch
  // path (off by default). Per layer: h, norm(h) (q/k/v input), attention (o input), h after
  // attention, its norm (gate/up input), SiLU(gate)·up (down input); then h and norm(h) (head).
  // [B, features] each, in that order.
  void set_capture(bool on) {
    std::lock_guard<std::mutex> lock(call_mutex_);
    capture_ = on;
    captured_.clear();
  }

  std::vector<at::Tensor> captured() {
    std::lock_guard<std::mutex> lock(call_mutex_);
    return captured_;
  }

 private:
  Layer& layer_at(int64_t i) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(layers_.size()), "layer ", i, " out of range");
    return layers_[i];
  }

  void embed(const std::vector<int64_t>& tokens) {
    for (int64_t b = 0; b < B_; ++b) {
      float* h = h_.data() + b * hidden_;
      if (!embed_scales_.defined()) {
        if (embed_.scalar_type() == at::kFloat) {
          std::memcpy(h, embed_.data_ptr<float>() + tokens[b] * hidden_, hidden_ * sizeof(float));
        } else if (embed_.scalar_type() == at::kHalf) {
          const at::Half* row = embed_.data_ptr<at::Half>() + tokens[b] * hidden_;
          for (int64_t i = 0; i < hidden_; ++i) h[i] = static_cast<float>(row[i]);
        } else {
          const at::BFloat16* row = embed_.data_ptr<at::BFloat16>() + tokens[b] * hidden_;
          for (int64_t i = 0; i < hidden_; ++i) h[i] = static_cast<float>(row[i]);
        }
        continue;
      }
      const int8_t* codes = embed_.data_ptr<int8_t>() + tokens[b] * hidden_;
      const at::Half* scales = embed_scales_.data_ptr<at::Half>() + tokens[b] * (hidden_ / kBlock);
      for (int64_t k = 0; k < hidden_; ++k) h[k] = static_cast<float>(codes[k]) * static_cast<float>(scales[k / kBlock]);
    }
  }

  static void job(void* ctx, int thread) { static_cast<NativeDecoder*>(ctx)->step(thread); }

  // With capture on, thread 0 records each matmul's float input (for checks against the torch path).
  void record(int thread, const DecodeActs& a, const float* src = nullptr) {
    if (!capture_ || thread != 0) return;
    for (const float* p : {src, a.x}) {
      if (p == nullptr) continue;
      at::Tensor t = at::empty({a.M, a.K}, at::kFloat);
      std::memcpy(t.data_ptr<float>(), p, a.M * a.K * sizeof(float));
      captured_.push_back(t);
    }
  }

  // x[j] * cos[j] + rotate_half(x)[j] * sin[j], as LlamaRunner's rotation matrices apply it.
  void rope(const float* x, int64_t position, float* out) const {
    const float* c = cos_.data_ptr<float>() + position * head_dim_;
    const float* s = sin_.data_ptr<float>() + position * head_dim_;
    const int64_t half = head_dim_ / 2;
    for (int64_t j = 0; j < half; ++j) out[j] = x[j] * c[j] + -x[j + half] * s[j];
    for (int64_t j = half; j < head_dim_; ++j) out[j] = x[j] * c[j] + x[j - half] * s[j];
  }

  float* cache_at(const at::Tensor& cache, int64_t layer, int64_t b, int64_t kv_head) const {
    return cache.data_ptr<float>() + (((layer * slots_ + rows_[b]) * kv_heads_ + kv_head) * max_len_) * head_dim_;
  }

  // Computes tiles [t0, t1) of `p` for every row into s.y (+ offset rows), adding the bias.
  int64_t gemv(const Packed& p, const DecodeActs& a, int64_t t0, int64_t t1, Scratch& s, int64_t offset = 0) {
    const int64_t ldy = (t1 - t0) * kTile;
    float* y = s.y.data() + offset;
    kt_->packed_gemv(p.m, a, t0, t1, y, ldy);
    if (p.bias.defined()) {
      const float* bias = p.bias.data_ptr<float>() + t0 * kTile;
      const int64_t valid = std::min(p.m.N, t1 * kTile) - t0 * kTile;
      for (int64_t b = 0; b < B_; ++b)
        for (int64_t n = 0; n < valid; ++n) y[b * ldy + n] += bias[n];
    }
    return ldy;
  }

  void step(int thread) {
    Scratch& s = scratch_[thread];
    const int64_t q_dim = heads_ * head_dim_, group = heads_ / kv_heads_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    size_t phase = 0;
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& l = layers_[li];
      const int64_t layer = static_cast<int64_t>(li);
      // q, k, v from one normalized, quantized copy of h; RoPE and the KV write in the epilogue
      {
        const ActQuant quant = shared_act_quant({&l.linears[kQ], &l.linears[kK], &l.linears[kV]});
        const DecodeActs a = s.prepare(*kt_, h_.data(), B_, hidden_, l.attn_norm.data_ptr<float>(), eps_, quant,
                                       shared_act_scale({&l.linears[kQ], &l.linears[kK], &l.linears[kV]}));
        record(thread, a, h_.data());
        ItemCounter& counter = counters_[phase++];
        for (int64_t i = counter.take(); i < static_cast<int64_t>(qkv_items_.size()); i = counter.take()) {
          const Item& it = qkv_items_[i];
          const int64_t ldy = gemv(l.linears[it.role], a, it.t0, it.t1, s, 0);
          const int64_t first_head = it.t0 * kTile / head_dim_, n_heads = ldy / head_dim_;
          for (int64_t b = 0; b < B_; ++b)
            for (int64_t hh = 0; hh < n_heads; ++hh) {
              const float* y = s.y.data() + b * ldy + hh * head_dim_;
              const int64_t head = first_head + hh;
              if (it.role == kQ) {
                rope(y, positions_[b], q_.data() + b * q_dim + head * head_dim_);
              } else if (it.role == kK) {
                rope(y, positions_[b], cache_at(k_cache_, layer, b, head) + positions_[b] * head_dim_);
              } else {
                std::memcpy(cache_at(v_cache_, layer, b, head) + positions_[b] * head_dim_, y,
                            head_dim_ * sizeof(float));
              }
            }
        }
      }
      team_->barrier();
      // attention: one item per (sequence, query head), over the sequence's own length
      {
        ItemCounter& counter = counters_[phase++];
        for (int64_t i = counter.take(); i < B_ * heads_; i = counter.take()) {
          const int64_t b = i / heads_, head = i % heads_, kv_head = head / group;
          kt_->attend(q_.data() + b * q_dim + head * head_dim_, cache_at(k_cache_, layer, b, kv_head),
                      cache_at(v_cache_, layer, b, kv_head), positions_[b] + 1, head_dim_, scale, s.scores.data(),
                      attn_.data() + b * q_dim + head * head_dim_);
        }
      }
      team_->barrier();
      // o_proj + residual
      {
        const DecodeActs a = s.prepare(*kt_, attn_.data(), B_, q_dim, nullptr, eps_, act_quant(l.linears[kO]),
                                       l.linears[kO].act_scale);
        record(thread, a);
        residual_phase(l.linears[kO], a, o_items_, counters_[phase++], s);
      }
      team_->barrier();
      // gate and up from one normalized, quantized copy of h; SiLU(gate) * up in the epilogue
      {
        const ActQuant quant = shared_act_quant({&l.linears[kGate], &l.linears[kUp]});
        const DecodeActs a = s.prepare(*kt_, h_.data(), B_, hidden_, l.mlp_norm.data_ptr<float>(), eps_, quant,
                                       shared_act_scale({&l.linears[kGate], &l.linears[kUp]}));
        record(thread, a, h_.data());
        ItemCounter& counter = counters_[phase++];
        for (int64_t i = counter.take(); i < static_cast<int64_t>(gate_up_items_.size()); i = counter.take()) {
          const Item& it = gate_up_items_[i];
          const int64_t ldy = gemv(l.linears[kGate], a, it.t0, it.t1, s, 0);
          gemv(l.linears[kUp], a, it.t0, it.t1, s, B_ * ldy);
          const int64_t n0 = it.t0 * kTile, valid = std::min(intermediate_, it.t1 * kTile) - n0;
          for (int64_t b = 0; b < B_; ++b)
            kt_->silu_mul(s.y.data() + b * ldy, s.y.data() + (B_ + b) * ldy, valid,
                          act_.data() + b * intermediate_ + n0);
        }
      }
      team_->barrier();
      // down + residual
      {
        const DecodeActs a = s.prepare(*kt_, act_.data(), B_, intermediate_, nullptr, eps_,
                                       act_quant(l.linears[kDown]), l.linears[kDown].act_scale);
        record(thread, a);
        residual_phase(l.linears[kDown], a, down_items_, counters_[phase++], s);
      }
      team_->barrier();
    }
    // final norm and output head
    const DecodeActs a = s.prepare(*kt_, h_.data(), B_, hidden_, final_norm_.data_ptr<float>(), eps_, act_quant(head_),
                                   head_.act_scale);
    record(thread, a, h_.data());
    ItemCounter& counter = counters_[phase++];
    for (int64_t i = counter.take(); i < static_cast<int64_t>(head_items_.size()); i = counter.take()) {
      const Item& it = head_items_[i];
      const int64_t ldy = gemv(head_, a, it.t0, it.t1, s, 0);
      const int64_t n0 = it.t0 * kTile, valid = std::min(vocab_, it.t1 * kTile) - n0;
      for (int64_t b = 0; b < B_; ++b)
        std::memcpy(logits_ + b * vocab_ + n0, s.y.data() + b * ldy, valid * sizeof(float));
    }
  }

  // h[b, n] += (x · Wᵀ)[b, n] over the phase's items
  void residual_phase(const Packed& p, const DecodeActs& a, const std::vector<Item>& items, ItemCounter& counter,
                      Scratch& s) {
    for (int64_t i = counter.take(); i < static_cast<int64_t>(items.size()); i = counter.take()) {
      const Item& it = items[i];
      const int64_t ldy = gemv(p, a, it.t0, it.t1, s, 0);
      const int64_t n0 = it.t0 * kTile, valid = std::min(hidden_, it.t1 * kTile) - n0;
      for (int64_t b = 0; b < B_; ++b) {
        float* h = h_.data() + b * hidden_ + n0;
        const float* y = s.y.data() + b * ldy;
        for (int64_t n = 0; n < valid; ++n) h[n] += y[n];
      }
    }
  }

  // model
  int64_t hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, intermediate_ = 0, vocab_ = 0;
  int64_t slots_ = 0, max_len_ = 0;
  float eps_;
  at::Tensor k_cache_, v_cache_, cos_, sin_, embed_, embed_scales_, final_norm_;
  std::vector<Layer> layers_;
  Packed head_;
  bool has_head_ = false, finalized_ = false;
  // plan and state
  std::shared_ptr<SpinTeam> team_;
  std::vector<Item> qkv_items_, o_items_, gate_up_items_, down_items_, head_items_;
  std::vector<Scratch> scratch_;
  std::vector<float> h_, q_, attn_, act_;
  std::vector<ItemCounter> counters_;
  std::mutex call_mutex_;
  bool capture_ = false;
  std::vector<at::Tensor> captured_;
  // the step in flight
  const KernelTable* kt_ = nullptr;
  int64_t B_ = 0;
  const int64_t* rows_ = nullptr;
  const int64_t* positions_ = nullptr;
  float* logits_ = nullptr;
};

}  // namespace
}  // namespace qs

TORCH_LIBRARY_FRAGMENT(quantserve, m) {
  m.class_<qs::NativeLinear>("NativeLinear")
      .def(torch::init<std::string, std::vector<at::Tensor>, int64_t, std::optional<at::Tensor>, int64_t>())
      .def("forward", &qs::NativeLinear::forward)
      .def("bench", &qs::NativeLinear::bench)
      .def("weight_bytes", &qs::NativeLinear::weight_bytes)
      .def("kernel", &qs::NativeLinear::kernel);
  m.class_<qs::NativeDecoder>("NativeDecoder")
      .def(torch::init<std::vector<int64_t>, double, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t>())
      .def("set_embedding", &qs::NativeDecoder::set_embedding)
      .def("set_norms", &qs::NativeDecoder::set_norms)
      .def("set_final_norm", &qs::NativeDecoder::set_final_norm)
      .def("set_linear", &qs::NativeDecoder::set_linear)
      .def("finalize", &qs::NativeDecoder::finalize)
      .def("decode", &qs::NativeDecoder::decode)
      .def("describe", &qs::NativeDecoder::describe)
      .def("packed_bytes", &qs::NativeDecoder::packed_bytes)
      .def("threads", &qs::NativeDecoder::threads)
      .def("weight_bytes_per_step", &qs::NativeDecoder::weight_bytes_per_step)
      .def("set_capture", &qs::NativeDecoder::set_capture)
      .def("captured", &qs::NativeDecoder::captured);
}
