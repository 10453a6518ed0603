// Fused CPU kernels of the cross-similarity family (docs/maths.md §2): MoCo InfoNCE, CLIP.
//
// One general operator pair (schemas in csrc/ops.cpp). Rows are queries q (M, D); the
// columns of row i are
//   in_batch = true:  every key k_j (N rows) and then every queue entry;
//   in_batch = false: only the positive key k_{i+pos_offset} and then every queue entry;
// with logits s_ic = scale · (q_i · c). The positive of row i is k_{i+pos_offset}
// (pos_offset ≠ 0 when k holds the keys of all ranks and q the local rows).
//
// Forward: each row block streams over column tiles of k and of the queue; the tile is one
// BLAS product (tiling.h), then vectorised passes per row (row_kernels.h) update an online max-subtracted
// logsumexp, Σ P·s (rescaled with it) and the top-1 statistic. CLIP's column logsumexps
// are the same operator on the transposed problem (q ↔ k).
// Backward, for L = Σ_i a_i·lse_i + b_i·pos_i (a = grad_lse, b = grad_pos), G_ic = a_i P_ic
// + b_i [c = positive of i]:
//   ∂L/∂q_i = scale · Σ_c G_ic c          sweep 1: row blocks of q over tiles of k and queue
//   ∂L/∂k_j = scale · Σ_i G_ij q_i        sweep 2: row blocks of k over tiles of q
// Each sweep recomputes its tiles and owns the output rows it writes: no atomics, no M×N or
// M×K buffer; memory is one tile and one accumulator block per thread plus O(M) statistics.
// The queue gets no gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "row_kernels.h"
#include "tiling.h"

namespace fastntxent {
namespace {

using cpu::for_each_row_block;
using cpu::kRowBlock;
using cpu::kColBlock;
using cpu::poisoned;
namespace row_ops = cpu::rows;

struct CrossInputs {
  at::Tensor q;      // (M, D) contiguous, accumulation dtype
  at::Tensor k;      // (N, D)
  at::Tensor queue;  // (K, D) or undefined
  double scale;
  int64_t offset;
  bool in_batch;
  bool decoupled;
};

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

CrossInputs prepare_cross(bool decoupled, const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& queue,
                          const at::Tensor& scale, int64_t pos_offset, bool in_batch) {
  TORCH_CHECK(q.dim() == 2, "fastntxent: q must be 2-D (M, D), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 2, "fastntxent: k must be 2-D (N, D), got ", k.dim(), "-D");
  TORCH_CHECK(q.size(1) == k.size(1), "fastntxent: q and k must have the same D, got ", q.size(1), " and ",
              k.size(1));
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "fastntxent CPU kernel: q and k must be CPU tensors");
  TORCH_CHECK(is_float_type(q.scalar_type()) && q.scalar_type() == k.scalar_type(),
              "fastntxent: q and k must share one of float32, float64, bfloat16, float16; got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(scale.numel() == 1, "fastntxent: scale must hold one value");
  TORCH_CHECK(pos_offset >= 0 && pos_offset + q.size(0) <= k.size(0), "fastntxent: pos_offset + M must be <= N, got ",
              pos_offset, " + ", q.size(0), " > ", k.size(0));
  const double s = scale.to(at::kCPU).item<double>();
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, "fastntxent: the logit scale (1/temperature for InfoNCE) must be finite and > 0, got ", s);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  CrossInputs in{q.detach().to(acc).contiguous(), k.detach().to(acc).contiguous(), at::Tensor(), s, pos_offset,
                 in_batch, decoupled};
  if (queue.has_value() && queue->defined()) {
    TORCH_CHECK(queue->dim() == 2 && queue->size(1) == q.size(1), "fastntxent: queue must have shape (K, ",
                q.size(1), ")");
    TORCH_CHECK(queue->device().is_cpu(), "fastntxent CPU kernel: queue must be a CPU tensor");
    TORCH_CHECK(is_float_type(queue->scalar_type()), "fastntxent: queue must be floating point");
    if (queue->size(0) > 0) in.queue = queue->detach().to(acc).contiguous();
  }
  return in;
}

template <typename acc_t>
struct RowState {
  acc_t m, l, ps, best;
  bool best_is_pos;
};

// Online update of one row with the scaled logits s[0, nc); pos_col is the positive's column
// in this tile or -1. Ties keep the earlier column (argmax's first index). `decoupled`: the
// positive counts for top-1 but not in the logsumexp (whose shift is the others' max).
template <typename acc_t>
inline void update_row(RowState<acc_t>& st, const acc_t* s, int64_t nc, int64_t pos_col, bool decoupled) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t tmax = row_ops::max_of(s, nc);
  if (!(tmax > neg_inf)) return;
  if (tmax > st.best) {  // a new best: its first column decides top-1
    st.best = tmax;
    const int64_t targ = std::find(s, s + nc, tmax) - s;
    st.best_is_pos = targ == pos_col;
  }
  // the logsumexp's columns: [0, nc) or, decoupled, the two ranges around the positive
  const int64_t cut = decoupled && pos_col >= 0 ? pos_col : nc;
  const int64_t rest = cut < nc ? nc - cut - 1 : 0;
  if (cut < nc) {
    tmax = std::max(cut > 0 ? row_ops::max_of(s, cut) : neg_inf, rest > 0 ? row_ops::max_of(s + cut + 1, rest) : neg_inf);
    if (!(tmax > neg_inf)) return;  // the positive alone in this tile
  }
  const acc_t new_m = std::max(st.m, tmax);
  const acc_t rescale = std::exp(st.m - new_m);  // exp(-inf) = 0 on the first tile
  acc_t tl = 0, tps = 0;
  row_ops::add_exp_sums(s, cut, new_m, tl, tps);
  if (rest > 0) row_ops::add_exp_sums(s + cut + 1, rest, new_m, tl, tps);
  st.l = st.l * rescale + tl;
  st.ps = st.ps * rescale + tps;
  st.m = new_m;
}

template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t D) {
  acc_t v = 0;
  for (int64_t d = 0; d < D; ++d) v += x[d] * y[d];
  return v;
}

template <typename acc_t>
void cross_forward_impl(const CrossInputs& in, acc_t* lse, acc_t* pos, acc_t* ps_sum, acc_t* top1) {
  const int64_t M = in.q.size(0), D = in.q.size(1);
  const acc_t sc = static_cast<acc_t>(in.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* qp = in.q.data_ptr<acc_t>();
  const acc_t* kp = in.k.data_ptr<acc_t>();

  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& buf) {
    std::vector<RowState<acc_t>> st(nr, RowState<acc_t>{neg_inf, 0, 0, neg_inf, false});
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = r0 + r;
      // Without in-batch keys the positive is column 0, ahead of the queue (with them, the
      // sweep over k reads it from its tile).
      if (!in.in_batch) {
        pos[i] = sc * dot(qp + i * D, kp + (i + in.offset) * D, D);
        st[r] = in.decoupled ? RowState<acc_t>{neg_inf, 0, 0, pos[i], true}  // top-1 only
                             : RowState<acc_t>{pos[i], 1, pos[i], pos[i], true};
      }
    }
    const auto sweep = [&](const at::Tensor& cols, bool has_pos) {
      const int64_t n = cols.size(0);
      const acc_t* cp = cols.data_ptr<acc_t>();
      for (int64_t c0 = 0; c0 < n; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, n - c0);
        cpu::gemm_tile(qp + r0 * D, nr, cp + c0 * D, nc, D, acc_t(1), buf.data());
        for (int64_t r = 0; r < nr; ++r) {
          acc_t* s = buf.data() + r * nc;
          row_ops::scale_row(s, nc, sc);  // logits scale·q·cᵀ
          const int64_t pc = has_pos ? r0 + r + in.offset - c0 : -1;
          const bool pos_here = pc >= 0 && pc < nc;
          // In-batch keys: the positive logit is the tile's own entry (the rounding of the lse
          // terms, so that lse >= pos and a single column gives a loss of exactly 0).
          if (pos_here) pos[r0 + r] = s[pc];
          update_row(st[r], s, nc, pos_here ? pc : -1, in.decoupled);
        }
      }
    };
    if (in.in_batch) sweep(in.k, true);
    if (in.queue.defined()) sweep(in.queue, false);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = r0 + r;
      const bool any = st[r].l > 0;  // false only decoupled, without a negative
      lse[i] = any ? st[r].m + std::log(st[r].l) : neg_inf;
      ps_sum[i] = any ? st[r].ps / st[r].l : 0;
      top1[i] = st[r].best_is_pos ? 1 : 0;
    }
  });
}

// In place, the tile of queries [i0, i0 + ni) × columns [c0, c0 + nc) (raw products) becomes
// G_ic = a_i P_ic + b_i [c = positive of i] (`has_pos`: the columns are keys; decoupled: no P at
// the positive).
template <typename acc_t>
void query_weights(const CrossInputs& in, acc_t* tile, int64_t i0, int64_t ni, int64_t c0, int64_t nc, bool has_pos,
                   const acc_t* a, const acc_t* b, const acc_t* lse) {
  const acc_t sc = static_cast<acc_t>(in.scale);
  for (int64_t r = 0; r < ni; ++r) {
    const int64_t i = i0 + r;
    acc_t* h = tile + r * nc;
    row_ops::row_exp(h, nc, sc, a[i], lse[i]);  // a_i P_ic
    const int64_t pc = has_pos ? i + in.offset - c0 : -1;  // its positive's column, if in this tile
    if (pc >= 0 && pc < nc) h[pc] = (in.decoupled ? acc_t(0) : h[pc]) + b[i];
  }
}

template <typename acc_t>
void cross_backward_impl(const CrossInputs& in, const acc_t* lse, const acc_t* a, const acc_t* b,
                         at::Tensor& grad_q, at::Tensor* grad_k) {
  const int64_t M = in.q.size(0), D = in.q.size(1), N = in.k.size(0);
  const acc_t sc = static_cast<acc_t>(in.scale);
  const acc_t* qp = in.q.data_ptr<acc_t>();
  const acc_t* kp = in.k.data_ptr<acc_t>();
  const int64_t off = in.offset;

  // Without in-batch keys the positive column is handled row by row: coefficient
  // G_i,pos = a_i P_i,pos + b_i, on k_{i+off} for q_i and on q_i for k_{i+off}.
  std::vector<acc_t> pos_coef;
  if (!in.in_batch) {
    pos_coef.resize(M);
    at::parallel_for(0, M, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t s = sc * dot(qp + i * D, kp + (i + off) * D, D);
        pos_coef[i] = (a[i] != 0 && !in.decoupled ? a[i] * std::exp(s - lse[i]) : acc_t(0)) + b[i];
      }
    });
  }

  // Sweep 1: ∂L/∂q, row blocks of q over tiles of k (in-batch) and of the queue.
  acc_t* gq = grad_q.data_ptr<acc_t>();  // contiguous (M, D)
  for_each_row_block<acc_t>(M, [&](int64_t r0, int64_t nr, std::vector<acc_t>& buf) {
    acc_t* g = gq + r0 * D;  // the block's own rows of ∂L/∂q
    std::fill(g, g + nr * D, acc_t(0));
    const auto sweep = [&](const at::Tensor& cols, bool has_pos) {
      const int64_t n = cols.size(0);
      const acc_t* cp = cols.data_ptr<acc_t>();
      for (int64_t c0 = 0; c0 < n; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, n - c0);
        cpu::gemm_tile(qp + r0 * D, nr, cp + c0 * D, nc, D, acc_t(1), buf.data());
        query_weights(in, buf.data(), r0, nr, c0, nc, has_pos, a, b, lse);
        cpu::gemm_accumulate(buf.data(), nr, nc, cp + c0 * D, D, sc, g);
      }
    };
    if (in.in_batch) sweep(in.k, true);
    if (in.queue.defined()) sweep(in.queue, false);
    if (!in.in_batch) {
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t cf = sc * pos_coef[r0 + r];
        const acc_t* kr = kp + (r0 + r + off) * D;
        for (int64_t d = 0; d < D; ++d) g[r * D + d] += cf * kr[d];
      }
    }
  });

  if (grad_k == nullptr) return;
  // Sweep 2: ∂L/∂k, row blocks of k over tiles of q (the transposed tiles of sweep 1).
  if (!in.in_batch) {
    grad_k->zero_();
    acc_t* g = grad_k->data_ptr<acc_t>();
    at::parallel_for(0, M, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t cf = sc * pos_coef[i];
        for (int64_t d = 0; d < D; ++d) g[(i + off) * D + d] = cf * qp[i * D + d];
      }
    });
    return;
  }
  // Sweep 2: ∂L/∂k, blocks of kColBlock keys over blocks of kRowBlock queries: the tiles are the
  // forward's products q_blk · k_blkᵀ themselves (not k_blk · q_blkᵀ, which a BLAS may round
  // differently: at a low temperature one ulp of s moves P = exp(s·scale − lse) by e^(ulp·scale)),
  // their rows weighted as in sweep 1 and accumulated transposed.
  acc_t* gk = grad_k->data_ptr<acc_t>();  // contiguous (N, D)
  for_each_row_block<acc_t>(
      N,
      [&](int64_t j0, int64_t nj, std::vector<acc_t>& buf) {
        acc_t* g = gk + j0 * D;
        std::fill(g, g + nj * D, acc_t(0));
        for (int64_t i0 = 0; i0 < M; i0 += kRowBlock) {
          const int64_t ni = std::min(kRowBlock, M - i0);
          cpu::gemm_tile(qp + i0 * D, ni, kp + j0 * D, nj, D, acc_t(1), buf.data());
          query_weights(in, buf.data(), i0, ni, j0, nj, true, a, b, lse);
          cpu::gemm_accumulate_transposed(buf.data(), ni, nj, qp + i0 * D, D, sc, g);
        }
      },
      kColBlock);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& queue, const at::Tensor& scale,
    int64_t pos_offset, bool in_batch, bool decoupled) {
  at::NoGradGuard no_grad;
  const CrossInputs in = prepare_cross(decoupled, q, k, queue, scale, pos_offset, in_batch);
  const int64_t M = q.size(0);
  const auto opts = in.q.options();
  at::Tensor lse = poisoned({M}, opts), pos = poisoned({M}, opts), ps_sum = poisoned({M}, opts),
             top1 = poisoned({M}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "cross_forward_cpu", [&] {
    cross_forward_impl<scalar_t>(in, lse.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(),
                                 ps_sum.data_ptr<scalar_t>(), top1.data_ptr<scalar_t>());
  });
  return {lse, pos, ps_sum, top1};
}

std::tuple<at::Tensor, at::Tensor> cross_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& queue, const at::Tensor& scale,
    int64_t pos_offset, bool in_batch, const at::Tensor& lse, const at::Tensor& grad_lse,
    const at::Tensor& grad_pos, bool need_grad_k, bool decoupled) {
  at::NoGradGuard no_grad;
  const CrossInputs in = prepare_cross(decoupled, q, k, queue, scale, pos_offset, in_batch);
  const int64_t M = q.size(0);
  const auto acc = in.q.scalar_type();
  const cpu::RowInputs rows = cpu::row_inputs(lse, grad_lse, grad_pos, M, acc);
  at::Tensor grad_q = poisoned(in.q.sizes(), in.q.options());
  at::Tensor grad_k = need_grad_k ? poisoned(in.k.sizes(), in.k.options()) : at::zeros_like(in.k);
  AT_DISPATCH_FLOATING_TYPES(acc, "cross_backward_cpu", [&] {
    cross_backward_impl<scalar_t>(in, rows.lse.data_ptr<scalar_t>(), rows.a.data_ptr<scalar_t>(), rows.b.data_ptr<scalar_t>(),
                                  grad_q, need_grad_k ? &grad_k : nullptr);
  });
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastntxent, CPU, m) {
  m.impl("cross_forward", &cross_forward_cpu);
  m.impl("cross_backward", &cross_backward_cpu);
}

}  // namespace fastntxent
