// What the sampler needs from a step's logits, in three passes over each row: torch.ops.srlm_C.sampling_stats.
//
//   sampling_stats(logits [R, V] f32, temperature [R] f32, min_prob [R] f32, int capacity)
//     -> (argmax [R] i64, lse [R] f32, lse_t [R] f32, vals [R, capacity] f32, ids [R, capacity] i64, count [R] i64)
//
//   argmax[r]  first index of the row's largest logit (torch.argmax's choice on ties)
//   lse[r]     log sum_i exp(x_i)                  (raw log-probs are x - lse)
//   lse_t[r]   log sum_i exp(x_i / t_r)            (the normalizer at temperature t_r > 0)
//   candidates, where min_prob[r] > 0: every token whose probability at temperature,
//              exp(x_i / t_r - lse_t[r]), is >= min_prob[r], as (x_i / t_r, i) sorted by value
//              descending, ties by id; count[r] says how many, or -1 if more than capacity.
//              Rows are padded with (-inf, -1); min_prob[r] == 0 gives count 0.
//   A row holding a NaN: argmax its first NaN, lse and lse_t NaN, count 0 (torch's argmax and logsumexp).
//
// torch needs a pass per quantity (argmax, logsumexp twice, a division) plus a top-k over the whole
// vocabulary, each allocating [R, V]; for a decode step at batch 128 over SmolLM2's 49k tokens
// that takes ~70 ms per step against ~5 ms here. The candidates are the point: top-p with p < 1
// never keeps a token below (1 - p) / V (all such tokens together hold less than 1 - p), so
// the sampler filters and draws among a few hundred candidates instead of sorting 49k values.
// The PyTorch reference is srlm_engine.engine.sampler.sampling_stats_reference.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

struct RowOut {
  int64_t* argmax;
  float *lse, *lse_t, *vals;
  int64_t *ids, *count;
};

SRLM_INLINE float hmax(f32x16 a) {
  const f32x8 h8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7);
  const f32x8 l8 = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x8 m8 = h8 > l8 ? h8 : l8;
  float m = m8[0];
  for (int i = 1; i < 8; ++i) m = m8[i] > m ? m8[i] : m;
  return m;
}

// Rows [r0, r1). cand is a per-call scratch of (value, id) pairs.
SRLM_MULTIVERSION void stats_rows(const float* logits, const float* temp, const float* min_prob, int64_t V,
                                  int64_t capacity, const RowOut& o, int64_t r0, int64_t r1) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<std::pair<float, int64_t>> cand;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = logits + r * V;
    float* vals = o.vals + r * capacity;
    int64_t* ids = o.ids + r * capacity;
    std::fill(vals, vals + capacity, kNegInf);
    std::fill(ids, ids + capacity, int64_t(-1));
    o.count[r] = 0;

    // Pass 1: the maximum, then its first index; a NaN anywhere makes the row's statistics NaN
    // and its argmax the first NaN, as torch's max and logsumexp give (the comparisons skip it).
    int64_t i = 0;
    f32x16 mv = splat(kNegInf);
    i32x16 nan = {};
    for (; i + 16 <= V; i += 16) {
      const f32x16 v = load16(x + i);
      mv = v > mv ? v : mv;
      nan |= v != v;
    }
    float m = hmax(mv);
    bool has_nan = any16(nan);
    for (; i < V; ++i) {
      m = x[i] > m ? x[i] : m;
      has_nan |= x[i] != x[i];
    }
    if (has_nan) {
      int64_t k = 0;
      while (!(x[k] != x[k])) ++k;
      o.argmax[r] = k;
      o.lse[r] = o.lse_t[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    int64_t am = 0;
    while (!(x[am] == m)) ++am;  // no NaN: some logit equals the maximum
    o.argmax[r] = am;
    if (!(m > kNegInf)) {  // every logit -inf: nothing can be sampled from the row
      o.lse[r] = o.lse_t[r] = m;
      continue;
    }

    // Pass 2: sum exp(x - m) and sum exp((x - m) / t); exp16 of -inf is ~1e-38, so -inf logits add nothing.
    const float it = 1.f / temp[r];
    f32x16 s = {}, st = {};
    for (i = 0; i + 16 <= V; i += 16) {
      const f32x16 d = load16(x + i) - m;
      s += exp16(d);
      st += exp16(d * it);
    }
    float s1 = hsum(s), st1 = hsum(st);
    for (; i < V; ++i) {
      s1 += std::exp(x[i] - m);
      st1 += std::exp((x[i] - m) * it);
    }
    o.lse[r] = m + std::log(s1);
    const float lse_t = m / temp[r] + std::log(st1);
    o.lse_t[r] = lse_t;

    // Pass 3: the candidates, x / t >= lse_t + log(min_prob). The division is the one torch does
    // for logits / temperature, so the values are bit for bit those of the PyTorch path.
    if (!(min_prob[r] > 0.f)) continue;
    const float thr = lse_t + std::log(min_prob[r]);
    const float t = temp[r];
    cand.clear();
    bool over = false;
    for (i = 0; i + 16 <= V && !over; i += 16) {
      const f32x16 y = load16(x + i) / t;
      if (!any16(y >= splat(thr))) continue;
      for (int64_t j = 0; j < 16; ++j)
        if (y[j] >= thr) cand.emplace_back(y[j], i + j);
      over = static_cast<int64_t>(cand.size()) > capacity;
    }
    for (; i < V && !over; ++i) {
      const float y = x[i] / t;
      if (y >= thr) cand.emplace_back(y, i);
      over = static_cast<int64_t>(cand.size()) > capacity;
    }
    if (over) {
      o.count[r] = -1;
      continue;
    }
    std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (size_t k = 0; k < cand.size(); ++k) {
      vals[k] = cand[k].first;
      ids[k] = cand[k].second;
    }
    o.count[r] = static_cast<int64_t>(cand.size());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampling_stats_cpu(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& min_prob, int64_t capacity) {
  const char* op = "srlm_C::sampling_stats: ";
  TORCH_CHECK(logits.dim() == 2, op, "logits must be [rows, vocab], got shape ", logits.sizes());
  const int64_t R = logits.size(0), V = logits.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"logits", &logits},
                                {"temperature", &temperature}, {"min_prob", &min_prob}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), op, name, " must be a CPU tensor, got one on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, name, " must be contiguous");
  }
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == R, op, "temperature must be [rows=", R, "], got shape ",
              temperature.sizes());
  TORCH_CHECK(min_prob.dim() == 1 && min_prob.size(0) == R, op, "min_prob must be [rows=", R, "], got shape ",
              min_prob.sizes());
  TORCH_CHECK(V > 0, op, "logits must have at least one column");
  TORCH_CHECK(capacity >= 0, op, "capacity must be >= 0, got ", capacity);
  const float* tp = temperature.data_ptr<float>();
  const float* mp = min_prob.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(tp[r] > 0.f && std::isfinite(tp[r]), op, "temperature[", r, "] must be positive and finite, got ",
                tp[r]);
    TORCH_CHECK(mp[r] >= 0.f && mp[r] <= 1.f, op, "min_prob[", r, "] must be in [0, 1], got ", mp[r]);
  }

  const auto f32 = logits.options();
  const auto i64 = logits.options().dtype(at::kLong);
  at::Tensor argmax = at::empty({R}, i64), lse = at::empty({R}, f32), lse_t = at::empty({R}, f32);
  at::Tensor vals = at::empty({R, capacity}, f32), ids = at::empty({R, capacity}, i64), count = at::empty({R}, i64);
  const RowOut o{argmax.data_ptr<int64_t>(), lse.data_ptr<float>(),   lse_t.data_ptr<float>(),
                 vals.data_ptr<float>(),     ids.data_ptr<int64_t>(), count.data_ptr<int64_t>()};
  const float* xp = logits.data_ptr<float>();
  // a row is ~50k elements: one per task, so a step's rows spread over every thread
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) { stats_rows(xp, tp, mp, V, capacity, o, r0, r1); });
  return {argmax, lse, lse_t, vals, ids, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(srlm_C, CPU, m) { m.impl("sampling_stats", &sampling_stats_cpu); }
