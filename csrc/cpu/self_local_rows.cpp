// Local-rows form of the self-similarity family on the CPU (docs/distributed.md, docs/maths.md §1).
//
// Rows [r0, r1) of the global batch u (M, D) against all M columns; the diagonal of local row r
// is column r0 + r; positives from the global labels (or label(i) = i mod period). This is what
// each rank of a distributed loss computes: M_local·M·D work instead of M²·D.
//
// Forward: each local row block streams over the column blocks (one BLAS tile product each) and
// keeps the online max-subtracted logsumexp, Σ P·s, the positive sum / count and top-1.
// Backward: the gradient of every global row produced by the local rows only,
//   G_ij = a_i P_ij + b_i [y_j = y_i]   (i local, j ≠ i global),
//   grad[j] += Gᵀ·u[R]  (column side),  grad[R] += G·u[C]  (row side),  times 1/τ,
// in one pass over the tiles: parallel over column blocks, so each thread owns the column side
// of its blocks; the row side goes into a thread-local (M_local × D) accumulator summed at the end.
// Memory: one tile per thread, O(M·D) output, O(threads·M_local·D) row-side scratch.
// The single-process call (r0 = 0, r1 = M) uses csrc/cpu/self_similarity.cpp and its cheaper
// symmetric backward instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "tiling.h"

namespace fastntxent {
namespace {

using cpu::for_each_row_block;
using cpu::kColBlock;
using cpu::kRowBlock;
using cpu::poisoned;
using cpu::tile_product;

struct LocalInputs {
  at::Tensor u;       // (M, D) contiguous, accumulation dtype
  at::Tensor labels;  // (M,) contiguous int64
  double inv_tau;
  int64_t r0, r1;
};

LocalInputs prepare_local(const at::Tensor& u, const at::Tensor& temperature, const c10::optional<at::Tensor>& labels,
                          int64_t period, int64_t r0, int64_t r1) {
  TORCH_CHECK(u.dim() == 2, "fastntxent: u must be 2-D (M, D), got ", u.dim(), "-D");
  TORCH_CHECK(u.device().is_cpu(), "fastntxent CPU kernel: u must be a CPU tensor");
  const auto t = u.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "fastntxent: u must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(temperature.numel() == 1, "fastntxent: temperature must hold one value");
  TORCH_CHECK(period >= 1, "fastntxent: rows_per_view must be >= 1, got ", period);
  TORCH_CHECK_VALUE(0 <= r0 && r0 <= r1 && r1 <= u.size(0), "fastntxent: local rows [", r0, ", ", r1,
                    ") must lie in [0, M = ", u.size(0), "]");
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == u.size(0),
                "fastntxent: labels must have shape (M,) = (", u.size(0), ",)");
    TORCH_CHECK(labels->scalar_type() == at::kLong, "fastntxent: labels must be int64");
  }
  const double tau = temperature.to(at::kCPU).item<double>();
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "fastntxent: temperature must be finite and > 0, got ", tau);
  const auto acc = t == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lab = labels.has_value()
                       ? labels->contiguous()
                       : at::remainder(at::arange(u.size(0), u.options().dtype(at::kLong)), period);
  return {u.detach().to(acc).contiguous(), lab, 1.0 / tau, r0, r1};
}

template <typename acc_t>
void forward_local(const LocalInputs& in, acc_t* lse, acc_t* pos_sum, acc_t* pos_count, acc_t* ps_sum, acc_t* top1) {
  const int64_t M = in.u.size(0);
  const acc_t inv_tau = static_cast<acc_t>(in.inv_tau);
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  for_each_row_block<acc_t>(in.r1 - in.r0, [&](int64_t b0, int64_t nr, std::vector<acc_t>& buf) {
    const int64_t g0 = in.r0 + b0;  // global index of the block's first row
    const at::Tensor rows = in.u.narrow(0, g0, nr);
    std::vector<acc_t> m(nr, neg_inf), l(nr, 0), ps(nr, 0), psum(nr, 0), cnt(nr, 0), best(nr, neg_inf);
    std::vector<char> best_is_pos(nr, 0);
    for (int64_t c0 = 0; c0 < M; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, M - c0);
      tile_product(buf, rows, in.u.narrow(0, c0, nc));
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = g0 + r;
        const int64_t li = lab[i];
        acc_t* s = buf.data() + r * nc;
        acc_t tmax = neg_inf;
        int64_t targ = -1;
        for (int64_t c = 0; c < nc; ++c) {
          s[c] *= inv_tau;
          if (c0 + c != i && s[c] > tmax) { tmax = s[c]; targ = c; }
        }
        if (targ < 0) continue;  // the tile holds only the diagonal
        if (tmax > best[r]) {
          best[r] = tmax;
          best_is_pos[r] = lab[c0 + targ] == li;
        }
        const acc_t new_m = std::max(m[r], tmax);
        const acc_t scale = std::exp(m[r] - new_m);  // exp(-inf) = 0 on the first tile
        acc_t tl = 0, tps = 0, tpos = 0, tcnt = 0;
        for (int64_t c = 0; c < nc; ++c) {
          if (c0 + c == i) continue;
          const acc_t e = std::exp(s[c] - new_m);
          tl += e;
          tps += e * s[c];
          if (lab[c0 + c] == li) { tpos += s[c]; tcnt += 1; }
        }
        l[r] = l[r] * scale + tl;
        ps[r] = ps[r] * scale + tps;
        psum[r] += tpos;
        cnt[r] += tcnt;
        m[r] = new_m;
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t o = b0 + r;  // local output index
      const bool any = l[r] > 0;  // false only when M == 1
      lse[o] = any ? m[r] + std::log(l[r]) : neg_inf;
      ps_sum[o] = any ? ps[r] / l[r] : 0;
      pos_sum[o] = psum[r];
      pos_count[o] = cnt[r];
      top1[o] = best_is_pos[r] ? 1 : 0;
    }
  });
}

template <typename acc_t>
void backward_local(const LocalInputs& in, const acc_t* lse, const acc_t* a, const acc_t* b, at::Tensor& grad) {
  const int64_t M = in.u.size(0);
  const int64_t D = in.u.size(1);
  const int64_t m_local = in.r1 - in.r0;
  const acc_t inv_tau = static_cast<acc_t>(in.inv_tau);
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  const at::Tensor local = in.u.narrow(0, in.r0, m_local);
  at::Tensor row_side = at::zeros({m_local, D}, in.u.options());
  std::mutex row_side_lock;
  const int64_t col_blocks = (M + kColBlock - 1) / kColBlock;

  at::parallel_for(0, col_blocks, 1, [&](int64_t cb0, int64_t cb1) {
    std::vector<acc_t> buf(kRowBlock * kColBlock);
    at::Tensor racc = at::zeros({m_local, D}, in.u.options());  // this thread's row side
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t c0 = cb * kColBlock;
      const int64_t nc = std::min(kColBlock, M - c0);
      const at::Tensor cols = in.u.narrow(0, c0, nc);
      at::Tensor cacc = grad.narrow(0, c0, nc);  // column side: only this thread writes it
      cacc.zero_();
      for (int64_t b0 = 0; b0 < m_local; b0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, m_local - b0);
        const int64_t g0 = in.r0 + b0;
        const at::Tensor rows = local.narrow(0, b0, nr);
        const at::Tensor tile = tile_product(buf, rows, cols);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = g0 + r;
          const acc_t ai = a[b0 + r], bi = b[b0 + r], li = lse[b0 + r];
          const int64_t labi = lab[i];
          acc_t* g = buf.data() + r * nc;
          for (int64_t c = 0; c < nc; ++c) {
            const int64_t j = c0 + c;
            acc_t v = 0;
            if (j != i) {
              if (ai != 0) v += ai * std::exp(g[c] * inv_tau - li);
              if (lab[j] == labi) v += bi;
            }
            g[c] = v;
          }
        }
        racc.narrow(0, b0, nr).addmm_(tile, cols);
        cacc.addmm_(tile.t(), rows);
      }
    }
    std::lock_guard<std::mutex> guard(row_side_lock);
    row_side.add_(racc);
  });
  grad.narrow(0, in.r0, m_local).add_(row_side);
  grad.mul_(inv_tau);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_forward_rows_cpu(
    const at::Tensor& u, const at::Tensor& temperature, const c10::optional<at::Tensor>& labels, int64_t period,
    int64_t row_start, int64_t row_stop) {
  at::NoGradGuard no_grad;  // the tile products are not part of any graph
  const LocalInputs in = prepare_local(u, temperature, labels, period, row_start, row_stop);
  const int64_t rows = row_stop - row_start;
  const auto opts = in.u.options();
  at::Tensor lse = poisoned({rows}, opts), pos_sum = poisoned({rows}, opts), pos_count = poisoned({rows}, opts),
             ps_sum = poisoned({rows}, opts), top1 = poisoned({rows}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "self_forward_rows_cpu", [&] {
    forward_local<scalar_t>(in, lse.data_ptr<scalar_t>(), pos_sum.data_ptr<scalar_t>(), pos_count.data_ptr<scalar_t>(),
                            ps_sum.data_ptr<scalar_t>(), top1.data_ptr<scalar_t>());
  });
  return {lse, pos_sum, pos_count, ps_sum, top1};
}

at::Tensor self_backward_rows_cpu(const at::Tensor& u, const at::Tensor& temperature,
                                  const c10::optional<at::Tensor>& labels, int64_t period, int64_t row_start,
                                  int64_t row_stop, const at::Tensor& lse, const at::Tensor& grad_lse,
                                  const at::Tensor& grad_pos) {
  at::NoGradGuard no_grad;
  const LocalInputs in = prepare_local(u, temperature, labels, period, row_start, row_stop);
  const auto acc = in.u.scalar_type();
  const cpu::RowInputs rows = cpu::row_inputs(lse, grad_lse, grad_pos, row_stop - row_start, acc);
  at::Tensor grad = poisoned(in.u.sizes(), in.u.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "self_backward_rows_cpu", [&] {
    backward_local<scalar_t>(in, rows.lse.data_ptr<scalar_t>(), rows.a.data_ptr<scalar_t>(),
                             rows.b.data_ptr<scalar_t>(), grad);
  });
  return grad.to(u.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastntxent, CPU, m) {
  m.impl("self_forward_rows", &self_forward_rows_cpu);
  m.impl("self_backward_rows", &self_backward_rows_cpu);
}

}  // namespace fastntxent
