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
}
