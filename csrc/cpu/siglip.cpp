// Fused CPU kernels of SigLIP's pairwise sigmoid loss (docs/maths.md §6).
//
// Rows are images x (M, D), columns texts y (N, D); logits ℓ_ij = t·(x_i·y_j) + b with the
// positive of row i at column i + pos_offset (pos_offset ≠ 0 when y holds every rank's texts
// and x the local images); z_ij = +1 there, −1 elsewhere. Per pair, with m = z·ℓ:
//   −log σ(m) = softplus(−m) = max(−m, 0) + log1p(e^{−|m|})
//   g = ∂/∂ℓ = −z·σ(−m),  σ(−m) = e^{−|m|}/(1 + e^{−|m|}) for m ≥ 0, 1/(1 + e^{−|m|}) else
// (one exp and one log1p, no overflow for any |ℓ|).
// Forward: each row block streams over column tiles of y (one BLAS product per tile) and sums
// per row the loss, Σ_j g_ij and Σ_j g_ij·(x_i·y_j) (the last two give ∂t and ∂b for free).
// No softmax: a tile's contribution is independent of the others, so no running state.
// Backward, for L = Σ_i w_i·loss_i, G_ij = w_i·g_ij, in one sweep that recomputes each tile once:
//   ∂L/∂x_i = t·Σ_j G_ij y_j     into the row block's own rows
//   ∂L/∂y_j = t·Σ_i G_ij x_i     into the thread's own (N, D) partial, summed at the end
// No atomics, no M×N buffer; memory is one tile per thread, threads × N × D partials and O(M)
// statistics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tiling.h"

namespace fastntxent {
namespace {

using cpu::for_each_row_block;
using cpu::kColBlock;
using cpu::poisoned;
using cpu::tile_product;

struct SiglipInputs {
  at::Tensor x;  // (M, D) contiguous, accumulation dtype
  at::Tensor y;  // (N, D)
  double scale, bias;
  int64_t offset;
};

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

SiglipInputs prepare_siglip(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                            const at::Tensor& bias, int64_t pos_offset) {
  TORCH_CHECK(x.dim() == 2, "fastntxent: x must be 2-D (M, D), got ", x.dim(), "-D");
  TORCH_CHECK(y.dim() == 2, "fastntxent: y must be 2-D (N, D), got ", y.dim(), "-D");
  TORCH_CHECK(x.size(1) == y.size(1), "fastntxent: x and y must have the same D, got ", x.size(1), " and ",
              y.size(1));
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "fastntxent CPU kernel: x and y must be CPU tensors");
  TORCH_CHECK(is_float_type(x.scalar_type()) && x.scalar_type() == y.scalar_type(),
              "fastntxent: x and y must share one of float32, float64, bfloat16, float16; got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1, "fastntxent: scale and bias must hold one value each");
  TORCH_CHECK(pos_offset >= 0 && pos_offset + x.size(0) <= y.size(0), "fastntxent: pos_offset + M must be <= N, got ",
              pos_offset, " + ", x.size(0), " > ", y.size(0));
  // Not refused when non-finite: every output is then NaN (the API's NaN rule, docs/maths.md §5).
  const double t = scale.to(at::kCPU).item<double>();
  const double b = bias.to(at::kCPU).item<double>();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {x.detach().to(acc).contiguous(), y.detach().to(acc).contiguous(), t, b, pos_offset};
}

// Per tile, with s = −z·ℓ (ℓ for a negative pair, −ℓ for the positive): −log σ(z·ℓ) = softplus(s)
// and g = −z·σ(s). The elementwise work runs in ATen's vectorised softplus / sigmoid kernels on
// thread-local buffers (no allocation per tile); softplus(s) = s above s = 40 (the neglected
// log1p(e^{−s}) < 5e-18 relative), sigmoid saturates to exactly 0 / 1: nothing overflows.
constexpr double kSoftplusThreshold = 40.0;

template <typename acc_t>
at::Tensor blob(std::vector<acc_t>& v, int64_t nr, int64_t nc, const at::TensorOptions& opts) {
  return at::from_blob(v.data(), {nr, nc}, opts);
}

// s = t·cos + b, then −s at the positives (column r + off of row r, `pos_col(r)` in the tile).
template <typename acc_t, typename PosCol>
void flipped_logits(at::Tensor& s, const at::Tensor& cos, acc_t t, acc_t b, int64_t nr, int64_t nc, PosCol pos_col) {
  at::mul_out(s, cos, t);
  s.add_(b);
  acc_t* sp = s.data_ptr<acc_t>();
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t pc = pos_col(r);
    if (pc >= 0 && pc < nc) sp[r * nc + pc] = -sp[r * nc + pc];
  }
}

template <typename acc_t>
void siglip_forward_impl(const SiglipInputs& in, acc_t* loss, acc_t* dsum, acc_t* dcos) {
  const int64_t M = in.x.size(0), N = in.y.size(0);
  const acc_t t = static_cast<acc_t>(in.scale), b = static_cast<acc_t>(in.bias);
  const auto opts = in.x.options();
  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& buf) {
    const at::Tensor rows = in.x.narrow(0, r0, nr);
    std::vector<acc_t> s_buf(buf.size()), sp_buf(buf.size()), sig_buf(buf.size());
    std::vector<acc_t> l(nr, 0), gs(nr, 0), gc(nr, 0);
    for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, N - c0);
      const at::Tensor cos = tile_product(buf, rows, in.y.narrow(0, c0, nc));
      at::Tensor s = blob(s_buf, nr, nc, opts), sp = blob(sp_buf, nr, nc, opts), sig = blob(sig_buf, nr, nc, opts);
      const auto pos_col = [&](int64_t r) { return r0 + r + in.offset - c0; };
      flipped_logits(s, cos, t, b, nr, nc, pos_col);
      at::softplus_out(sp, s, 1.0, kSoftplusThreshold);
      at::sigmoid_out(sig, s);
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t* cr = buf.data() + r * nc;
        const acc_t* lr = sp_buf.data() + r * nc;
        const acc_t* gr = sig_buf.data() + r * nc;
        const int64_t pc = pos_col(r);
        acc_t tl = 0, ts = 0, tc = 0;
        for (int64_t c = 0; c < nc; ++c) {
          tl += lr[c];
          ts += gr[c];
          tc += gr[c] * cr[c];
        }
        if (pc >= 0 && pc < nc) {  // g = −σ(s) at the positive: undo its + in the sums
          ts -= 2 * gr[pc];
          tc -= 2 * gr[pc] * cr[pc];
        }
        l[r] += tl;
        gs[r] += ts;
        gc[r] += tc;
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      loss[r0 + r] = l[r];
      dsum[r0 + r] = gs[r];
      dcos[r0 + r] = gc[r];
    }
  });
}

// One sweep for both towers: row blocks of x over the column tiles of y; each tile becomes
// G (σ(s), −σ(s) at the positive, times w_i) once and feeds ∂x_rows += G·y_cols (rows owned by
// the block) and ∂y_cols += Gᵀ·x_rows, the latter into the calling thread's own (N, D) partial
// (no atomics; the partials are summed in thread order at the end, a fixed order for a fixed
// thread count). Extra memory: threads × N × D.
template <typename acc_t>
void siglip_backward_impl(const SiglipInputs& in, const acc_t* w, at::Tensor& grad_x, at::Tensor* grad_y) {
  const int64_t M = in.x.size(0), N = in.y.size(0), D = in.x.size(1);
  const acc_t t = static_cast<acc_t>(in.scale), b = static_cast<acc_t>(in.bias);
  const auto opts = in.x.options();
  at::Tensor partial_y;
  if (grad_y != nullptr) partial_y = at::zeros({at::get_num_threads(), N, D}, opts);
  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& buf) {
    const at::Tensor rows = in.x.narrow(0, r0, nr);
    at::Tensor acc = grad_x.narrow(0, r0, nr);
    acc.zero_();
    at::Tensor acc_y;
    if (grad_y != nullptr) acc_y = partial_y.select(0, at::get_thread_num());
    std::vector<acc_t> s_buf(buf.size());
    for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, N - c0);
      const at::Tensor block = in.y.narrow(0, c0, nc);
      at::Tensor tile = tile_product(buf, rows, block);
      at::Tensor s = blob(s_buf, nr, nc, opts);
      const auto pos_col = [&](int64_t r) { return r0 + r + in.offset - c0; };
      flipped_logits(s, tile, t, b, nr, nc, pos_col);
      at::sigmoid_out(tile, s);
      acc_t* h = buf.data();
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t pc = pos_col(r);
        if (pc >= 0 && pc < nc) h[r * nc + pc] = -h[r * nc + pc];
        const acc_t wr = w[r0 + r];
        for (int64_t c = 0; c < nc; ++c) h[r * nc + c] *= wr;
      }
      acc.addmm_(tile, block);
      if (grad_y != nullptr) acc_y.narrow(0, c0, nc).addmm_(tile.t(), rows);
    }
    acc.mul_(t);
  });
  if (grad_y != nullptr) at::sum_out(*grad_y, partial_y, {0}).mul_(t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> siglip_forward_cpu(const at::Tensor& x, const at::Tensor& y,
                                                                  const at::Tensor& scale, const at::Tensor& bias,
                                                                  int64_t pos_offset) {
  at::NoGradGuard no_grad;
  const SiglipInputs in = prepare_siglip(x, y, scale, bias, pos_offset);
  const int64_t M = x.size(0);
  const auto opts = in.x.options();
  at::Tensor loss = poisoned({M}, opts), dsum = poisoned({M}, opts), dcos = poisoned({M}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "siglip_forward_cpu", [&] {
    siglip_forward_impl<scalar_t>(in, loss.data_ptr<scalar_t>(), dsum.data_ptr<scalar_t>(),
                                  dcos.data_ptr<scalar_t>());
  });
  return {loss, dsum, dcos};
}

std::tuple<at::Tensor, at::Tensor> siglip_backward_cpu(const at::Tensor& x, const at::Tensor& y,
                                                       const at::Tensor& scale, const at::Tensor& bias,
                                                       int64_t pos_offset, const at::Tensor& grad_loss,
                                                       bool need_grad_y) {
  at::NoGradGuard no_grad;
  const SiglipInputs in = prepare_siglip(x, y, scale, bias, pos_offset);
  const int64_t M = x.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == M, "fastntxent: grad_loss must have shape (M,)");
  const auto acc = in.x.scalar_type();
  const at::Tensor w = grad_loss.to(acc).contiguous();
  at::Tensor grad_x = poisoned(in.x.sizes(), in.x.options());
  at::Tensor grad_y = need_grad_y ? poisoned(in.y.sizes(), in.y.options()) : at::zeros_like(in.y);
  AT_DISPATCH_FLOATING_TYPES(acc, "siglip_backward_cpu", [&] {
    siglip_backward_impl<scalar_t>(in, w.data_ptr<scalar_t>(), grad_x, need_grad_y ? &grad_y : nullptr);
  });
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastntxent, CPU, m) {
  m.impl("siglip_forward", &siglip_forward_cpu);
  m.impl("siglip_backward", &siglip_backward_cpu);
}

}  // namespace fastntxent
