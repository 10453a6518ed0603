// Fused CPU kernels of the self-similarity family (docs/maths.md §1).
//
// Forward: each row block streams over column blocks; the similarity tile is one small
// matrix product (BLAS through at::mm_out), then a single fused pass per row updates an
// online max-subtracted logsumexp, Σ P·s (rescaled with it), the positive sums/counts
// and the top-1 statistic. Backward: the tile is recomputed and turned into
// H_kj = G_kj + G_jk in place, then grad[R] += H·u[C] — no M×M buffer anywhere, no atomics.
// Memory: one (row block × column block) tile and one (row block × D) accumulator per
// thread, plus O(M) row statistics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tiling.h"

namespace fastntxent {
namespace {

using cpu::for_each_row_block;
using cpu::kColBlock;
using cpu::poisoned;
using cpu::tile_product;

struct Inputs {
  at::Tensor u;       // (M, D) contiguous, accumulation dtype
  at::Tensor labels;  // (M,) contiguous int64
  double inv_tau;
};

void check_common(const at::Tensor& u, const at::Tensor& temperature,
                  const c10::optional<at::Tensor>& labels, int64_t period) {
  TORCH_CHECK(u.dim() == 2, "fastntxent: u must be 2-D (M, D), got ", u.dim(), "-D");
  TORCH_CHECK(u.device().is_cpu(), "fastntxent CPU kernel: u must be a CPU tensor");
  TORCH_CHECK(temperature.numel() == 1, "fastntxent: temperature must hold one value");
  TORCH_CHECK(period >= 1, "fastntxent: period must be >= 1, got ", period);
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

Inputs prepare(const at::Tensor& u, const at::Tensor& temperature,
               const c10::optional<at::Tensor>& labels, int64_t period) {
  check_common(u, temperature, labels, period);
  const double tau = temperature.to(at::kCPU).item<double>();
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "fastntxent: temperature must be finite and > 0, got ", tau);
  at::Tensor lab = labels.has_value()
                       ? labels->contiguous()
                       : at::remainder(at::arange(u.size(0), u.options().dtype(at::kLong)), period);
  // Detached: worker threads do not inherit the grad mode, and no graph is wanted here.
  return {u.detach().to(accumulation_type(u)).contiguous(), lab, 1.0 / tau};
}

// Σ over columns c in [0, n) except `skip` of f(c); `skip` may be out of range.
template <typename F>
inline void for_each_column_except(int64_t n, int64_t skip, F&& f) {
  const int64_t stop = (skip >= 0 && skip < n) ? skip : n;
  for (int64_t c = 0; c < stop; ++c) f(c);
  for (int64_t c = stop + 1; c < n; ++c) f(c);
}

template <typename acc_t>
void forward_impl(const Inputs& in, acc_t* lse, acc_t* pos_sum, acc_t* pos_count, acc_t* ps_sum,
                  acc_t* top1) {
  const int64_t M = in.u.size(0);
  const acc_t inv_tau = static_cast<acc_t>(in.inv_tau);
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& buf) {
    const at::Tensor rows = in.u.narrow(0, r0, nr);
    // Per-row running state: max m, Σ exp(s - m), Σ exp(s - m)·s, positives, top-1.
    std::vector<acc_t> m(nr, neg_inf), l(nr, 0), ps(nr, 0), psum(nr, 0), cnt(nr, 0), best(nr, neg_inf);
    std::vector<char> best_is_pos(nr, 0);
    for (int64_t c0 = 0; c0 < M; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, M - c0);
      tile_product(buf, rows, in.u.narrow(0, c0, nc));
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = r0 + r;
        const int64_t self = i - c0;  // column of the diagonal in this tile, maybe outside
        const int64_t li = lab[i];
        acc_t* s = buf.data() + r * nc;
        for (int64_t c = 0; c < nc; ++c) s[c] *= inv_tau;
        acc_t tmax = neg_inf;
        int64_t targ = -1;
        for_each_column_except(nc, self, [&](int64_t c) {
          if (s[c] > tmax) { tmax = s[c]; targ = c; }
        });
        if (targ < 0) continue;  // the tile holds only the diagonal
        if (tmax > best[r]) {
          best[r] = tmax;
          best_is_pos[r] = lab[c0 + targ] == li;
        }
        const acc_t new_m = std::max(m[r], tmax);
        const acc_t scale = std::exp(m[r] - new_m);  // exp(-inf) = 0 on the first tile
        acc_t tl = 0, tps = 0, tpos = 0, tcnt = 0;
        for_each_column_except(nc, self, [&](int64_t c) {
          const acc_t e = std::exp(s[c] - new_m);
          tl += e;
          tps += e * s[c];
          if (lab[c0 + c] == li) { tpos += s[c]; tcnt += 1; }
        });
        l[r] = l[r] * scale + tl;
        ps[r] = ps[r] * scale + tps;
        psum[r] += tpos;
        cnt[r] += tcnt;
        m[r] = new_m;
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = r0 + r;
      const bool any = l[r] > 0;  // false only when M == 1
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
  const int64_t* lab = in.labels.data_ptr<int64_t>();

  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& buf) {
    const at::Tensor rows = in.u.narrow(0, r0, nr);
    at::Tensor acc = grad.narrow(0, r0, nr);  // contiguous rows of the output
    acc.zero_();
    for (int64_t c0 = 0; c0 < M; c0 += kColBlock) {
      const int64_t nc = std::min(kColBlock, M - c0);
      const at::Tensor cols = in.u.narrow(0, c0, nc);
      const at::Tensor tile = tile_product(buf, rows, cols);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t k = r0 + r;
        acc_t* h = buf.data() + r * nc;
        const acc_t ak = a[k], bk = b[k], lk = lse[k];
        const int64_t labk = lab[k];
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = c0 + c;
          if (j == k) { h[c] = 0; continue; }
          const acc_t s = h[c] * inv_tau;
          // G_kj + G_jk with G_ij = a_i P_ij + b_i [j ∈ P(i)] (s is symmetric).
          acc_t v = 0;
          if (ak != 0) v += ak * std::exp(s - lk);
          if (a[j] != 0) v += a[j] * std::exp(s - lse[j]);
          if (lab[j] == labk) v += bk + b[j];
          h[c] = v;
        }
      }
      acc.addmm_(tile, cols);
    }
    acc.mul_(inv_tau);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_forward_cpu(
    const at::Tensor& u, const at::Tensor& temperature, const c10::optional<at::Tensor>& labels,
    int64_t period) {
  at::NoGradGuard no_grad;  // the kernels' tile products are not part of any graph
  const Inputs in = prepare(u, temperature, labels, period);
  const int64_t M = u.size(0);
  const auto opts = in.u.options();
  at::Tensor lse = poisoned({M}, opts), pos_sum = poisoned({M}, opts), pos_count = poisoned({M}, opts),
             ps_sum = poisoned({M}, opts), top1 = poisoned({M}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "self_forward_cpu", [&] {
    forward_impl<scalar_t>(in, lse.data_ptr<scalar_t>(), pos_sum.data_ptr<scalar_t>(),
                           pos_count.data_ptr<scalar_t>(), ps_sum.data_ptr<scalar_t>(),
                           top1.data_ptr<scalar_t>());
  });
  return {lse, pos_sum, pos_count, ps_sum, top1};
}

at::Tensor self_backward_cpu(const at::Tensor& u, const at::Tensor& temperature,
                             const c10::optional<at::Tensor>& labels, int64_t period,
                             const at::Tensor& lse, const at::Tensor& grad_lse,
                             const at::Tensor& grad_pos) {
  at::NoGradGuard no_grad;
  const Inputs in = prepare(u, temperature, labels, period);
  const int64_t M = u.size(0);
  const auto acc = in.u.scalar_type();
  const cpu::RowInputs rows = cpu::row_inputs(lse, grad_lse, grad_pos, M, acc);
  at::Tensor grad = poisoned(in.u.sizes(), in.u.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "self_backward_cpu", [&] {
    backward_impl<scalar_t>(in, rows.lse.data_ptr<scalar_t>(), rows.a.data_ptr<scalar_t>(),
                            rows.b.data_ptr<scalar_t>(), grad);
  });
  return grad.to(u.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastntxent, CPU, m) {
  m.impl("self_forward", &self_forward_cpu);
  m.impl("self_backward", &self_backward_cpu);
}

}  // namespace fastntxent
