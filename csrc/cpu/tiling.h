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
