// Shared by the CPU kernels: multiversioned builds and 16-lane float vectors.
#pragma once

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
