// Paged-KV decode attention on CPU: torch.ops.srlm_C.paged_decode_attention.
//
//   out[b, h] = sum_t softmax_t(scale * q[b, h] . K[b, t, h / G]) V[b, t, h / G],   t < context_lens[b]
//   K[b, t, j] = k_cache[block_tables[b, t / bs], t % bs, j]        (same for V), G = nh / nkv
//
// Work item = (sequence, kv head): the G query heads that share a kv head are processed together,
// so each key and value row is read from memory once and used G times. Two passes over a
// per-thread scratch of logits [G, L] (exact softmax, no running rescale of the accumulator):
//   1. logits = (scale q) . k for every cached token, walking the sequence's blocks;
//   2. p = exp(logits - max), acc += p v; out = acc / sum p.
// Arithmetic is float32 for float32/bfloat16/float16 storage (low-precision rows are widened
// once per row) and float64 for float64. Items go to OpenMP threads dynamically: ragged context
// lengths make static chunks uneven.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct DecodeArgs {
  const void* q;  // [B, nh, hd], rows of hd contiguous
  int64_t q_s0, q_s1;
  const void* k_cache;  // [num_blocks, bs, nkv, hd], contiguous
  const void* v_cache;
  const int32_t* block_tables;  // [B, max_blocks], contiguous
  int64_t max_blocks;
  const int32_t* context_lens;  // [B]
  int64_t nh, nkv, hd, bs;
  double scale;
  void* out;  // [B, nh, hd], contiguous
};

// A row of n values as the accumulation type: the row itself when it already is, else widened into buf.
template <typename T, typename A>
SRLM_INLINE const A* widen(const T* __restrict src, A* __restrict buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// a . b: float32 in 16-lane vectors, then a tree over the lanes. (`omp simd reduction` vectorizes
// the products too, but gcc 12 then adds the 16 lanes one by one: a chain of 16 dependent adds.)
SRLM_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  f32x16 acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    f32x16 x, y;
    __builtin_memcpy(&x, a + i, sizeof x);  // unaligned vector loads
    __builtin_memcpy(&y, b + i, sizeof y);
    acc += x * y;
  }
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

SRLM_INLINE double dot(const double* __restrict a, const double* __restrict b, int64_t n) {
  double s = 0;  // float64 is the checking path: plain is fine
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for x <= 0 in float, written so that gcc vectorizes the loop calling it (glibc's expf is
// only vectorized under -ffast-math). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a
// degree-6 polynomial for e^r (Cephes expf coefficients): relative error ~2 ulp; 0 below -87.
SRLM_INLINE float exp_nonpos(float x) {
  const float lo = -87.0f;
  const bool under = x < lo;
  x = under ? lo : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float p = exp_reduced(x - n * kLn2Hi - n * kLn2Lo);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return under ? 0.0f : p * scale;
}

SRLM_INLINE double exp_nonpos(double x) { return std::exp(x); }

// Prefetches the cache lines of n_bytes from p (one token's rows in the next block: random
// block placement defeats the hardware prefetcher at every block boundary). Into L2, not L1:
// L1's few miss buffers capped a 200 MB cache at ~8 GB/s per core, L2 reaches ~11 (Zen 4, fp32).
SRLM_INLINE void prefetch_bytes(const void* p, int64_t n_bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < n_bytes; o += 64) __builtin_prefetch(c + o, 0, 1);
}

// One item: sequence b, kv heads [j0, j1) and their query heads [j0*G, j1*G), writing those rows
// of out[b]. HD > 0 fixes head_dim at compile time (unrolled inner loops); HD == 0 reads a.hd.
// scratch holds 2*H*hd + hd + H*L values, H = (j1 - j0) * G query heads.
template <typename T, int HD>
SRLM_INLINE void decode_item(const DecodeArgs& a, int64_t b, int64_t j0, int64_t j1, acc_t<T>* __restrict scratch) {
  using A = acc_t<T>;
  const int64_t G = a.nh / a.nkv, hd = HD > 0 ? HD : a.hd, bs = a.bs;
  const int64_t H = (j1 - j0) * G;  // query heads of this item
  const int64_t L = a.context_lens[b];
  T* __restrict out = static_cast<T*>(a.out) + (b * a.nh + j0 * G) * hd;
  if (L == 0) {
    std::fill(out, out + H * hd, T(0));
    return;
  }
  A* __restrict qf = scratch;        // [H, hd] scaled queries; later 1/sum per head
  A* __restrict acc = qf + H * hd;   // [H, hd]
  A* __restrict row = acc + H * hd;  // [hd] one widened key/value row
  A* __restrict logits = row + hd;   // [H, L]

  const T* q = static_cast<const T*>(a.q) + b * a.q_s0 + j0 * G * a.q_s1;
  const A scale = static_cast<A>(a.scale);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < hd; ++d) qf[h * hd + d] = static_cast<A>(q[h * a.q_s1 + d]) * scale;

  const int32_t* table = a.block_tables + b * a.max_blocks;
  const int64_t rs = a.nkv * hd;  // elements between consecutive tokens of a block
  const int64_t item_bytes = (j1 - j0) * hd * static_cast<int64_t>(sizeof(T));  // this item's part of a token
  const T* k_base = static_cast<const T*>(a.k_cache) + j0 * hd;
  const T* v_base = static_cast<const T*>(a.v_cache) + j0 * hd;

  // Pass 1: logits[h, t] = qf[h] . k_t, each key row used by the G query heads of its kv head.
  for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
    const T* kb = k_base + static_cast<int64_t>(table[blk]) * bs * rs;
    const T* next = t0 + bs < L ? k_base + static_cast<int64_t>(table[blk + 1]) * bs * rs : nullptr;
    const int64_t n = std::min(bs, L - t0);
    for (int64_t i = 0; i < n; ++i) {
      if (next) prefetch_bytes(next + i * rs, item_bytes);
      for (int64_t j = 0; j < j1 - j0; ++j) {
        const A* kr = widen(kb + i * rs + j * hd, row, hd);
        for (int64_t g = 0; g < G; ++g) logits[(j * G + g) * L + t0 + i] = dot(qf + (j * G + g) * hd, kr, hd);
      }
    }
  }

  // Softmax numerators in place; acc is normalized at the end.
  for (int64_t h = 0; h < H; ++h) {
    A* lg = logits + h * L;
    A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < L; ++t) m = std::max(m, lg[t]);
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < L; ++t) {
      lg[t] = exp_nonpos(lg[t] - m);
      s += lg[t];
    }
    qf[h] = A(1) / s;  // the queries are done with
  }

  // Pass 2: acc[h] = sum_t p[h, t] v_t
  std::fill(acc, acc + H * hd, A(0));
  for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
    const T* vb = v_base + static_cast<int64_t>(table[blk]) * bs * rs;
    const T* next = t0 + bs < L ? v_base + static_cast<int64_t>(table[blk + 1]) * bs * rs : nullptr;
    const int64_t n = std::min(bs, L - t0);
    for (int64_t i = 0; i < n; ++i) {
      if (next) prefetch_bytes(next + i * rs, item_bytes);
      for (int64_t j = 0; j < j1 - j0; ++j) {
        const A* vr = widen(vb + i * rs + j * hd, row, hd);
        for (int64_t g = 0; g < G; ++g) {
          const A p = logits[(j * G + g) * L + t0 + i];
          A* __restrict ah = acc + (j * G + g) * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) ah[d] += p * vr[d];
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const A inv = qf[h];
    for (int64_t d = 0; d < hd; ++d) out[h * hd + d] = static_cast<T>(acc[h * hd + d] * inv);
  }
}

template <typename T>
SRLM_INLINE void decode_item_any_hd(const DecodeArgs& a, int64_t b, int64_t j0, int64_t j1, acc_t<T>* scratch) {
  switch (a.hd) {  // the head sizes of the Llama family; others take the generic loops
    case 64: return decode_item<T, 64>(a, b, j0, j1, scratch);
    case 128: return decode_item<T, 128>(a, b, j0, j1, scratch);
    default: return decode_item<T, 0>(a, b, j0, j1, scratch);
  }
}

// One non-template entry per dtype, so that target_clones can build each for several ISAs.
#define SRLM_ITEM(name, T)                                                                    \
  SRLM_MULTIVERSION void name(const DecodeArgs& a, int64_t b, int64_t j0, int64_t j1, acc_t<T>* s) { \
    decode_item_any_hd<T>(a, b, j0, j1, s);                                                    \
  }
SRLM_ITEM(item_f32, float)
SRLM_ITEM(item_f64, double)
SRLM_ITEM(item_bf16, c10::BFloat16)
SRLM_ITEM(item_f16, c10::Half)
#undef SRLM_ITEM

template <typename T>
void run_items(const DecodeArgs& a, int64_t B, int64_t max_len, int64_t total_len) {
  using A = acc_t<T>;
  const int64_t G = a.nh / a.nkv;
  const int64_t max_threads = omp_get_max_threads();
  // Whole sequences when there are enough of them to balance the threads: a block's rows of all
  // kv heads are then read as one contiguous stretch. Otherwise one kv head per item.
  const int64_t heads_per_item = B >= 4 * max_threads ? a.nkv : 1;
  const int64_t parts = a.nkv / heads_per_item;
  const int64_t n_items = B * parts;
  const int64_t H = heads_per_item * G;
  const int64_t scratch_len = 2 * H * a.hd + a.hd + H * max_len;
  const int n_threads = static_cast<int>(std::min(max_threads, n_items));
  // Below ~4k key rows (~0.1 ms on one core) waking the other threads costs more than it saves.
  const bool parallel = total_len * a.nkv >= 4096;
#pragma omp parallel num_threads(n_threads) if (parallel)
  {
    std::vector<A> scratch(scratch_len);  // once per thread and call, reused by every item
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t b = it / parts, j0 = (it % parts) * heads_per_item, j1 = j0 + heads_per_item;
      if constexpr (std::is_same_v<T, float>) item_f32(a, b, j0, j1, scratch.data());
      else if constexpr (std::is_same_v<T, double>) item_f64(a, b, j0, j1, scratch.data());
      else if constexpr (std::is_same_v<T, c10::BFloat16>) item_bf16(a, b, j0, j1, scratch.data());
      else item_f16(a, b, j0, j1, scratch.data());
    }
  }
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const char* op = "srlm_C::paged_decode_attention: ";
  TORCH_CHECK(q.dim() == 3, op, "q must be [B, num_heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache has shape ", v_cache.sizes(),
              ", expected the shape of k_cache ", k_cache.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, op,
              "q must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype, op, "k_cache (",
              k_cache.scalar_type(), ") and v_cache (", v_cache.scalar_type(), ") must have q's dtype ", dtype);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, op, "block_tables must be int32, got ", block_tables.scalar_type());
  TORCH_CHECK(context_lens.scalar_type() == at::kInt, op, "context_lens must be int32, got ", context_lens.scalar_type());
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, &block_tables, &context_lens})
    TORCH_CHECK(t->device().is_cpu(), op, "all inputs must be CPU tensors, got one on ", t->device());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, "k_cache and v_cache must be contiguous");

  const int64_t B = q.size(0), nh = q.size(1), hd = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), nkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hd, op, "k_cache head_dim ", k_cache.size(3), " != q head_dim ", hd);
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, op, "num_heads ", nh, " must be a multiple of num_kv_heads ", nkv);
  TORCH_CHECK(bs > 0, op, "block_size must be positive, got ", bs);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B, op, "block_tables must be [B=", B,
              ", max_blocks], got shape ", block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B, op, "context_lens must be [B=", B,
              "], got shape ", context_lens.sizes());

  const at::Tensor bt = block_tables.contiguous();
  const at::Tensor lens = context_lens.contiguous();
  const int64_t max_blocks = bt.size(1);
  const int32_t* bt_p = bt.data_ptr<int32_t>();
  const int32_t* lens_p = lens.data_ptr<int32_t>();
  int64_t max_len = 0, total_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens_p[b];
    TORCH_CHECK(L >= 0 && L <= max_blocks * bs, op, "context_lens[", b, "] = ", L, " is outside [0, max_blocks * block_size = ",
                max_blocks * bs, "]");
    for (int64_t i = 0; i < (L + bs - 1) / bs; ++i) {
      const int64_t blk = bt_p[b * max_blocks + i];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, op, "block_tables[", b, ", ", i, "] = ", blk,
                  " is outside [0, num_blocks = ", num_blocks, ") and is used by context length ", L);
    }
    max_len = std::max(max_len, L);
    total_len += L;
  }

  // Only the last dim of q must be dense (q may be a view of a fused qkv projection).
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  at::Tensor out = at::empty({B, nh, hd}, q.options());
  if (B == 0 || nh == 0 || hd == 0) return out;

  DecodeArgs a{qc.data_ptr(), qc.stride(0), qc.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), bt_p, max_blocks,
               lens_p, nh, nkv, hd, bs, scale, out.data_ptr()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "paged_decode_attention",
                                  [&] { run_items<scalar_t>(a, B, max_len, total_len); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(srlm_C, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention_cpu); }
