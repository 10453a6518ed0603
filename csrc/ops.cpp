// Operator schemas of fastntxent, declared once; each backend file registers its
// implementation with TORCH_LIBRARY_IMPL. Autograd and fake (meta) kernels are
// registered from Python (fastntxent/self_family.py, fastntxent/cross_family.py).
#include <Python.h>
#include <torch/library.h>

#define FASTNTXENT_STR2(x) #x
#define FASTNTXENT_STR(x) FASTNTXENT_STR2(x)
#if defined(FASTNTXENT_CUDA_SASS) && defined(FASTNTXENT_CUDA_PTX)
// Compute capabilities the CUDA kernels carry machine code for ("80_90") and PTX for ("90").
#define FASTNTXENT_SASS_STRING FASTNTXENT_STR(FASTNTXENT_CUDA_SASS)
#define FASTNTXENT_PTX_STRING FASTNTXENT_STR(FASTNTXENT_CUDA_PTX)
#else
#define FASTNTXENT_SASS_STRING ""
#define FASTNTXENT_PTX_STRING ""
#endif

extern "C" {
// Importing fastntxent._C loads this library, which runs the registrations below. The module
// records what the build holds: cuda_sass / cuda_ptx ("" without CUDA kernels) and the
// compiler that built the C++ code.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "cuda_sass", FASTNTXENT_SASS_STRING) < 0 ||
      PyModule_AddStringConstant(module, "cuda_ptx", FASTNTXENT_PTX_STRING) < 0 ||
      PyModule_AddStringConstant(module, "cxx_compiler", __VERSION__) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(fastntxent, m) {
  // Self-similarity family (docs/maths.md §1). u: (M, D) rows (already normalised when asked),
  // temperature: 0-dim, labels: (M,) int64 or None (then label(i) = i mod rows_per_view).
  // Returns per-row (M,) tensors in the accumulation dtype (fp64 for fp64 input, else fp32):
  //   lse      log Σ_{j≠i} exp(s_ij)
  //   pos_sum  Σ_{p∈P(i)} s_ip
  //   pos_count |P(i)|
  //   expected_logit  Σ_j P_ij s_ij    (for ∂/∂τ)
  //   top1     1 if the most similar other row is a positive, else 0
  // decoupled (DCL, Yeh et al. 2022): the positives are left out of the logsumexp too,
  // lse = log Σ_{j≠i, j∉P(i)} exp(s_ij) (−inf for a row without a negative); P and
  // expected_logit follow it; pos_sum, pos_count and top1 are unchanged.
  m.def(
      "self_forward(Tensor u, Tensor temperature, Tensor? labels, int rows_per_view, bool decoupled=False) -> "
      "(Tensor lse, Tensor pos_sum, Tensor pos_count, Tensor expected_logit, Tensor top1)");
  // ∂L/∂u for L = Σ_i grad_lse_i·lse_i + grad_pos_i·pos_sum_i; returns (M, D) in u's dtype.
  m.def(
      "self_backward(Tensor u, Tensor temperature, Tensor? labels, int rows_per_view, Tensor lse, "
      "Tensor grad_lse, Tensor grad_pos, bool decoupled=False) -> Tensor");
  // Local-rows form of the self family (docs/distributed.md; csrc/cpu/self_similarity.cpp): rows
  // [row_start, row_stop) of u (M, D) against all M columns, the diagonal at the row offset,
  // labels (M,) global. Forward: the five statistics of those rows, each (row_stop - row_start,).
  // Backward: ∂L/∂u (M, D) for L = Σ_local grad_lse_i·lse_i + grad_pos_i·pos_sum_i (row and
  // column side of every tile: the gradient of every global row produced by the local rows).
  m.def(
      "self_forward_rows(Tensor u, Tensor temperature, Tensor? labels, int rows_per_view, int row_start, "
      "int row_stop, bool decoupled=False) -> (Tensor lse, Tensor pos_sum, Tensor pos_count, Tensor expected_logit, "
      "Tensor top1)");
  m.def(
      "self_backward_rows(Tensor u, Tensor temperature, Tensor? labels, int rows_per_view, int row_start, "
      "int row_stop, Tensor lse, Tensor grad_lse, Tensor grad_pos, bool decoupled=False) -> Tensor");

  // Cross-similarity family (docs/maths.md §2; csrc/cpu/cross_similarity.cpp). Rows q: (M, D),
  // keys k: (N, D), queue: (K, D) extra negatives or None, scale: 0-dim multiplier of the
  // logits (1/τ, or CLIP's logit_scale). The positive of row i is key i + pos_offset
  // (0 <= pos_offset, pos_offset + M <= N). Columns of row i: every key and the queue when
  // keys_are_negatives, else the positive key and the queue (MoCo v2). CLIP's column logsumexps are
  // the same op with q and k swapped. Returns (M,) tensors in the accumulation dtype:
  //   lse     log Σ_c exp(s_ic)
  //   pos     s_i,pos = scale · q_i·k_{i+pos_offset}
  //   expected_logit  Σ_c P_ic s_ic     (∂lse_i/∂scale = expected_logit_i / scale)
  //   top1    1 if the largest logit is the positive (first index on ties), else 0
  // decoupled (DCL): the positive left out of the logsumexp (and of P); −inf without a negative.
  m.def(
      "cross_forward(Tensor q, Tensor k, Tensor? queue, Tensor scale, int pos_offset, bool keys_are_negatives, "
      "bool decoupled=False) -> (Tensor lse, Tensor pos, Tensor expected_logit, Tensor top1)");
  // (∂L/∂q, ∂L/∂k) for L = Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i, in q's / k's dtype; the
  // queue gets no gradient; grad_k is zeros (not computed) when need_grad_k is false.
  m.def(
      "cross_backward(Tensor q, Tensor k, Tensor? queue, Tensor scale, int pos_offset, bool keys_are_negatives, "
      "Tensor lse, Tensor grad_lse, Tensor grad_pos, bool need_grad_k, bool decoupled=False) -> "
      "(Tensor grad_q, Tensor grad_k)");

  // SigLIP's pairwise sigmoid loss (docs/maths.md §7; csrc/cpu/siglip.cpp). Images x: (M, D),
  // texts y: (N, D), scale t > 0 and bias b: 0-dim; logits ℓ_ij = t·(x_i·y_j) + b, the positive
  // of row i at column i + pos_offset (0 <= pos_offset, pos_offset + M <= N). With z_ij = ±1
  // (positive / not) and g_ij = −z_ij σ(−z_ij ℓ_ij) = ∂/∂ℓ_ij [−log σ(z_ij ℓ_ij)], returns (M,)
  // tensors in the accumulation dtype:
  //   loss        Σ_j −log σ(z_ij ℓ_ij)
  //   dlogit_sum  Σ_j g_ij                (∂loss_i/∂b)
  //   dlogit_cos  Σ_j g_ij (x_i·y_j)      (∂loss_i/∂t)
  m.def(
      "siglip_forward(Tensor x, Tensor y, Tensor scale, Tensor bias, int pos_offset) -> "
      "(Tensor loss, Tensor dlogit_sum, Tensor dlogit_cos)");
  // (∂L/∂x, ∂L/∂y) for L = Σ_i grad_loss_i·loss_i, in x's / y's dtype; grad_y is zeros (not
  // computed) when need_grad_y is false.
  m.def(
      "siglip_backward(Tensor x, Tensor y, Tensor scale, Tensor bias, int pos_offset, Tensor grad_loss, "
      "bool need_grad_y) -> (Tensor grad_x, Tensor grad_y)");
  // The loss L = Σ_i loss_i (0-dim) and its gradients from the forward's one sweep (CPU), each in
  // the accumulation dtype: grad_x (M, D), grad_y (N, D) (zeros, not computed, when not needed),
  // grad_scale = Σ_i dlogit_cos_i, grad_bias = Σ_i dlogit_sum_i (0-dim). For "mean" / "sum", whose
  // row weights are all alike, the backward only scales them by the incoming gradient.
  m.def(
      "siglip_loss_and_grad(Tensor x, Tensor y, Tensor scale, Tensor bias, int pos_offset, bool need_grad_x, "
      "bool need_grad_y) -> (Tensor loss, Tensor grad_x, Tensor grad_y, Tensor grad_scale, Tensor grad_bias)");
}
