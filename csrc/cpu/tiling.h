// Blocking shared by the fused CPU kernels: row blocks run in parallel (at::parallel_for),
// each with a thread-local (row block × column block) tile filled by one BLAS product.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace fastntxent {
namespace cpu {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 256;

// Calls f(r0, nr, buf) for every block [r0, r0 + nr) of `rows` rows, blocks in parallel;
// `buf` is a kRowBlock × kColBlock scratch tile owned by the calling thread.
template <typename acc_t, typename F>
void for_each_row_block(int64_t rows, F&& f) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(kRowBlock * kColBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock;
      f(r0, std::min(kRowBlock, rows - r0), buf);
    }
  });
}

// tile = rows · colsᵀ, (nr, nc) contiguous in `buf`; rows (nr, D), cols (nc, D).
template <typename acc_t>
at::Tensor tile_product(std::vector<acc_t>& buf, const at::Tensor& rows, const at::Tensor& cols) {
  at::Tensor tile = at::from_blob(buf.data(), {rows.size(0), cols.size(0)}, rows.options());
  at::mm_out(tile, rows, cols.t());
  return tile;
}

// Outputs start as NaN: a row a kernel failed to write can never look plausible.
inline at::Tensor poisoned(at::IntArrayRef shape, const at::TensorOptions& options) {
  return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
}

// A backward operator's row inputs (lse, grad_lse, grad_pos): each (M,), as contiguous
// tensors of the accumulation dtype.
struct RowInputs {
  at::Tensor lse, a, b;
};

inline RowInputs row_inputs(const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_pos,
                            int64_t M, at::ScalarType acc) {
  for (const at::Tensor* t : {&lse, &grad_lse, &grad_pos}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == M, "fastntxent: row statistics must have shape (M,)");
  }
  return {lse.to(acc).contiguous(), grad_lse.to(acc).contiguous(), grad_pos.to(acc).contiguous()};
}

}  // namespace cpu
}  // namespace fastntxent
