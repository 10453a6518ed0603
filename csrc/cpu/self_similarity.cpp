// Fused CPU kernels of the self-similarity family (docs/maths.md §1), full batch and local rows.
//
// Forward: each row block streams over column blocks; the similarity tile is one small
// matrix product (a direct BLAS call, tiling.h), then vectorised passes per row
// (row_kernels.h) update an online max-subtracted logsumexp, Σ P·s (rescaled with it), the
// positive sums/counts and the top-1 statistic. Backward: the tile is recomputed and turned
// into H_kj = G_kj + G_jk in place (both exps in one pass), then grad[R] += H·u[C]/τ — no M×M
// buffer anywhere, no atomics.
// Local rows (docs/distributed.md): rows [r0, r1) of the global batch u (M, D) against all M
// columns, the diagonal of local row r at column r0 + r — what each rank of a distributed loss
// computes, M_local·M·D work. Same forward; the backward is the gradient of every global row
// produced by the local rows only, G_ij = a_i P_ij + b_i [y_j = y_i] (i local, j ≠ i):
// grad[C] += Gᵀ·u[R] (column side), grad[R] += G·u[C] (row side), times 1/τ, in one pass
// parallel over column blocks (each thread owns the column side of its blocks; the row side
// goes into a thread-local M_local × D accumulator summed at the end).
// Memory: one (row block × column block) tile and one (row block × D) accumulator per
// thread, plus O(M) row statistics (local rows: O(threads·M_local·D) row-side scratch).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "row_kernels.h"
#include "tiling.h"

namespace fastntxent {
namespace {

using cpu::for_each_row_block;
using cpu::kColBlock;
using cpu::kRowBlock;
using cpu::poisoned;
namespace row_ops = cpu::rows;

struct Inputs {
  at::Tensor u;    // (M, D) contiguous, accumulation dtype
  at::Tensor ids;  // (M,) contiguous int32: equal ids ⇔ equal labels (positives)
  double inv_tau;
  int64_t r0, r1;  // the rows whose statistics are computed: [0, M) or a rank's local rows
  bool decoupled;  // positives left out of the logsumexp (DCL)
};

void check_common(const at::Tensor& u, const at::Tensor& temperature,
                  const c10::optional<at::Tensor>& labels, int64_t period) {
  TORCH_CHECK(u.dim() == 2, "fastntxent: u must be 2-D (M, D), got ", u.dim(), "-D");
  TORCH_CHECK(u.device().is_cpu(), "fastntxent CPU kernel: u must be a CPU tensor");
  TORCH_CHECK(temperature.numel() == 1, "fastntxent: temperature must hold one value");
  TORCH_CHECK(period >= 1, "fastntxent: period must be >= 1, got ", period);
  TORCH_CHECK(u.size(0) <= std::numeric_limits<int32_t>::max(),
              "fastntxent CPU kernel: at most 2^31 - 1 rows, got ", u.size(0));
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == u.size(0),
                "fastntxent: labels must have shape (M,) = (", u.size(0), ",)");
    TORCH_CHECK(labels->scalar_type() == at::kLong, "fastntxent: labels must be int64");
  }
  const auto t = u.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "fastntxent: u must be float32, float64, bfloat16 or float16, got ", t);
}

at::ScalarType accumulation_type(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Labels as dense int32 ids (the row passes compare 8 of them per instruction).
at::Tensor label_ids(const at::Tensor& u, const c10::optional<at::Tensor>& labels, int64_t period) {
  if (!labels.has_value()) {
    return at::remainder(at::arange(u.size(0), u.options().dtype(at::kLong)), period).to(at::kInt);
  }
  const at::Tensor inverse = std::get<1>(at::_unique(labels->to(at::kCPU), /*sorted=*/false, /*return_inverse=*/true));
  return inverse.to(at::kInt).contiguous();
}

Inputs prepare(const at::Tensor& u, const at::Tensor& temperature, const c10::optional<at::Tensor>& labels,
               int64_t period, bool decoupled, int64_t r0 = 0, int64_t r1 = -1) {
  check_common(u, temperature, labels, period);
  if (r1 < 0) r1 = u.size(0);
  TORCH_CHECK_VALUE(0 <= r0 && r0 <= r1 && r1 <= u.size(0), "fastntxent: local rows [", r0, ", ", r1,
                    ") must lie in [0, M = ", u.size(0), "]");
  const double tau = temperature.to(at::kCPU).item<double>();
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "fastntxent: temperature must be finite and > 0, got ", tau);
  // Detached: worker threads do not inherit the grad mode, and no graph is wanted here.
  return {u.detach().to(accumulation_type(u)).contiguous(), label_ids(u, labels, period), 1.0 / tau, r0, r1,
          decoupled};
}

// The columns [0, n) of a tile except `skip` (the diagonal; may be out of range) as at most
// two ranges: f(begin, length) for each.
template <typename F>
inline void for_each_range_except(int64_t n, int64_t skip, F&& f) {
  const int64_t stop = (skip >= 0 && skip < n) ? skip : n;
  f(int64_t(0), stop);
  if (stop + 1 < n) f(stop + 1, n - stop - 1);
}

// The five statistics of rows [in.r0, in.r1), written at index i − in.r0. `symmetric`: the
// tiles of the full batch's symmetric backward (symmetric_tile, needs in.r0 = 0); else one
// product per tile, as the local-rows backward recomputes them.
template <typename acc_t>
void forward_impl(const Inputs& in, bool symmetric, acc_t* lse, acc_t* pos_sum, acc_t* pos_count, acc_t* ps_sum,
                  acc_t* top1) {
  const int64_t M = in.u.size(0), D = in.u.size(1);
  const acc_t inv_tau = static_cast<acc_t>(in.inv_tau);
  const acc_t* up = in.u.data_ptr<acc_t>();
  const int32_t* ids = in.ids.data_ptr<int32_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  TORCH_INTERNAL_ASSERT(!symmetric || in.r0 == 0);

  for_each_row_block<acc_t>(in.r1 - in.r0, [&](int64_t b0, int64_t nr, std::vector<acc_t>& buf) {
    const int64_t r0 = in.r0 + b0;  // global index of the block's first row
    // Per-row running state: max m, Σ exp(s - m), Σ exp(s - m)·s, positives, top-1.
    std::vector<acc_t> m(nr, neg_inf), l(nr, 0), ps(nr, 0), psum(nr, 0), cnt(nr, 0), best(nr, neg_inf);
    std::vector<char> best_is_pos(nr, 0);
    std::vector<acc_t> scratch(symmetric ? kRowBlock * kRowBlock : 0);
    for (int64_t c0 = 0; c0 < M; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, M - c0);
      if (symmetric) {
        cpu::symmetric_tile(up, M, D, r0, nr, c0, nc, buf.data(), scratch.data());
      } else {
        cpu::gemm_tile(up + r0 * D, nr, up + c0 * D, nc, D, acc_t(1), buf.data());
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = r0 + r;
        const int64_t self = i - c0;  // column of the diagonal in this tile, maybe outside
        const int32_t li = ids[i];
        acc_t* s = buf.data() + r * nc;
        row_ops::scale_row(s, nc, inv_tau);  // logits s = u·uᵀ/τ
        acc_t tmax = neg_inf;
        for_each_range_except(nc, self, [&](int64_t c, int64_t n) { tmax = std::max(tmax, row_ops::max_of(s + c, n)); });
        if (!(tmax > neg_inf)) continue;  // the tile holds only the diagonal
        if (tmax > best[r]) {  // a new best: its first column decides top-1 (argmax's first index)
          best[r] = tmax;
          int64_t targ = -1;
          for_each_range_except(nc, self, [&](int64_t c, int64_t n) {
            for (int64_t x = c; x < c + n && targ < 0; ++x) {
              if (s[x] == tmax) targ = x;
            }
          });
          best_is_pos[r] = ids[c0 + targ] == li;
        }
        acc_t shift = tmax;  // the largest logit the logsumexp takes
        if (in.decoupled) {  // its negatives only: a dominant positive must not underflow them
          shift = neg_inf;
          for_each_range_except(nc, self, [&](int64_t c, int64_t n) {
            for (int64_t x = c; x < c + n; ++x) {
              if (ids[c0 + x] != li) shift = std::max(shift, s[x]);
            }
          });
        }
        const acc_t new_m = std::max(m[r], shift);
        // exp(-inf) = 0 on the first tile; no negative yet (decoupled): nothing to rescale
        const acc_t scale = new_m > neg_inf ? std::exp(m[r] - new_m) : acc_t(1);
        acc_t tl = 0, tps = 0, tpos = 0, tcnt = 0;
        for_each_range_except(nc, self, [&](int64_t c, int64_t n) {
          if (in.decoupled) {
            row_ops::add_exp_sums_except_label(s + c, n, ids + c0 + c, li, new_m, tl, tps);
          } else {
            row_ops::add_exp_sums(s + c, n, new_m, tl, tps);
          }
          row_ops::add_where_label(s + c, n, ids + c0 + c, li, tpos, tcnt);
        });
        l[r] = l[r] * scale + tl;
        ps[r] = ps[r] * scale + tps;
        psum[r] += tpos;
        cnt[r] += tcnt;
        m[r] = new_m;
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = b0 + r;  // output index
      const bool any = l[r] > 0;  // false only when M == 1 (decoupled: a row without a negative)
      lse[i] = any ? m[r] + std::log(l[r]) : neg_inf;
      ps_sum[i] = any ? ps[r] / l[r] : 0;
      pos_sum[i] = psum[r];
      pos_count[i] = cnt[r];
      top1[i] = best_is_pos[r] ? 1 : 0;
    }
  });
}

template <typename acc_t>
void backward_impl(const Inputs& in, const acc_t* lse, const acc_t* a, const acc_t* b, at::Tensor& grad) {
  const int64_t M = in.u.size(0);
  const int64_t D = in.u.size(1);
  const acc_t inv_tau = static_cast<acc_t>(in.inv_tau);
  const acc_t* up = in.u.data_ptr<acc_t>();
  const int32_t* ids = in.ids.data_ptr<int32_t>();
  acc_t* gp = grad.data_ptr<acc_t>();  // contiguous (M, D)

  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& buf) {
    acc_t* acc = gp + r0 * D;  // the block's own rows of the output
    std::fill(acc, acc + nr * D, acc_t(0));
    std::vector<acc_t> scratch(kRowBlock * kRowBlock);
    for (int64_t c0 = 0; c0 < M; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, M - c0);
      const acc_t* cols = up + c0 * D;
      // the forward's own similarities, s_jk read as s_kj (symmetric_tile)
      cpu::symmetric_tile(up, M, D, r0, nr, c0, nc, buf.data(), scratch.data());
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t k = r0 + r;
        acc_t* h = buf.data() + r * nc;
        // H_kj = G_kj + G_jk with G_ij = a_i P_ij + b_i [j ∈ P(i)] (s is symmetric): both
        // probabilities from the two rows' lse in one pass.
        row_ops::pair_exp(h, nc, inv_tau, a[k], lse[k], a + c0, lse + c0);
        if (in.decoupled) row_ops::zero_where_label(h, nc, ids + c0, ids[k]);  // no P at positives
        row_ops::add_positive_weights(h, nc, ids + c0, ids[k], b[k], b + c0);
        if (k >= c0 && k < c0 + nc) h[k - c0] = 0;
      }
      cpu::gemm_accumulate(buf.data(), nr, nc, cols, D, inv_tau, acc);  // ∂L/∂u = (1/τ)·H·u
    }
  });
}

// Local rows: ∂L/∂u (M, D) of L = Σ_{i local} a_i lse_i + b_i pos_sum_i (header comment).
template <typename acc_t>
void backward_local_impl(const Inputs& in, const acc_t* lse, const acc_t* a, const acc_t* b, at::Tensor& grad) {
  const int64_t M = in.u.size(0), D = in.u.size(1), m_local = in.r1 - in.r0;
  const acc_t inv_tau = static_cast<acc_t>(in.inv_tau);
  const acc_t* up = in.u.data_ptr<acc_t>();
  const int32_t* ids = in.ids.data_ptr<int32_t>();
  acc_t* gp = grad.data_ptr<acc_t>();  // contiguous (M, D)
  const std::vector<acc_t> no_column_weights(kColBlock, acc_t(0));  // G has the row's b_i only
  std::vector<acc_t> row_side(m_local * D, acc_t(0));
  std::mutex row_side_lock;

  const int64_t col_blocks = (M + kColBlock - 1) / kColBlock;
  at::parallel_for(0, col_blocks, 1, [&](int64_t cb0, int64_t cb1) {
    std::vector<acc_t> buf(kRowBlock * kColBlock);
    std::vector<acc_t> racc(m_local * D, acc_t(0));  // this thread's share of the row side
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t c0 = cb * kColBlock, nc = std::min(kColBlock, M - c0);
      acc_t* cacc = gp + c0 * D;  // the column side of this block: only this thread writes it
      std::fill(cacc, cacc + nc * D, acc_t(0));
      for (int64_t b0 = 0; b0 < m_local; b0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, m_local - b0);
        const acc_t* rows = up + (in.r0 + b0) * D;
        cpu::gemm_tile(rows, nr, up + c0 * D, nc, D, acc_t(1), buf.data());  // the forward's tile
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t o = b0 + r, i = in.r0 + o;
          acc_t* h = buf.data() + r * nc;
          row_ops::row_exp(h, nc, inv_tau, a[o], lse[o]);  // a_i P_ij
          if (in.decoupled) row_ops::zero_where_label(h, nc, ids + c0, ids[i]);
          row_ops::add_positive_weights(h, nc, ids + c0, ids[i], b[o], no_column_weights.data());
          if (i >= c0 && i < c0 + nc) h[i - c0] = 0;
        }
        cpu::gemm_accumulate(buf.data(), nr, nc, up + c0 * D, D, inv_tau, racc.data() + b0 * D);
        cpu::gemm_accumulate_transposed(buf.data(), nr, nc, rows, D, inv_tau, cacc);
      }
    }
    std::lock_guard<std::mutex> guard(row_side_lock);
    for (int64_t x = 0; x < m_local * D; ++x) row_side[x] += racc[x];
  });
  acc_t* g_local = gp + in.r0 * D;
  for (int64_t x = 0; x < m_local * D; ++x) g_local[x] += row_side[x];
}

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats forward_stats(const Inputs& in, bool symmetric) {
  const int64_t rows = in.r1 - in.r0;
  const auto opts = in.u.options();
  at::Tensor lse = poisoned({rows}, opts), pos_sum = poisoned({rows}, opts), pos_count = poisoned({rows}, opts),
             ps_sum = poisoned({rows}, opts), top1 = poisoned({rows}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "self_forward_cpu", [&] {
    forward_impl<scalar_t>(in, symmetric, lse.data_ptr<scalar_t>(), pos_sum.data_ptr<scalar_t>(),
                           pos_count.data_ptr<scalar_t>(), ps_sum.data_ptr<scalar_t>(), top1.data_ptr<scalar_t>());
  });
  return {lse, pos_sum, pos_count, ps_sum, top1};
}

Stats self_forward_cpu(const at::Tensor& u, const at::Tensor& temperature, const c10::optional<at::Tensor>& labels,
                       int64_t period, bool decoupled) {
  at::NoGradGuard no_grad;  // the kernels' tile products are not part of any graph
  return forward_stats(prepare(u, temperature, labels, period, decoupled), /*symmetric=*/true);
}

Stats self_forward_rows_cpu(const at::Tensor& u, const at::Tensor& temperature,
                            const c10::optional<at::Tensor>& labels, int64_t period, int64_t row_start,
                            int64_t row_stop, bool decoupled) {
  at::NoGradGuard no_grad;
  return forward_stats(prepare(u, temperature, labels, period, decoupled, row_start, row_stop), /*symmetric=*/false);
}

// Full batch (local = false: rows [0, M), the symmetric backward) or local rows.
at::Tensor backward(const Inputs& in, bool local, const at::Tensor& u, const at::Tensor& lse,
                    const at::Tensor& grad_lse, const at::Tensor& grad_pos) {
  const auto acc = in.u.scalar_type();
  const cpu::RowInputs rows = cpu::row_inputs(lse, grad_lse, grad_pos, in.r1 - in.r0, acc);
  at::Tensor grad = poisoned(in.u.sizes(), in.u.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "self_backward_cpu", [&] {
    const scalar_t* l = rows.lse.data_ptr<scalar_t>();
    const scalar_t* a = rows.a.data_ptr<scalar_t>();
    const scalar_t* b = rows.b.data_ptr<scalar_t>();
    if (local) {
      backward_local_impl<scalar_t>(in, l, a, b, grad);
    } else {
      backward_impl<scalar_t>(in, l, a, b, grad);
    }
  });
  return grad.to(u.scalar_type());
}

at::Tensor self_backward_cpu(const at::Tensor& u, const at::Tensor& temperature,
                             const c10::optional<at::Tensor>& labels, int64_t period, const at::Tensor& lse,
                             const at::Tensor& grad_lse, const at::Tensor& grad_pos, bool decoupled) {
  at::NoGradGuard no_grad;
  return backward(prepare(u, temperature, labels, period, decoupled), false, u, lse, grad_lse, grad_pos);
}

at::Tensor self_backward_rows_cpu(const at::Tensor& u, const at::Tensor& temperature,
                                  const c10::optional<at::Tensor>& labels, int64_t period, int64_t row_start,
                                  int64_t row_stop, const at::Tensor& lse, const at::Tensor& grad_lse,
                                  const at::Tensor& grad_pos, bool decoupled) {
  at::NoGradGuard no_grad;
  return backward(prepare(u, temperature, labels, period, decoupled, row_start, row_stop), true, u, lse, grad_lse,
                  grad_pos);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastntxent, CPU, m) {
  m.impl("self_forward", &self_forward_cpu);
  m.impl("self_backward", &self_backward_cpu);
  m.impl("self_forward_rows", &self_forward_rows_cpu);
  m.impl("self_backward_rows", &self_backward_rows_cpu);
}

}  // namespace fastntxent
