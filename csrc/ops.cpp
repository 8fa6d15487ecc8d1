// The srlm_C operator library: schemas here, CPU kernels in paged_attention.cpp,
// cache_ops.cpp, linear.cpp, fused_elementwise.cpp and sampling.cpp.
//
// `import srlm_engine._C` loads this shared object, whose static initializers register the ops
// under torch.ops.srlm_C. The module itself is empty: the ops are reached through the dispatcher
// (so torch.compile and fake tensors see them), never as Python functions of this module.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(srlm_C, m) {
  // Writes token i of k, v [N, nkv, hd] into slot slot_mapping[i] (= block * block_size + offset)
  // of the caches [num_blocks, block_size, nkv, hd]; slot -1 is skipped. k, v and the caches share
  // one dtype; slots must be distinct (two tokens written to one slot race when N is large).
  m.def("reshape_and_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  // One query per sequence, q [B, nh, hd], attends over the first context_lens[b] cached tokens
  // of its sequence through block_tables [B, max_blocks] (int32); GQA: head h reads kv head
  // h // (nh // nkv). Returns [B, nh, hd] in q's dtype; zeros where context_lens[b] == 0.
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
  // x [M, K] @ weight[N, K].T (+ bias [N]) for M <= 8 rows (decode at small batch): each weight row
  // is streamed once for all M rows. float32 or bfloat16, float32 accumulation; [M, N] in x's dtype.
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Training's element-wise ops, float32, forward and backward (srlm_engine/model/fused.py wraps
  // them in autograd): RMSNorm over the last dim (-> y, rstd per row), silu(g) * u, and rotary
  // embedding of x [..., nh, hd] with cos / sin holding one [hd] row per row of x.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor g, Tensor u) -> Tensor");
  m.def("swiglu_backward(Tensor dy, Tensor g, Tensor u) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_backward(Tensor dy, Tensor cos, Tensor sin) -> Tensor");
  // The sampler's statistics of logits [R, V] (float32) in one call: argmax, log-sum-exp, log-sum-exp
  // at temperature [R], and the candidates whose probability at temperature is >= min_prob [R],
  // sorted, at most capacity per row (count -1 past it). Semantics in sampling.cpp.
  m.def("sampling_stats(Tensor logits, Tensor temperature, Tensor min_prob, int capacity) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// An empty Python module named _C, so that `import srlm_engine._C` loads the library above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
