// Fused CPU kernels of SigLIP's pairwise sigmoid loss (docs/maths.md §7).
//
// Rows are images x (M, D), columns texts y (N, D); logits ℓ_ij = t·(x_i·y_j) + b with the
// positive of row i at column i + pos_offset (pos_offset ≠ 0 when y holds every rank's texts
// and x the local images); z_ij = +1 there, −1 elsewhere. Per pair, with s = −z·ℓ:
//   −log σ(z·ℓ) = softplus(s),   g = ∂/∂ℓ = −z·σ(s)
// No softmax: a tile's contribution is independent of the others, so no running state.
//
// One sweep (siglip_sweep) serves every operator: row blocks of x stream over the column tiles
// of y, one BLAS product per tile, and each tile may give
//   - per row the loss, Σ_j g_ij and Σ_j g_ij·(x_i·y_j) (the last two give ∂t and ∂b);
//   - for L = Σ_i w_i·loss_i, G_ij = w_i·g_ij (w = 1 when not given):
//       ∂L/∂x_i = t·Σ_j G_ij y_j     into the row block's own rows
//       ∂L/∂y_j = t·Σ_i G_ij x_i     into the thread's own (N, D) partial, summed at the end
// siglip_forward: the row sums (1 product per tile). siglip_backward: the gradients for any w
// (3 products: the tile recomputed, G·y, Gᵀ·x). siglip_loss_and_grad: both at once for w = 1
// (3 products) — "mean" / "sum" weight every row alike, so their backward only scales it.
// No atomics, no M×N buffer; memory is one tile per thread, (threads − 1) × N × D partials and
// O(M) statistics.
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
using cpu::gemm_accumulate;
using cpu::gemm_accumulate_transposed;
using cpu::gemm_tile;
using cpu::kColBlock;
using cpu::poisoned;

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

// What one sweep computes; a null pointer / undefined tensor is not computed.
template <typename acc_t>
struct SweepOutputs {
  acc_t* loss = nullptr;      // (M,) Σ_j softplus(s_ij); with dsum and dcos: the row sums
  acc_t* dsum = nullptr;      // (M,) Σ_j g_ij
  acc_t* dcos = nullptr;      // (M,) Σ_j g_ij (x_i·y_j)
  const acc_t* w = nullptr;   // (M,) row weights of G (null: every row 1)
  at::Tensor grad_x;          // (M, D) t·G·y
  at::Tensor grad_y;          // (N, D) t·Gᵀ·x
};

// softplus(s) = s above s = 40 (the neglected log1p(e^{−s}) < 5e-18 relative); sigmoid
// saturates to exactly 0 / 1: nothing overflows. Both run on thread-local buffers (no
// allocation per tile).
constexpr double kSoftplusThreshold = 40.0;

template <typename acc_t>
at::Tensor blob(std::vector<acc_t>& v, int64_t nr, int64_t nc) {
  return at::from_blob(v.data(), {nr, nc}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// h_r,pos_col(r) = −h_r,pos_col(r) for the rows whose positive lies in the (nr × nc) tile.
template <typename acc_t, typename PosCol>
void negate_positives(acc_t* h, int64_t nr, int64_t nc, PosCol pos_col) {
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t pc = pos_col(r);
    if (pc >= 0 && pc < nc) h[r * nc + pc] = -h[r * nc + pc];
  }
}

// s = −z·(t·cos + b) over the tile.
template <typename acc_t, typename PosCol>
void flipped_logits(acc_t* s, const acc_t* cos, acc_t t, acc_t b, int64_t nr, int64_t nc, PosCol pos_col) {
  for (int64_t i = 0; i < nr * nc; ++i) s[i] = t * cos[i] + b;
  negate_positives(s, nr, nc, pos_col);
}

// Per row r of the tile: l_r += Σ_c sp, gs_r += Σ_c g, gc_r += Σ_c g·cos.
template <typename acc_t>
void add_row_sums(const acc_t* sp, const acc_t* g, const acc_t* cos, int64_t nr, int64_t nc, acc_t* l, acc_t* gs,
                  acc_t* gc) {
  for (int64_t r = 0; r < nr; ++r) {
    acc_t tl = 0, ts = 0, tc = 0;
    for (int64_t c = r * nc; c < (r + 1) * nc; ++c) {
      tl += sp[c];
      ts += g[c];
      tc += g[c] * cos[c];
    }
    l[r] += tl;
    gs[r] += ts;
    gc[r] += tc;
  }
}

template <typename acc_t>
void scale_rows(acc_t* h, const acc_t* w, int64_t nr, int64_t nc) {
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t c = r * nc; c < (r + 1) * nc; ++c) h[c] *= w[r];
  }
}

// The thread-local buffers of one row block: the tile's cosines (the caller's scratch), s then
// g in place, softplus(s), and the row sums.
template <typename acc_t>
struct BlockScratch {
  std::vector<acc_t> g, sp, l, gs, gc;
  BlockScratch(size_t tile, int64_t nr, bool sums)
      : g(tile), sp(sums ? tile : 0), l(sums ? nr : 0), gs(sums ? nr : 0), gc(sums ? nr : 0) {}
};

// sp = softplus(s) and, in place, s ← σ(s) over a tile: ATen's kernels (fp64).
template <typename acc_t>
void softplus_and_sigmoid(std::vector<acc_t>& s_to_sigmoid, std::vector<acc_t>& sp, int64_t nr, int64_t nc) {
  at::Tensor s = blob(s_to_sigmoid, nr, nc), out = blob(sp, nr, nc);
  at::softplus_out(out, s, 1.0, kSoftplusThreshold);
  at::sigmoid_out(s, s);
}

// fp32: from one e = exp(−|s|) ∈ [0, 1] (ATen's vectorised exp), softplus(s) = max(s, 0) + log1p(e)
// and σ(s) = (s ≥ 0 ? 1 : e)/(1 + e), with log1p(e) = 2·atanh(q), q = e/(2 + e) ∈ [0, 1/3], by its
// odd series to q^17 (truncation < 2e-9 relative): plain arithmetic the compiler vectorises.
// ATen's softplus calls a scalar log1p (≈ 9 ns per element here: more than the tile's product
// at D = 128). NaN stays NaN; |s| = inf gives (max(s, 0), 0 or 1).
template <>
void softplus_and_sigmoid<float>(std::vector<float>& s_to_sigmoid, std::vector<float>& sp, int64_t nr, int64_t nc) {
  float* g = s_to_sigmoid.data();
  float* e = sp.data();
  const int64_t n = nr * nc;
  for (int64_t i = 0; i < n; ++i) e[i] = -std::abs(g[i]);
  at::Tensor et = blob(sp, nr, nc);
  at::exp_out(et, et);
  for (int64_t i = 0; i < n; ++i) {
    const float s = g[i], ei = e[i], q = ei / (2.0f + ei), q2 = q * q;
    float p = 1.0f / 17;
    for (float c : {1.0f / 15, 1.0f / 13, 1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f}) p = p * q2 + c;
    e[i] = std::max(s, 0.0f) + 2.0f * q * p;
    g[i] = (s >= 0.0f ? 1.0f : ei) / (1.0f + ei);
  }
}

// One tile's pair terms from its cosines: g = −z·σ(s) into buf.g and, with `sums`, the tile's
// Σ softplus(s), Σ g, Σ g·cos added to the row block's sums.
template <typename acc_t, typename PosCol>
void tile_terms(const acc_t* cos, int64_t nr, int64_t nc, acc_t t, acc_t b, PosCol pos_col, bool sums,
                BlockScratch<acc_t>& buf) {
  flipped_logits(buf.g.data(), cos, t, b, nr, nc, pos_col);
  if (sums) {
    softplus_and_sigmoid(buf.g, buf.sp, nr, nc);
  } else {
    at::Tensor s = blob(buf.g, nr, nc);
    at::sigmoid_out(s, s);
  }
  negate_positives(buf.g.data(), nr, nc, pos_col);
  if (sums) add_row_sums(buf.sp.data(), buf.g.data(), cos, nr, nc, buf.l.data(), buf.gs.data(), buf.gc.data());
}

template <typename acc_t>
void siglip_sweep(const SiglipInputs& in, const SweepOutputs<acc_t>& out) {
  const int64_t M = in.x.size(0), N = in.y.size(0), D = in.x.size(1);
  const acc_t t = static_cast<acc_t>(in.scale), b = static_cast<acc_t>(in.bias);
  const acc_t* X = in.x.data_ptr<acc_t>();
  const acc_t* Y = in.y.data_ptr<acc_t>();
  const bool sums = out.loss != nullptr, want_x = out.grad_x.defined(), want_y = out.grad_y.defined();
  // ∂y: thread 0 accumulates into grad_y itself, every other thread into its own (N, D) partial
  // (no atomics), added at the end in thread order (a fixed order for a fixed thread count).
  const int64_t threads = at::get_num_threads();
  at::Tensor partial_y;
  if (want_y) {
    out.grad_y.zero_();
    if (threads > 1) partial_y = at::zeros({threads - 1, N, D}, in.x.options());
  }
  const auto thread_acc_y = [&]() -> acc_t* {
    if (!want_y) return nullptr;
    const int64_t k = at::get_thread_num();
    return k == 0 ? out.grad_y.template data_ptr<acc_t>() : partial_y.select(0, k - 1).data_ptr<acc_t>();
  };
  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& cos) {
    const acc_t* rows = X + r0 * D;
    acc_t* acc_x = want_x ? out.grad_x.template data_ptr<acc_t>() + r0 * D : nullptr;
    acc_t* acc_y = thread_acc_y();
    if (acc_x != nullptr) std::fill(acc_x, acc_x + nr * D, acc_t(0));
    BlockScratch<acc_t> buf(cos.size(), nr, sums);
    for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, N - c0);
      const acc_t* cols = Y + c0 * D;
      const auto pos_col = [&](int64_t r) { return r0 + r + in.offset - c0; };
      gemm_tile(rows, nr, cols, nc, D, acc_t(1), cos.data());
      tile_terms(cos.data(), nr, nc, t, b, pos_col, sums, buf);
      if (out.w != nullptr) scale_rows(buf.g.data(), out.w + r0, nr, nc);
      if (acc_x != nullptr) gemm_accumulate(buf.g.data(), nr, nc, cols, D, t, acc_x);
      if (acc_y != nullptr) gemm_accumulate_transposed(buf.g.data(), nr, nc, rows, D, t, acc_y + c0 * D);
    }
    if (sums) {
      std::copy(buf.l.begin(), buf.l.end(), out.loss + r0);
      std::copy(buf.gs.begin(), buf.gs.end(), out.dsum + r0);
      std::copy(buf.gc.begin(), buf.gc.end(), out.dcos + r0);
    }
  });
  for (int64_t k = 0; want_y && k < threads - 1; ++k) out.grad_y.add_(partial_y.select(0, k));
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
    SweepOutputs<scalar_t> out;
    out.loss = loss.data_ptr<scalar_t>();
    out.dsum = dsum.data_ptr<scalar_t>();
    out.dcos = dcos.data_ptr<scalar_t>();
    siglip_sweep<scalar_t>(in, out);
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
    SweepOutputs<scalar_t> out;
    out.w = w.data_ptr<scalar_t>();
    out.grad_x = grad_x;
    if (need_grad_y) out.grad_y = grad_y;
    siglip_sweep<scalar_t>(in, out);
  });
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

// L = Σ_i loss_i with its gradients from the one sweep; every output in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_loss_and_grad_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias, int64_t pos_offset,
    bool need_grad_x, bool need_grad_y) {
  at::NoGradGuard no_grad;
  const SiglipInputs in = prepare_siglip(x, y, scale, bias, pos_offset);
  const int64_t M = x.size(0);
  const auto opts = in.x.options();
  at::Tensor loss = poisoned({M}, opts), dsum = poisoned({M}, opts), dcos = poisoned({M}, opts);
  at::Tensor grad_x = need_grad_x ? poisoned(in.x.sizes(), opts) : at::zeros_like(in.x);
  at::Tensor grad_y = need_grad_y ? poisoned(in.y.sizes(), opts) : at::zeros_like(in.y);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "siglip_loss_and_grad_cpu", [&] {
    SweepOutputs<scalar_t> out;
    out.loss = loss.data_ptr<scalar_t>();
    out.dsum = dsum.data_ptr<scalar_t>();
    out.dcos = dcos.data_ptr<scalar_t>();
    if (need_grad_x) out.grad_x = grad_x;
    if (need_grad_y) out.grad_y = grad_y;
    siglip_sweep<scalar_t>(in, out);
  });
  return {loss.sum(), grad_x, grad_y, dcos.sum(), dsum.sum()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastntxent, CPU, m) {
  m.impl("siglip_forward", &siglip_forward_cpu);
  m.impl("siglip_backward", &siglip_backward_cpu);
  m.impl("siglip_loss_and_grad", &siglip_loss_and_grad_cpu);
}

}  // namespace fastntxent
