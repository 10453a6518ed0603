// Blocking shared by the fused CPU kernels: row blocks run in parallel (at::parallel_for),
// each with a thread-local (row block × column block) tile filled by one BLAS product.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <limits>
#include <vector>

// The Fortran BLAS that libtorch links (MKL on x86-64 wheels), declared weak: where the
// running torch exports none, the pointers are null and the products go through ATen.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastntxent {
namespace cpu {

// 128 × 256 fp32 tiles (128 KiB) stay in a core's L2; 128 rows halve the column panel
// packing per flop of 64 (benchmarks/NOTES.md, issue 22).
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 256;

// The self family's square sub-blocks: every similarity is computed by the BLAS product of
// the two kRowBlock-row blocks holding its row and its column (symmetric_tile).
static_assert(kColBlock % kRowBlock == 0, "column blocks must be whole row blocks");

// Calls f(r0, nr, buf) for every block [r0, r0 + nr) of `rows` rows (`block` rows each),
// blocks in parallel; `buf` is a kRowBlock × kColBlock scratch tile owned by the calling thread.
template <typename acc_t, typename F>
void for_each_row_block(int64_t rows, F&& f, int64_t block = kRowBlock) {
  const int64_t blocks = (rows + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(kRowBlock * kColBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block;
      f(r0, std::min(block, rows - r0), buf);
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

namespace detail {
// One column-major BLAS call C = alpha·op(A)·op(B) + beta·C; false when no BLAS is linked
// for T or a size exceeds the 32-bit BLAS interface (the caller then uses ATen).
template <typename T>
inline bool blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t v : {m, n, k, lda, ldb, ldc}) {
    if (v > INT_MAX) return false;
  }
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same<T, float>::value) {
    if (sgemm_ == nullptr) return false;
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return true;
  } else if constexpr (std::is_same<T, double>::value) {
    if (dgemm_ == nullptr) return false;
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return true;
  }
  return false;
}

template <typename T>
inline at::Tensor wrap(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}
}  // namespace detail

// tile (nr × nc, row-major) = alpha · rows · colsᵀ; rows (nr, D) and cols (nc, D) row-major.
// One BLAS call, no ATen dispatch (the per-tile dispatch cost dominated small M).
template <typename T>
inline void gemm_tile(const T* rows, int64_t nr, const T* cols, int64_t nc, int64_t D, T alpha, T* tile) {
  if (detail::blas_gemm<T>('T', 'N', nc, nr, D, alpha, cols, D, rows, D, T(0), tile, nc)) return;
  at::Tensor out = detail::wrap(tile, nr, nc);
  at::mm_out(out, detail::wrap(rows, nr, D), detail::wrap(cols, nc, D).t());
  if (alpha != T(1)) out.mul_(alpha);
}

// acc (nr × D, row-major) += alpha · h · cols; h (nr × nc) and cols (nc × D) row-major.
template <typename T>
inline void gemm_accumulate(const T* h, int64_t nr, int64_t nc, const T* cols, int64_t D, T alpha, T* acc) {
  if (detail::blas_gemm<T>('N', 'N', D, nr, nc, alpha, cols, D, h, nc, T(1), acc, D)) return;
  detail::wrap(acc, nr, D).addmm_(detail::wrap(h, nr, nc), detail::wrap(cols, nc, D), /*beta=*/1, /*alpha=*/alpha);
}

// acc (nc × D, row-major) += alpha · hᵀ · rows; h (nr × nc) and rows (nr × D) row-major: the
// column side of a tile whose rows were `rows` (no transposed copy of the tile).
template <typename T>
inline void gemm_accumulate_transposed(const T* h, int64_t nr, int64_t nc, const T* rows, int64_t D, T alpha, T* acc) {
  if (detail::blas_gemm<T>('N', 'T', D, nc, nr, alpha, rows, D, h, nc, T(1), acc, D)) return;
  detail::wrap(acc, nc, D).addmm_(detail::wrap(h, nr, nc).t(), detail::wrap(rows, nr, D), /*beta=*/1, /*alpha=*/alpha);
}

// tile (nr × nc, row-major) = u[r0, r0 + nr) · u[c0, c0 + nc)ᵀ for one matrix u (M, D), r0 and
// c0 multiples of kRowBlock, nr ≤ kRowBlock, each run of kRowBlock columns whole (or the last).
// A BLAS product is not symmetric bit for bit (a small-matrix path rounds (A·Bᵀ)_ij and
// (B·Aᵀ)_ji differently), but the backward reads s_jk of the forward as s_kj of its own tile,
// and at a low temperature one ulp of s moves exp(s/τ − lse) by e^(ulp/τ). So every entry is
// taken from the one product of the two row blocks holding i and j, lower block first (the
// diagonal block's upper triangle): s_ij == s_ji bit for bit, the same in every pass.
// `scratch` holds kRowBlock × kRowBlock values.
template <typename T>
inline void symmetric_tile(const T* u, int64_t M, int64_t D, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* tile,
                           T* scratch) {
  for (int64_t j0 = c0; j0 < c0 + nc; j0 += kRowBlock) {
    const int64_t nj = std::min(kRowBlock, M - j0);
    T* out = tile + (j0 - c0);  // row stride nc
    if (r0 < j0) {
      gemm_tile(u + r0 * D, nr, u + j0 * D, nj, D, T(1), scratch);
      for (int64_t r = 0; r < nr; ++r) std::copy(scratch + r * nj, scratch + (r + 1) * nj, out + r * nc);
    } else if (r0 > j0) {
      gemm_tile(u + j0 * D, nj, u + r0 * D, nr, D, T(1), scratch);
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t c = 0; c < nj; ++c) out[r * nc + c] = scratch[c * nr + r];
      }
    } else {
      gemm_tile(u + r0 * D, nr, u + r0 * D, nr, D, T(1), scratch);
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t c = 0; c < nj; ++c) out[r * nc + c] = r <= c ? scratch[r * nr + c] : scratch[c * nr + r];
      }
    }
  }
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
