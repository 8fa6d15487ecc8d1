// Small-batch linear on CPU: torch.ops.srlm_C.small_batch_linear(x [M, K], weight [N, K], bias?) -> [M, N].
//
// Decode steps at small batch multiply a few rows by every weight matrix of the model: the time is
// the time to stream the weights from memory once. torch's CPU matmul reaches ~1/3 of this
// machine's read bandwidth there at M = 1 and far less at M = 2..8 (it packs for a GEMM). This op
// streams each weight row once and multiplies it with all M rows of x (M <= 8 accumulators kept
// in registers), OpenMP threads taking equal slices of the N output rows.
// Arithmetic: float32 accumulation for float32 and bfloat16 storage (bf16 rows widened in
// registers by a 16-bit shift); the output has x's dtype. Bias, if given, is added in float32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kMaxRows = 8;  // the largest M this op takes

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

using ::load16;  // the float one, from simd.h

SRLM_INLINE f32x16 load16(const c10::BFloat16* p) {  // bf16 -> f32: the 16 bits are the high half
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 u = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

struct Args {
  const float* x;  // [M, K] float32 (bf16 inputs are widened once before the threads start)
  const void* w;   // [N, K] contiguous, float32 or bf16
  const float* bias;  // [N] float32 or nullptr
  float* y;        // [M, N] float32
  int64_t N, K;
};

// Rows [n0, n1) of the output for all M rows of x.
template <typename T, int M>
SRLM_INLINE void rows(const Args& a, int64_t n0, int64_t n1) {
  const T* W = static_cast<const T*>(a.w);
  const int64_t K = a.K, K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    f32x16 acc[M] = {};
    for (int64_t k = 0; k < K16; k += 16) {
      const f32x16 wv = load16(w + k);
      for (int m = 0; m < M; ++m) acc[m] += wv * load16(a.x + m * K + k);
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[m]);
      for (int64_t k = K16; k < K; ++k) s += static_cast<float>(w[k]) * a.x[m * K + k];
      a.y[m * a.N + n] = s + (a.bias ? a.bias[n] : 0.0f);
    }
  }
}

template <typename T>
SRLM_INLINE void rows_any_m(const Args& a, int64_t M, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows<T, 1>(a, n0, n1);
    case 2: return rows<T, 2>(a, n0, n1);
    case 3: return rows<T, 3>(a, n0, n1);
    case 4: return rows<T, 4>(a, n0, n1);
    case 5: return rows<T, 5>(a, n0, n1);
    case 6: return rows<T, 6>(a, n0, n1);
    case 7: return rows<T, 7>(a, n0, n1);
    default: return rows<T, 8>(a, n0, n1);
  }
}

// One non-template entry per dtype, so that target_clones can build each for several ISAs.
SRLM_MULTIVERSION void rows_f32(const Args& a, int64_t M, int64_t n0, int64_t n1) { rows_any_m<float>(a, M, n0, n1); }
SRLM_MULTIVERSION void rows_bf16(const Args& a, int64_t M, int64_t n0, int64_t n1) {
  rows_any_m<c10::BFloat16>(a, M, n0, n1);
}

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "srlm_C::small_batch_linear: ";
  TORCH_CHECK(x.dim() == 2, op, "x must be [M, K], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, "weight must be [N, K], got shape ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, op, "weight has K = ", weight.size(1), " but x has K = ", K);
  TORCH_CHECK(M <= kMaxRows, op, "x has ", M, " rows; this op takes at most ", kMaxRows);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, "x must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, op, "weight (", weight.scalar_type(), ") must have x's dtype ", dtype);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, "x and weight must be CPU tensors");
  TORCH_CHECK(weight.is_contiguous(), op, "weight must be contiguous");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "bias must be [N=", N, "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype && bias->device().is_cpu(), op, "bias must be a CPU tensor of x's dtype");
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  const at::Tensor xf = x.to(at::kFloat).contiguous();  // M x K values: cheap next to the weights
  const at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor yf = dtype == at::kFloat ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
  const Args a{xf.data_ptr<float>(), weight.data_ptr(), bias ? bf.data_ptr<float>() : nullptr, yf.data_ptr<float>(), N, K};
  // Equal slices of whole rows per thread; below ~64k weights waking the threads costs more.
  const int64_t threads = N * K >= (1 << 16) ? std::min<int64_t>(omp_get_max_threads(), N) : 1;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
    if (dtype == at::kFloat) rows_f32(a, M, n0, n1);
    else rows_bf16(a, M, n0, n1);
  }
  if (dtype != at::kFloat) out.copy_(yf);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(srlm_C, CPU, m) { m.impl("small_batch_linear", &small_batch_linear_cpu); }
