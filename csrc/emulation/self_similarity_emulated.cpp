// The CUDA kernels of the self-similarity family, compiled by the host C++ compiler against the
// host emulation of CUDA (cuda_host_emulation.h): the .cu file itself is included, no copy.
// Build (tests/cuda_emulation.py does it, in plain / ThreadSanitizer / AddressSanitizer
// variants):
//   g++ -std=c++20 -O1 -g -fPIC -shared -pthread -Icsrc/emulation/include
//       csrc/emulation/self_similarity_emulated.cpp -o libself_similarity_emulated.so
// csrc/emulation/include comes first on the include path, so that the .cu's <cuda_runtime.h>,
// <cuda_fp16.h>, <cuda_bf16.h> and <mma.h> resolve to the emulation.
//
// A C interface (no torch headers, so that the sanitizer builds stay small and load without
// torch): the launchers of self_similarity_kernels.h, plus the 16-bit conversions for testing.
#include "cuda_host_emulation.h"

#include "../cuda/self_similarity_kernels.cu"

namespace {
using fastntxent::cuda_kernels::ElementType;
using fastntxent::cuda_kernels::SelfProblem;

SelfProblem problem(const void* u, int64_t M, int64_t D, int64_t row_stride, int type, const float* temperature,
                    const int64_t* labels, int64_t period, int decoupled) {
  const ElementType t = type == 0 ? ElementType::kFloat32 : type == 1 ? ElementType::kFloat16 : ElementType::kBFloat16;
  return SelfProblem{u, M, D, row_stride, t, temperature, labels, period, decoupled != 0};
}
}  // namespace

extern "C" {

// type: 0 fp32, 1 fp16, 2 bf16. Returns the cudaError_t of the launcher (0: success).
int fastntxent_emulated_self_forward(const void* u, int64_t M, int64_t D, int64_t row_stride, int type,
                                     const float* temperature, const int64_t* labels, int64_t period, int decoupled,
                                     float* lse, float* pos_sum, float* pos_count, float* ps_sum, float* top1) {
  return static_cast<int>(fastntxent::cuda_kernels::self_forward(
      problem(u, M, D, row_stride, type, temperature, labels, period, decoupled), lse, pos_sum, pos_count, ps_sum, top1,
      nullptr));
}

int fastntxent_emulated_self_backward(const void* u, int64_t M, int64_t D, int64_t row_stride, int type,
                                      const float* temperature, const int64_t* labels, int64_t period,
                                      int decoupled, const float* lse, const float* grad_lse,
                                      const float* grad_pos, float* grad_u) {
  return static_cast<int>(fastntxent::cuda_kernels::self_backward(
      problem(u, M, D, row_stride, type, temperature, labels, period, decoupled), lse, grad_lse, grad_pos, grad_u, nullptr));
}

// The emulation's own float <-> fp16 / bf16 conversions (checked against torch's in the tests).
void fastntxent_emulated_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half(in[i]).bits;
}
void fastntxent_emulated_float_to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16(in[i]).bits;
}
void fastntxent_emulated_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
void fastntxent_emulated_bfloat16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}

}  // extern "C"
