// KV-cache writes on CPU: torch.ops.srlm_C.reshape_and_cache.
//
//   k_cache.view(-1, nkv, hd)[slot_mapping[i]] = k[i]   (same for v), for every i with slot_mapping[i] != -1
//
// The caches are [num_blocks, block_size, nkv, hd] and contiguous, so a slot is one contiguous
// row of nkv * hd elements. Tokens are independent: OpenMP splits them when there are many.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <initializer_list>

namespace {

void reshape_and_cache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                           const at::Tensor& slot_mapping) {
  const char* op = "srlm_C::reshape_and_cache: ";
  TORCH_CHECK(k_cache.dim() == 4, op, "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache has shape ", v_cache.sizes(),
              ", expected the shape of k_cache ", k_cache.sizes());
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), nkv = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == nkv && k.size(2) == hd, op, "k must be [N, num_kv_heads=", nkv,
              ", head_dim=", hd, "], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, "v has shape ", v.sizes(), ", expected the shape of k ", k.sizes());
  const int64_t N = k.size(0);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == N, op, "slot_mapping must be [N=", N,
              "], got shape ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, op, "slot_mapping must be int64, got ",
              slot_mapping.scalar_type());
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype, op,
              "k (", k.scalar_type(), "), v (", v.scalar_type(), ") and v_cache (", v_cache.scalar_type(),
              ") must have k_cache's dtype ", dtype);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &k_cache, &v_cache, &slot_mapping})
    TORCH_CHECK(t->device().is_cpu(), op, "all inputs must be CPU tensors, got one on ", t->device());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op,
              "k_cache and v_cache must be contiguous (they are written in place)");

  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(slot_p[i] >= -1 && slot_p[i] < num_slots, op, "slot_mapping[", i, "] = ", slot_p[i],
                " is outside [0, num_blocks * block_size = ", num_slots, ") and is not -1");

  // A token's nkv * hd values are one memcpy when its heads are dense (k may be a view of a qkv projection).
  const at::Tensor kc = (k.stride(2) == 1 && k.stride(1) == hd) ? k : k.contiguous();
  const at::Tensor vc = (v.stride(2) == 1 && v.stride(1) == hd) ? v : v.contiguous();
  const int64_t row_bytes = nkv * hd * static_cast<int64_t>(k.element_size());
  const char* k_src = static_cast<const char*>(kc.data_ptr());
  const char* v_src = static_cast<const char*>(vc.data_ptr());
  const int64_t k_s0 = kc.stride(0) * kc.element_size(), v_s0 = vc.stride(0) * vc.element_size();
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  // A decode step writes one row per sequence (a few KB): threads only pay off for prefill-sized N.
#pragma omp parallel for schedule(static) if (N * row_bytes >= (1 << 20))
  for (int64_t i = 0; i < N; ++i) {
    const int64_t s = slot_p[i];
    if (s < 0) continue;
    std::memcpy(k_dst + s * row_bytes, k_src + i * k_s0, row_bytes);
    std::memcpy(v_dst + s * row_bytes, v_src + i * v_s0, row_bytes);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(srlm_C, CPU, m) { m.impl("reshape_and_cache", &reshape_and_cache_cpu); }
