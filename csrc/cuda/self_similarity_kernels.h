// Launchers of the CUDA kernels of the self-similarity family (SPEC §1).
// Plain C++/CUDA runtime interface — raw pointers, sizes, a stream; no torch headers — so that
// the kernels compile on their own (nvcc -c self_similarity_kernels.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastntxent {
namespace cuda_kernels {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

struct SelfProblem {
  const void* u;              // (M, D) rows, element type `type`, row stride `row_stride`, unit column stride
  int64_t M;
  int64_t D;
  int64_t row_stride;         // in elements
  ElementType type;
  const float* temperature;   // device pointer to one float (τ > 0)
  const int64_t* labels;      // (M,) or nullptr: then label(i) = i mod period
  int64_t period;
  bool decoupled = false;     // DCL: the positives left out of the logsumexp (and of P)
};

// Row statistics, each (M,) fp32: log Σ_{j≠i} exp(s_ij) (decoupled: also j ∉ P(i); −inf for a
// row without a negative), Σ_{p∈P(i)} s_ip, |P(i)|, Σ_j P_ij s_ij, and 1 if the most similar
// other row is a positive (first index wins ties).
cudaError_t self_forward(const SelfProblem& p, float* lse, float* pos_sum, float* pos_count,
                         float* ps_sum, float* top1, cudaStream_t stream);

// grad_u (M, D) fp32, contiguous: ∂L/∂u for L = Σ_i grad_lse_i·lse_i + grad_pos_i·pos_sum_i.
cudaError_t self_backward(const SelfProblem& p, const float* lse, const float* grad_lse,
                          const float* grad_pos, float* grad_u, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace fastntxent
