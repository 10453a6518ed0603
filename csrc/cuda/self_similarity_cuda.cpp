// Registers the CUDA kernels (self_similarity_kernels.cu) as the CUDA implementation of the
// fastntxent::self_forward / self_backward operators: validation, device guard, current
// stream, outputs poisoned with NaN before the kernels write them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "self_similarity_kernels.h"

namespace fastntxent {
namespace {

using cuda_kernels::ElementType;

ElementType element_type(const at::Tensor& u) {
  switch (u.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastntxent CUDA kernels take float32, float16 or bfloat16 rows, got ",
                  u.scalar_type(), " (float64: use backend=\"reference\" or the CPU kernel)");
  }
}

struct Prepared {
  at::Tensor u, temperature, labels;
  cuda_kernels::SelfProblem problem;
};

Prepared prepare(const at::Tensor& u, const at::Tensor& temperature,
                 const c10::optional<at::Tensor>& labels, int64_t period) {
  TORCH_CHECK(u.is_cuda(), "fastntxent CUDA kernel: u must be a CUDA tensor");
  TORCH_CHECK(u.dim() == 2 && u.size(0) >= 1 && u.size(1) >= 1, "fastntxent: u must be (M, D) with M, D >= 1");
  TORCH_CHECK(temperature.numel() == 1, "fastntxent: temperature must hold one value");
  TORCH_CHECK(temperature.device() == u.device(), "fastntxent: temperature must be on u's device");
  TORCH_CHECK(period >= 1, "fastntxent: period must be >= 1, got ", period);
  Prepared p;
  p.u = u.detach().contiguous();
  p.temperature = temperature.detach().to(at::kFloat).contiguous();
  if (labels.has_value()) {
    TORCH_CHECK(labels->device() == u.device(), "fastntxent: labels must be on u's device");
    TORCH_CHECK(labels->scalar_type() == at::kLong, "fastntxent: labels must be int64");
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == u.size(0), "fastntxent: labels must have shape (M,)");
    p.labels = labels->contiguous();
  }
  p.problem = {p.u.data_ptr(), p.u.size(0), p.u.size(1), p.u.stride(0), element_type(p.u),
               p.temperature.data_ptr<float>(),
               p.labels.defined() ? p.labels.data_ptr<int64_t>() : nullptr, period};
  return p;
}

at::Tensor poisoned(at::IntArrayRef shape, const at::Tensor& like) {
  return at::full(shape, std::numeric_limits<float>::quiet_NaN(), like.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_forward_cuda(
    const at::Tensor& u, const at::Tensor& temperature, const c10::optional<at::Tensor>& labels,
    int64_t period, bool decoupled) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared p = prepare(u, temperature, labels, period);
  p.problem.decoupled = decoupled;
  const int64_t M = u.size(0);
  at::Tensor lse = poisoned({M}, u), pos_sum = poisoned({M}, u), pos_count = poisoned({M}, u),
             ps_sum = poisoned({M}, u), top1 = poisoned({M}, u);
  C10_CUDA_CHECK(cuda_kernels::self_forward(
      p.problem, lse.data_ptr<float>(), pos_sum.data_ptr<float>(), pos_count.data_ptr<float>(),
      ps_sum.data_ptr<float>(), top1.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return {lse, pos_sum, pos_count, ps_sum, top1};
}

at::Tensor self_backward_cuda(const at::Tensor& u, const at::Tensor& temperature,
                              const c10::optional<at::Tensor>& labels, int64_t period,
                              const at::Tensor& lse, const at::Tensor& grad_lse,
                              const at::Tensor& grad_pos, bool decoupled) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared p = prepare(u, temperature, labels, period);
  p.problem.decoupled = decoupled;
  const int64_t M = u.size(0);
  for (const at::Tensor* t : {&lse, &grad_lse, &grad_pos}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == M && t->device() == u.device(),
                "fastntxent: row statistics must have shape (M,) on u's device");
  }
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous(), a = grad_lse.to(at::kFloat).contiguous(),
                   b = grad_pos.to(at::kFloat).contiguous();
  at::Tensor grad = poisoned({M, u.size(1)}, u);
  C10_CUDA_CHECK(cuda_kernels::self_backward(p.problem, lse_f.data_ptr<float>(), a.data_ptr<float>(),
                                             b.data_ptr<float>(), grad.data_ptr<float>(),
                                             at::cuda::getCurrentCUDAStream()));
  return grad.to(u.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastntxent, CUDA, m) {
  m.impl("self_forward", &self_forward_cuda);
  m.impl("self_backward", &self_backward_cuda);
}

}  // namespace fastntxent
