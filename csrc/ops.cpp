// Operator schemas of fastntxent, declared once; each backend file registers its
// implementation with TORCH_LIBRARY_IMPL. Autograd and fake (meta) kernels are
// registered from Python (fastntxent/_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastntxent._C loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastntxent, m) {
  // Self-similarity family (SPEC §1). u: (M, D) rows (already normalised when asked),
  // temperature: 0-dim, labels: (M,) int64 or None (then label(i) = i mod period).
  // Returns per-row (M,) tensors in the accumulation dtype (fp64 for fp64 input, else fp32):
  //   lse      log Σ_{j≠i} exp(s_ij)
  //   pos_sum  Σ_{p∈P(i)} s_ip
  //   pos_count |P(i)|
  //   ps_sum   Σ_j P_ij s_ij           (for ∂/∂τ)
  //   top1     1 if the most similar other row is a positive, else 0
  m.def(
      "self_forward(Tensor u, Tensor temperature, Tensor? labels, int period) -> "
      "(Tensor lse, Tensor pos_sum, Tensor pos_count, Tensor ps_sum, Tensor top1)");
  // ∂L/∂u for L = Σ_i grad_lse_i·lse_i + grad_pos_i·pos_sum_i; returns (M, D) in u's dtype.
  m.def(
      "self_backward(Tensor u, Tensor temperature, Tensor? labels, int period, Tensor lse, "
      "Tensor grad_lse, Tensor grad_pos) -> Tensor");

  // Cross-similarity family (SPEC §2; csrc/cpu/cross_similarity.cpp). Rows q: (M, D),
  // keys k: (N, D), queue: (K, D) extra negatives or None, scale: 0-dim multiplier of the
  // logits (1/τ, or CLIP's logit_scale). The positive of row i is key i + pos_offset
  // (0 <= pos_offset, pos_offset + M <= N). Columns of row i: every key and the queue when
  // in_batch, else the positive key and the queue (MoCo v2). CLIP's column logsumexps are
  // the same op with q and k swapped. Returns (M,) tensors in the accumulation dtype:
  //   lse     log Σ_c exp(s_ic)
  //   pos     s_i,pos = scale · q_i·k_{i+pos_offset}
  //   ps_sum  Σ_c P_ic s_ic             (∂lse_i/∂scale = ps_sum_i / scale)
  //   top1    1 if the largest logit is the positive (first index on ties), else 0
  m.def(
      "cross_forward(Tensor q, Tensor k, Tensor? queue, Tensor scale, int pos_offset, bool in_batch) -> "
      "(Tensor lse, Tensor pos, Tensor ps_sum, Tensor top1)");
  // (∂L/∂q, ∂L/∂k) for L = Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i, in q's / k's dtype; the
  // queue gets no gradient; grad_k is zeros (not computed) when need_grad_k is false.
  m.def(
      "cross_backward(Tensor q, Tensor k, Tensor? queue, Tensor scale, int pos_offset, bool in_batch, "
      "Tensor lse, Tensor grad_lse, Tensor grad_pos, bool need_grad_k) -> (Tensor grad_q, Tensor grad_k)");
}
