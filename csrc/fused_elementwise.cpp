// Fused element-wise ops of the Llama block for CPU training (float32), forward and backward:
//   rms_norm(x [..., H], w [H], eps) -> (y, rstd [...])   y = w * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps)
//   rms_norm_backward(dy, x, w, rstd) -> (dx, dw)
//   swiglu(g, u) -> silu(g) * u;   swiglu_backward(dy, g, u) -> (dg, du)
//   rope(x [..., nh, hd], cos [..., hd], sin [..., hd]) -> x * cos + rotate_half(x) * sin
//   rope_backward(dy, cos, sin) -> dx   (the transpose of rope's map on each pair (x[i], x[i + hd/2]))
//
// torch runs each of these as 4-10 passes over the activations, each allocating its result; here
// one pass reads the inputs once and writes the outputs once, threads taking slices of the rows
// (at::parallel_for; the loop bodies are multiversioned for AVX-512 / AVX2). exp is a vectorized
// polynomial (Cephes' expf, ~1 ulp). The PyTorch references are in srlm_engine/model/fused.py;
// results agree with them to float32 rounding, not bit for bit (sums run in another order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "simd.h"

namespace {

SRLM_INLINE f32x16 sigmoid16(f32x16 g) { return 1.f / (1.f + exp16(-g)); }

// sum(a[i] * b[i] * c[i]) (c == nullptr: sum(a[i] * b[i])) in 16 lanes, then a tree: a plain loop
// would be one chain of dependent adds (the compiler may not reorder float sums).
SRLM_INLINE float dot(const float* a, const float* b, const float* c, int64_t n) {
  f32x16 acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i) * (c ? load16(c + i) : splat(1.f));
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i] * (c ? c[i] : 1.f);
  return s;
}

// ---------------------------------------------------------------- kernels over row / element ranges

SRLM_MULTIVERSION void rms_norm_rows(const float* x, const float* w, float* y, float* rstd, int64_t r0, int64_t r1,
                                     int64_t H, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * H;
    const float s = 1.f / std::sqrt(dot(xr, xr, nullptr, H) / static_cast<float>(H) + eps);
    rstd[r] = s;
    float* yr = y + r * H;
    for (int64_t i = 0; i < H; ++i) yr[i] = w[i] * (xr[i] * s);
  }
}

// dx = rstd * (dh - n * mean(dh * n)) with n = x * rstd, dh = dy * w;  dw += sum over the rows of dy * n.
SRLM_MULTIVERSION void rms_norm_backward_rows(const float* dy, const float* x, const float* w, const float* rstd,
                                              float* dx, float* dw, int64_t r0, int64_t r1, int64_t H) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *dyr = dy + r * H, *xr = x + r * H;
    const float s = rstd[r];
    for (int64_t i = 0; i < H; ++i) dw[i] += dyr[i] * (xr[i] * s);
    const float c = s * s * s * dot(dyr, w, xr, H) / static_cast<float>(H);
    float* dxr = dx + r * H;
    for (int64_t i = 0; i < H; ++i) dxr[i] = s * dyr[i] * w[i] - xr[i] * c;
  }
}

SRLM_INLINE void swiglu16(const float* g, const float* u, float* y) {
  const f32x16 gv = load16(g);
  store16(y, gv * sigmoid16(gv) * load16(u));
}

SRLM_MULTIVERSION void swiglu_elems(const float* g, const float* u, float* y, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) swiglu16(g + i, u + i, y + i);
  if (const int64_t n = i1 - i) {  // the tail through the same vector code, on a padded copy
    float gb[16] = {}, ub[16] = {}, yb[16];
    std::memcpy(gb, g + i, n * sizeof(float));
    std::memcpy(ub, u + i, n * sizeof(float));
    swiglu16(gb, ub, yb);
    std::memcpy(y + i, yb, n * sizeof(float));
  }
}

// silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).
SRLM_INLINE void swiglu_backward16(const float* dy, const float* g, const float* u, float* dg, float* du) {
  const f32x16 gv = load16(g), s = sigmoid16(gv), d = load16(dy);
  store16(du, d * (gv * s));
  store16(dg, d * load16(u) * s * (1.f + gv * (1.f - s)));
}

SRLM_MULTIVERSION void swiglu_backward_elems(const float* dy, const float* g, const float* u, float* dg, float* du,
                                             int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) swiglu_backward16(dy + i, g + i, u + i, dg + i, du + i);
  if (const int64_t n = i1 - i) {
    float db[16] = {}, gb[16] = {}, ub[16] = {}, dgb[16], dub[16];
    std::memcpy(db, dy + i, n * sizeof(float));
    std::memcpy(gb, g + i, n * sizeof(float));
    std::memcpy(ub, u + i, n * sizeof(float));
    swiglu_backward16(db, gb, ub, dgb, dub);
    std::memcpy(dg + i, dgb, n * sizeof(float));
    std::memcpy(du + i, dub, n * sizeof(float));
  }
}

// Per pair (a, b) = (x[i], x[i + hd/2]):  forward  a' = a*c_a - b*s_a,   b' = b*c_b + a*s_b;
//                                          backward da = a'*c_a + b'*s_b, db = b'*c_b - a'*s_a.
SRLM_MULTIVERSION void rope_rows(const float* x, const float* cos, const float* sin, float* y, int64_t r0, int64_t r1,
                                 int64_t nh, int64_t hd, bool backward) {
  const int64_t half = hd / 2;
  const float sign = backward ? -1.f : 1.f;  // backward: -s_a on b's term, +s_b on a's term
  for (int64_t r = r0; r < r1; ++r) {
    const float *c = cos + r * hd, *s = sin + r * hd;
    for (int64_t h = 0; h < nh; ++h) {
      const float* xr = x + (r * nh + h) * hd;
      float* yr = y + (r * nh + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xr[i], b = xr[i + half];
        const float sa = backward ? s[i + half] : s[i], sb = backward ? s[i] : s[i + half];
        yr[i] = a * c[i] - sign * b * sa;
        yr[i + half] = b * c[i + half] + sign * a * sb;
      }
    }
  }
}

// ---------------------------------------------------------------- checks and entry points

constexpr int64_t kRowGrain = 16, kElemGrain = 1 << 14;

void check_float(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "srlm_C::", op, ": tensors must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "srlm_C::", op, ": tensors must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "srlm_C::", op, ": tensors must be contiguous");
  }
}

int64_t rows_of(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 1 && x.dim() >= 1 && x.size(-1) == w.size(0), "srlm_C::", op,
              ": x [..., H] needs w [H]; got x ", x.sizes(), " and w ", w.sizes());
  return w.size(0) ? x.numel() / w.size(0) : 0;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_float("rms_norm", {&x, &w});
  const int64_t R = rows_of("rms_norm", x, w), H = w.size(0);
  at::Tensor y = at::empty_like(x), rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sp = rstd.data_ptr<float>();
  at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) { rms_norm_rows(xp, wp, yp, sp, r0, r1, H, eps); });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                         const at::Tensor& rstd) {
  check_float("rms_norm_backward", {&dy, &x, &w, &rstd});
  const int64_t R = rows_of("rms_norm_backward", x, w), H = w.size(0);
  TORCH_CHECK(dy.sizes() == x.sizes() && rstd.numel() == R, "srlm_C::rms_norm_backward: dy must have x's shape ",
              x.sizes(), " and rstd one value per row");
  // d weight: each task sums its rows into its own float32 row of `partial`, added up at the end.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), R / kRowGrain));
  at::Tensor dx = at::empty_like(x), partial = at::zeros({tasks, H}, x.options());
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *sp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      rms_norm_backward_rows(dyp, xp, wp, sp, dxp, pp + t * H, R * t / tasks, R * (t + 1) / tasks, H);
  });
  return {dx, partial.sum(0)};
}

at::Tensor swiglu_cpu(const at::Tensor& g, const at::Tensor& u) {
  check_float("swiglu", {&g, &u});
  TORCH_CHECK(g.sizes() == u.sizes(), "srlm_C::swiglu: g ", g.sizes(), " and u ", u.sizes(), " must have one shape");
  at::Tensor y = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, g.numel(), kElemGrain, [&](int64_t i0, int64_t i1) { swiglu_elems(gp, up, yp, i0, i1); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u) {
  check_float("swiglu_backward", {&dy, &g, &u});
  TORCH_CHECK(g.sizes() == u.sizes() && dy.sizes() == g.sizes(), "srlm_C::swiglu_backward: dy, g and u must have one shape");
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const float *dyp = dy.data_ptr<float>(), *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
  at::parallel_for(0, g.numel(), kElemGrain,
                   [&](int64_t i0, int64_t i1) { swiglu_backward_elems(dyp, gp, up, dgp, dup, i0, i1); });
  return {dg, du};
}

at::Tensor rope_any(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_float(op, {&x, &cos, &sin});
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) % 2 == 0, "srlm_C::", op, ": x must be [..., nh, hd] with an even hd, got ",
              x.sizes());
  const int64_t hd = x.size(-1), nh = x.size(-2), R = (nh * hd) != 0 ? x.numel() / (nh * hd) : 0;
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(-1) == hd && cos.numel() == R * hd, "srlm_C::", op,
              ": cos and sin must hold one [hd] row per row of x (x ", x.sizes(), ", cos ", cos.sizes(), ")");
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) { rope_rows(xp, cp, sp, yp, r0, r1, nh, hd, backward); });
  return y;
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_any("rope", x, cos, sin, false);
}

at::Tensor rope_backward_cpu(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_any("rope_backward", dy, cos, sin, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(srlm_C, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
}
