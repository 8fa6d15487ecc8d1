// Shared by the CPU kernels: multiversioned builds and 16-lane float vectors.
#pragma once

#include <cstdint>
#include <cstring>

// Builds the hot function for AVX-512, AVX2+FMA and baseline x86-64 and picks one at load time
// (setup.py compiles for baseline x86-64 only, which would leave the inner loops at SSE2).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SRLM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SRLM_MULTIVERSION
#endif
#define SRLM_INLINE inline __attribute__((always_inline))

// GCC vector extensions: lowered to whatever the target clone has (one zmm, two ymm, four xmm).
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

// The sum of 16 lanes as a tree (a loop would add them one by one: 16 dependent adds).
SRLM_INLINE float hsum(f32x16 a) {
  const f32x8 h8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// e^r for |r| <= ln(2) / 2 after a Cody-Waite reduction x = n ln2 + r (r = x - n * kLn2Hi - n * kLn2Lo):
// Cephes' expf polynomial, ~1-2 ulp. V is float or a float vector (a scalar broadcasts).
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
template <typename V>
SRLM_INLINE V exp_reduced(V r) {
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

SRLM_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

SRLM_INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

SRLM_INLINE f32x16 splat(float v) { return f32x16{} + v; }

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2 (exp_reduced above); inputs are
// clamped to [-87.3, 88.4], so exp16(-inf) is ~1e-38, not 0.
SRLM_INLINE f32x16 exp16(f32x16 x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365447504f) ? x : splat(-87.3365447504f);  // 2^n stays a normal float
  const f32x16 fx = x * 1.44269504088896341f;
  const i32x16 n = __builtin_convertvector(fx + (fx >= splat(0.f) ? splat(0.5f) : splat(-0.5f)), i32x16);
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  const f32x16 p = exp_reduced(x - nf * kLn2Hi - nf * kLn2Lo);
  const i32x16 bits = (n + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Whether any lane of a comparison mask (lanes 0 or -1) is set, as a tree.
SRLM_INLINE bool any16(i32x16 m) {
  const i32x8 h8 = __builtin_shufflevector(m, m, 0, 1, 2, 3, 4, 5, 6, 7) |
                   __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15);
  const i32x4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) | __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] | h4[1] | h4[2] | h4[3]) != 0;
}
