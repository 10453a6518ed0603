// CUDA kernels of the self-similarity family (SPEC §1): NT-Xent, multi-view, SupCon.
//
// Forward: one block of 128 threads per 64 rows; it sweeps 64-column tiles. A tile's raw
// dot products are one small matrix product staged through shared memory — tensor cores
// (WMMA 16×16×16, fp32 accumulators) for fp16/bf16, FFMA for fp32 — then each pair of threads
// owns one row (32 columns each) and updates its online max-subtracted logsumexp, Σ P·s,
// positive sums/counts and top-1 statistic, merging the two halves with warp shuffles.
// Backward: the block recomputes each tile once, turns it into H_kj = G_kj + G_jk (SPEC §1,
// from the row and column logsumexps) and accumulates H·U for its own rows in registers:
// every output row is written by exactly one block — no atomics, deterministic. For fp16
// inputs the H·U product runs in bf16 (H spans a range fp16 would underflow).
// Index arithmetic on rows and offsets is 64-bit.
#include "self_similarity_kernels.h"

#include "launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fastntxent {
namespace cuda_kernels {
namespace {

using namespace nvcuda;

constexpr int kRows = 64;        // rows of a block
constexpr int kCols = 64;        // columns of a tile
constexpr int kThreads = 128;    // thread t owns columns [32·(t&1), 32·(t&1)+32) of row t/2
constexpr int kHalf = kCols / 2;
constexpr int kSLd = kCols + 4;  // fp32 score tile leading dimension
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kRows == kCols, "tile_scores stages rows and columns in one loop");
static_assert(kThreads == 2 * kRows, "two threads per row");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// How tiles are multiplied for an element type.
template <typename T>
struct Traits {  // fp16 / bf16: tensor cores
  using Mix = __nv_bfloat16;               // type of H and U in the backward's H·U product
  static constexpr bool kTensorCores = true;
  static constexpr int kChunk = 64;        // D staged per step of the score product
  static constexpr int kPad = 8;
  static constexpr int kV = 128;           // output columns of the backward per pass
  static constexpr int kMixPad = 8;
};
template <>
struct Traits<float> {  // fp32: FFMA, exact fp32 arithmetic
  using Mix = float;
  static constexpr bool kTensorCores = false;
  static constexpr int kChunk = 32;
  static constexpr int kPad = 4;     // rows of 36 floats: 16-byte aligned for float4 loads
  static constexpr int kV = 64;
  static constexpr int kMixPad = 4;  // U rows of 68 floats: 16-byte aligned
};
static_assert(Traits<float>::kChunk % 4 == 0 && (Traits<float>::kChunk + Traits<float>::kPad) % 4 == 0 &&
                  (Traits<float>::kV + Traits<float>::kMixPad) % 4 == 0 && kSLd % 4 == 0 && kHalf % 4 == 0,
              "fp32 products read shared memory as float4");

// Shared-memory layout (bytes), one static buffer per element type:
//   S      fp32 scores [kRows][kSLd]                       (fp32: H is written in place)
//   region stage A,B [kRows+kCols][kChunk+kPad]  or  U [kCols][kV+kMixPad]
//   H      Mix [kRows][kCols+kMixPad]                      (tensor-core types only)
//   cols   per-column label, a, b, lse of the current tile
template <typename T>
struct Layout {
  using Tr = Traits<T>;
  using Mix = typename Tr::Mix;
  static constexpr int kStageLd = Tr::kChunk + Tr::kPad;
  static constexpr int kULd = Tr::kV + Tr::kMixPad;
  static constexpr int kHLd = Tr::kTensorCores ? kCols + Tr::kMixPad : kSLd;
  static constexpr size_t kSBytes = sizeof(float) * kRows * kSLd;
  static constexpr size_t kStageBytes = sizeof(T) * (kRows + kCols) * kStageLd;
  static constexpr size_t kUBytes = sizeof(Mix) * kCols * kULd;
  static constexpr size_t kRegionBytes = kStageBytes > kUBytes ? kStageBytes : kUBytes;
  static constexpr size_t kHBytes = Tr::kTensorCores ? sizeof(Mix) * kRows * kHLd : 0;
  static constexpr size_t kColBytes = kCols * (sizeof(int64_t) + 3 * sizeof(float));
  static constexpr size_t kBytes = kSBytes + kRegionBytes + kHBytes + kColBytes;
  static_assert(kSBytes % 32 == 0 && kRegionBytes % 32 == 0 && kHBytes % 32 == 0, "WMMA alignment");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

struct Smem {
  float* S;
  void* region;
  void* H;
  int64_t* col_label;
  float* col_a;
  float* col_b;
  float* col_lse;
};

template <typename T>
__device__ __forceinline__ Smem carve(unsigned char* base) {
  using L = Layout<T>;
  Smem s;
  s.S = reinterpret_cast<float*>(base);
  s.region = base + L::kSBytes;
  s.H = Traits<T>::kTensorCores ? static_cast<void*>(base + L::kSBytes + L::kRegionBytes)
                                : static_cast<void*>(s.S);
  unsigned char* cols = base + L::kSBytes + L::kRegionBytes + L::kHBytes;
  s.col_label = reinterpret_cast<int64_t*>(cols);
  s.col_a = reinterpret_cast<float*>(cols + kCols * sizeof(int64_t));
  s.col_b = s.col_a + kCols;
  s.col_lse = s.col_b + kCols;
  return s;
}

// Tile-local bounds in int32, once per tile: the tile starting at column c0 holds columns
// c < tile_cols(M, c0), and row i's own column is c = tile_diag(i, c0) (-1: not in this tile).
__device__ __forceinline__ int tile_cols(int64_t M, int64_t c0) {
  return M - c0 < kCols ? static_cast<int>(M - c0) : kCols;
}
__device__ __forceinline__ int tile_diag(int64_t i, int64_t c0) {
  return (i >= c0 && i - c0 < kCols) ? static_cast<int>(i - c0) : -1;
}

// Shared-memory reads of 4 consecutive floats / 2 consecutive int64 (16-byte aligned).
__device__ __forceinline__ float4 lds4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ longlong2 lds2(const int64_t* p) { return *reinterpret_cast<const longlong2*>(p); }

__device__ __forceinline__ int64_t label_of(const int64_t* labels, int64_t period, int64_t j) {
  return labels != nullptr ? labels[j] : j % period;
}

// Elements of T in one 16-byte load.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));


// Stages dims [d0, d0 + kChunk) of rows r0.. into A and of rows c0.. into B, zero outside
// the matrix: 16-byte loads and stores with kVecRows (see rows_vectorizable), else one element
// at a time. Ends with __syncthreads().
template <typename T, bool kVecRows>
__device__ __forceinline__ void stage_chunk(const T* __restrict__ u, int64_t M, int64_t D, int64_t ld,
                                            int64_t r0, int64_t c0, int64_t d0, T* A, T* B) {
  constexpr int kChunk = Traits<T>::kChunk;
  constexpr int kLd = Layout<T>::kStageLd;
  constexpr int kV = kVec<T>;
  static_assert(kChunk % kV == 0 && (kLd * sizeof(T)) % 16 == 0, "16-byte staging of whole vectors");
  if constexpr (kVecRows) {
    // A fixed count of vectors per thread (the block has kThreads threads): no remainder code.
    constexpr int kIters = kRows * (kChunk / kV) / kThreads;
    static_assert(kIters * kThreads == kRows * (kChunk / kV), "whole vectors per thread");
    const uint4 zero4 = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
      const int e = threadIdx.x + k * kThreads;
      const int r = e / (kChunk / kV), d = (e % (kChunk / kV)) * kV;
      const int64_t gd = d0 + d, gi = r0 + r, gj = c0 + r;
      *reinterpret_cast<uint4*>(A + r * kLd + d) =
          (gi < M && gd < D) ? *reinterpret_cast<const uint4*>(u + gi * ld + gd) : zero4;
      *reinterpret_cast<uint4*>(B + r * kLd + d) =
          (gj < M && gd < D) ? *reinterpret_cast<const uint4*>(u + gj * ld + gd) : zero4;
    }
  } else {
    const T zero = from_float<T>(0.f);
    for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, d = e % kChunk;
      const int64_t gd = d0 + d, gi = r0 + r, gj = c0 + r;
      A[r * kLd + d] = (gi < M && gd < D) ? u[gi * ld + gd] : zero;
      B[r * kLd + d] = (gj < M && gd < D) ? u[gj * ld + gd] : zero;
    }
  }
  __syncthreads();
}

// S[r][c] = u_{r0+r} · u_{c0+c} (zero outside the matrix). Ends with __syncthreads().
template <typename T, bool kVecRows>
__device__ void tile_scores(const T* __restrict__ u, int64_t M, int64_t D, int64_t ld, int64_t r0,
                            int64_t c0, const Smem& sm) {
  using Tr = Traits<T>;
  constexpr int kLd = Layout<T>::kStageLd;
  T* A = static_cast<T*>(sm.region);
  T* B = A + kRows * kLd;
  const int tid = threadIdx.x;

  if constexpr (Tr::kTensorCores) {
    const int warp = tid / 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kCols / 16];
#pragma unroll
    for (int n = 0; n < kCols / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
    for (int64_t d0 = 0; d0 < D; d0 += Tr::kChunk) {
      stage_chunk<T, kVecRows>(u, M, D, ld, r0, c0, d0, A, B);
#pragma unroll
      for (int kk = 0; kk < Tr::kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, A + warp * 16 * kLd + kk, kLd);
#pragma unroll
        for (int n = 0; n < kCols / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, B + n * 16 * kLd + kk, kLd);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int n = 0; n < kCols / 16; ++n)
      wmma::store_matrix_sync(sm.S + warp * 16 * kSLd + n * 16, acc[n], kSLd, wmma::mem_row_major);
  } else {
    static_assert(std::is_same_v<T, float>, "the FFMA product is the fp32 path");
    // Four dims per shared-memory load (float4): one LDS.128 of A and one of B per 4 FFMAs, the
    // sums still taken in d order (bit-identical to one dim at a time).
    const int r = tid >> 1, h = tid & 1;
    float acc[kHalf];
#pragma unroll
    for (int cc = 0; cc < kHalf; ++cc) acc[cc] = 0.f;
    for (int64_t d0 = 0; d0 < D; d0 += Tr::kChunk) {
      stage_chunk<T, kVecRows>(u, M, D, ld, r0, c0, d0, A, B);
#pragma unroll 2
      for (int d = 0; d < Tr::kChunk; d += 4) {
        const float4 a = *reinterpret_cast<const float4*>(A + r * kLd + d);
#pragma unroll
        for (int cc = 0; cc < kHalf; ++cc) {
          const float4 b = *reinterpret_cast<const float4*>(B + (h * kHalf + cc) * kLd + d);
          acc[cc] = fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, fmaf(a.x, b.x, acc[cc]))));
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int cc = 0; cc < kHalf; ++cc) sm.S[r * kSLd + h * kHalf + cc] = acc[cc];
  }
  __syncthreads();
}

// At least 3 blocks per SM (A100's shared memory holds 3 of the 16-bit kernels' 45 KiB): a cap
// of 170 registers, within which ptxas (sm_90) no longer picks 96 registers and spills.
template <typename T, bool kVecRows, bool kDecoupled>
__global__ void __launch_bounds__(kThreads, 3)
    forward_kernel(const T* __restrict__ u, int64_t M, int64_t D, int64_t ld,
                   const float* __restrict__ temperature, const int64_t* __restrict__ labels,
                   int64_t period, float* __restrict__ lse, float* __restrict__ pos_sum,
                   float* __restrict__ pos_count, float* __restrict__ ps_sum, float* __restrict__ top1) {
  __shared__ __align__(128) unsigned char smem[Layout<T>::kBytes];
  const Smem sm = carve<T>(smem);
  const int tid = threadIdx.x, r = tid >> 1, h = tid & 1;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t i = r0 + r;
  const bool row_ok = i < M;
  const float inv_tau = 1.f / *temperature;
  const int64_t li = row_ok ? label_of(labels, period, i) : -1;
  const float neg_inf = -INFINITY;

  float m = neg_inf, l = 0.f, ps = 0.f, psum = 0.f, cnt = 0.f, best = neg_inf;
  bool best_pos = false;
  for (int64_t c0 = 0; c0 < M; c0 += kCols) {
    if (tid < kCols) {
      const int64_t j = c0 + tid;
      sm.col_label[tid] = j < M ? label_of(labels, period, j) : -1;
    }
    tile_scores<T, kVecRows>(u, M, D, ld, r0, c0, sm);

    float s[kHalf];
    float tmax = neg_inf;
    int targ = -1;
    const int n_cols = row_ok ? tile_cols(M, c0) : 0, diag = tile_diag(i, c0);
    const float* srow = sm.S + r * kSLd + h * kHalf;  // this thread's 32 scores: 8 LDS.128
#pragma unroll
    for (int cc = 0; cc < kHalf; cc += 4) {
      const float4 q = lds4(srow + cc);
      const float raw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int c = h * kHalf + cc + k;
        s[cc + k] = (c < n_cols && c != diag) ? raw[k] * inv_tau : neg_inf;
        if (s[cc + k] > tmax) { tmax = s[cc + k]; targ = c; }
      }
    }
    // Merge with the other half of the row (lane ^ 1); the lower column wins ties.
    const float other_max = __shfl_xor_sync(kFullMask, tmax, 1);
    const int other_arg = __shfl_xor_sync(kFullMask, targ, 1);
    if (other_max > tmax || (other_max == tmax && other_arg >= 0 && (targ < 0 || other_arg < targ))) {
      tmax = other_max;
      targ = other_arg;
    }
    // The largest logit the logsumexp takes: decoupled, that of the negatives only (so that a
    // dominant positive cannot underflow their exps). kDecoupled is a template argument: the
    // coupled kernels' machine code holds none of this.
    float lmax = tmax;
    if constexpr (kDecoupled) {
      lmax = neg_inf;
#pragma unroll
      for (int cc = 0; cc < kHalf; cc += 2) {
        const longlong2 lab = lds2(sm.col_label + h * kHalf + cc);
        if (lab.x != li) lmax = fmaxf(lmax, s[cc]);
        if (lab.y != li) lmax = fmaxf(lmax, s[cc + 1]);
      }
      lmax = fmaxf(lmax, __shfl_xor_sync(kFullMask, lmax, 1));
    }
    const float new_m = fmaxf(m, lmax);
    const float shift = new_m == neg_inf ? 0.f : new_m;
    float tl = 0.f, tps = 0.f, tpos = 0.f, tcnt = 0.f;
#pragma unroll
    for (int cc = 0; cc < kHalf; cc += 2) {
      const longlong2 lab = lds2(sm.col_label + h * kHalf + cc);  // two labels per LDS.128
      const bool pos[2] = {lab.x == li, lab.y == li};
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (s[cc + k] != neg_inf) {
          if (!(kDecoupled && pos[k])) {
            const float e = __expf(s[cc + k] - shift);
            tl += e;
            tps += e * s[cc + k];
          }
          if (pos[k]) { tpos += s[cc + k]; tcnt += 1.f; }
        }
      }
    }
    tl += __shfl_xor_sync(kFullMask, tl, 1);
    tps += __shfl_xor_sync(kFullMask, tps, 1);
    tpos += __shfl_xor_sync(kFullMask, tpos, 1);
    tcnt += __shfl_xor_sync(kFullMask, tcnt, 1);
    if (targ >= 0 && tmax > best) {
      best = tmax;
      best_pos = sm.col_label[targ] == li;
    }
    if (lmax > neg_inf) {  // (not decoupled: the same as targ >= 0)
      const float scale = m == neg_inf ? 0.f : __expf(m - new_m);
      l = l * scale + tl;
      ps = ps * scale + tps;
      m = new_m;
    }
    psum += tpos;
    cnt += tcnt;
#ifndef FASTNTXENT_EMULATION_DROP_BARRIER  // test switch (tests/test_cuda_emulation.py): ThreadSanitizer must see the race
    __syncthreads();  // the next tile overwrites S and the column labels
#endif
  }
  if (row_ok && h == 0) {
    lse[i] = l > 0.f ? m + logf(l) : neg_inf;
    ps_sum[i] = l > 0.f ? ps / l : 0.f;
    pos_sum[i] = psum;
    pos_count[i] = cnt;
    top1[i] = best_pos ? 1.f : 0.f;
  }
}

template <typename T, bool kVecRows, bool kDecoupled>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ u, int64_t M, int64_t D, int64_t ld,
                    const float* __restrict__ temperature, const int64_t* __restrict__ labels,
                    int64_t period, const float* __restrict__ lse,
                    const float* __restrict__ grad_lse, const float* __restrict__ grad_pos,
                    float* __restrict__ grad) {
  using Tr = Traits<T>;
  using L = Layout<T>;
  using Mix = typename Tr::Mix;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  const Smem sm = carve<T>(smem);
  Mix* H = static_cast<Mix*>(sm.H);
  Mix* U = static_cast<Mix*>(sm.region);
  const int tid = threadIdx.x, r = tid >> 1, h = tid & 1;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t k = r0 + r;
  const bool row_ok = k < M;
  const float inv_tau = 1.f / *temperature;
  const float ak = row_ok ? grad_lse[k] : 0.f, bk = row_ok ? grad_pos[k] : 0.f;
  const float lk = row_ok ? lse[k] : 0.f;
  const int64_t labk = row_ok ? label_of(labels, period, k) : -1;
  const Mix mix_zero = from_float<Mix>(0.f);

  for (int64_t v0 = 0; v0 < D; v0 += Tr::kV) {
    // Accumulators of grad[r0:r0+64, v0:v0+kV].
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> facc[Tr::kTensorCores ? Tr::kV / 16 : 1];
    float racc[Tr::kTensorCores ? 1 : kHalf];
    if constexpr (Tr::kTensorCores) {
#pragma unroll
      for (int n = 0; n < Tr::kV / 16; ++n) wmma::fill_fragment(facc[n], 0.f);
    } else {
#pragma unroll
      for (int vv = 0; vv < kHalf; ++vv) racc[vv] = 0.f;
    }
    for (int64_t c0 = 0; c0 < M; c0 += kCols) {
      if (tid < kCols) {
        const int64_t j = c0 + tid;
        const bool ok = j < M;
        sm.col_label[tid] = ok ? label_of(labels, period, j) : -1;
        sm.col_a[tid] = ok ? grad_lse[j] : 0.f;
        sm.col_b[tid] = ok ? grad_pos[j] : 0.f;
        sm.col_lse[tid] = ok ? lse[j] : 0.f;
      }
      tile_scores<T, kVecRows>(u, M, D, ld, r0, c0, sm);
      // H_kj = a_k P_kj + a_j P_jk + (b_k + b_j)[j ∈ P(k)]; a term is skipped when its a is 0,
      // so that an lse of -inf (a row without columns) never meets exp.
      const int n_cols = row_ok ? tile_cols(M, c0) : 0, diag = tile_diag(k, c0);
      // Four columns per step: the scores and column data as LDS.128 (labels two per load).
#pragma unroll
      for (int c4 = h * kHalf; c4 < h * kHalf + kHalf; c4 += 4) {
        const float4 sq = lds4(sm.S + r * kSLd + c4), aq = lds4(sm.col_a + c4), bq = lds4(sm.col_b + c4);
#ifndef FASTNTXENT_EMULATION_READ_PAST_END  // test switch (tests/test_cuda_emulation.py): AddressSanitizer must see it
        const float4 lq = lds4(sm.col_lse + c4);
        const float lse_c[4] = {lq.x, lq.y, lq.z, lq.w};
#else
        float lse_c[4];  // col_lse[c + 1]: for c = 63 one past the end of smem
        for (int q = 0; q < 4; ++q) lse_c[q] = sm.col_lse[c4 + q + 1];
#endif
        const longlong2 l01 = lds2(sm.col_label + c4), l23 = lds2(sm.col_label + c4 + 2);
        const float sv[4] = {sq.x, sq.y, sq.z, sq.w}, a_c[4] = {aq.x, aq.y, aq.z, aq.w};
        const float b_c[4] = {bq.x, bq.y, bq.z, bq.w};
        const bool same[4] = {l01.x == labk, l01.y == labk, l23.x == labk, l23.y == labk};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int c = c4 + q;
          float v = 0.f;
          if (c < n_cols && c != diag) {
            const float s = sv[q] * inv_tau;
            if (!(kDecoupled && same[q])) {  // decoupled: no softmax weight at a positive
              if (ak != 0.f) v += ak * __expf(s - lk);
              if (a_c[q] != 0.f) v += a_c[q] * __expf(s - lse_c[q]);
            }
            if (same[q]) v += bk + b_c[q];
          }
          H[r * L::kHLd + c] = from_float<Mix>(v);  // fp32: in place of S, same thread, same element
        }
      }
      // Stage the tile's columns, dims [v0, v0 + kV), into the region the scores no longer use.
      // 16 bytes at a time when the rows allow it and U holds u's own type (bf16, fp32; fp16
      // rows become bf16 here, element by element).
      if constexpr (std::is_same_v<T, Mix> && kVecRows) {
        constexpr int kV = kVec<T>;
        constexpr int kIters = kCols * (Tr::kV / kV) / kThreads;
        static_assert(Tr::kV % kV == 0 && (L::kULd * sizeof(Mix)) % 16 == 0 && kIters * kThreads == kCols * (Tr::kV / kV),
                      "16-byte staging of U, whole vectors per thread");
        const uint4 zero4 = {0u, 0u, 0u, 0u};
#pragma unroll 2  // fully unrolled, ptxas (sm_80) spills the backward's 64 accumulators
        for (int k = 0; k < kIters; ++k) {
          const int e = tid + k * kThreads;
          const int c = e / (Tr::kV / kV), vv = (e % (Tr::kV / kV)) * kV;
          const int64_t gj = c0 + c, gd = v0 + vv;
          *reinterpret_cast<uint4*>(U + c * L::kULd + vv) =
              (gj < M && gd < D) ? *reinterpret_cast<const uint4*>(u + gj * ld + gd) : zero4;
        }
      } else {
        for (int e = tid; e < kCols * Tr::kV; e += kThreads) {
          const int c = e / Tr::kV, vv = e % Tr::kV;
          const int64_t gj = c0 + c, gd = v0 + vv;
          U[c * L::kULd + vv] = (gj < M && gd < D) ? from_float<Mix>(to_float(u[gj * ld + gd])) : mix_zero;
        }
      }
      __syncthreads();
      if constexpr (Tr::kTensorCores) {
        const int warp = tid / 32;
#pragma unroll
        for (int kk = 0; kk < kCols; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, Mix, wmma::row_major> a;
          wmma::load_matrix_sync(a, H + warp * 16 * L::kHLd + kk, L::kHLd);
#pragma unroll
          for (int n = 0; n < Tr::kV / 16; ++n) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, Mix, wmma::row_major> b;
            wmma::load_matrix_sync(b, U + kk * L::kULd + n * 16, L::kULd);
            wmma::mma_sync(facc[n], a, b, facc[n]);
          }
        }
      } else {
        // float4 loads of H (4 columns) and U (4 output dims): one LDS.128 per 4 FFMAs, the
        // sums still taken in c order.
        for (int c = 0; c < kCols; c += 4) {
          const float4 h4 = *reinterpret_cast<const float4*>(H + r * L::kHLd + c);
          const float hv[4] = {h4.x, h4.y, h4.z, h4.w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const Mix* urow = U + (c + q) * L::kULd + h * kHalf;
#pragma unroll
            for (int vv = 0; vv < kHalf; vv += 4) {
              const float4 u4 = *reinterpret_cast<const float4*>(urow + vv);
              racc[vv] = fmaf(hv[q], u4.x, racc[vv]);
              racc[vv + 1] = fmaf(hv[q], u4.y, racc[vv + 1]);
              racc[vv + 2] = fmaf(hv[q], u4.z, racc[vv + 2]);
              racc[vv + 3] = fmaf(hv[q], u4.w, racc[vv + 3]);
            }
          }
        }
      }
      __syncthreads();  // the next tile overwrites S, H, U and the column data
    }
    // Write this block's rows of grad[:, v0:v0+kV], scaled by 1/τ.
    if constexpr (Tr::kTensorCores) {
      const int warp = tid / 32, lane = tid % 32;
      float* stage = sm.S + warp * 16 * kSLd;  // the warp's own 16 rows of the score tile
#pragma unroll
      for (int n = 0; n < Tr::kV / 16; ++n) {
        wmma::store_matrix_sync(stage, facc[n], kSLd, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int rr = e / 16, cc = e % 16;
          const int64_t gk = r0 + warp * 16 + rr, gd = v0 + n * 16 + cc;
          if (gk < M && gd < D) grad[gk * D + gd] = stage[rr * kSLd + cc] * inv_tau;
        }
        __syncwarp();
      }
      __syncthreads();
    } else {
#pragma unroll
      for (int vv = 0; vv < kHalf; ++vv) {
        const int64_t gd = v0 + h * kHalf + vv;
        if (row_ok && gd < D) grad[k * D + gd] = racc[vv] * inv_tau;
      }
    }
  }
}

inline unsigned row_blocks(int64_t M) { return static_cast<unsigned>((M + kRows - 1) / kRows); }

// Whether rows can be read 16 bytes at a time: the base 16-byte aligned and the row stride and
// D multiples of kVec<T> (then a vector starting inside D lies wholly inside it). Decided once
// per launch: each case is its own kernel, with its own registers.
template <typename T>
bool rows_vectorizable(const SelfProblem& p) {
  return reinterpret_cast<uintptr_t>(p.u) % 16 == 0 && p.row_stride % kVec<T> == 0 && p.D % kVec<T> == 0;
}

template <typename T>
cudaError_t launch_forward(const SelfProblem& p, float* lse, float* pos_sum, float* pos_count,
                           float* ps_sum, float* top1, cudaStream_t stream) {
  const bool vec = rows_vectorizable<T>(p);
  auto* kernel = p.decoupled ? (vec ? forward_kernel<T, true, true> : forward_kernel<T, false, true>)
                             : (vec ? forward_kernel<T, true, false> : forward_kernel<T, false, false>);
  FASTNTXENT_LAUNCH(kernel, row_blocks(p.M), kThreads, stream,
                    static_cast<const T*>(p.u), p.M, p.D, p.row_stride, p.temperature, p.labels, p.period, lse,
                    pos_sum, pos_count, ps_sum, top1);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const SelfProblem& p, const float* lse, const float* grad_lse,
                            const float* grad_pos, float* grad_u, cudaStream_t stream) {
  const bool vec = rows_vectorizable<T>(p);
  auto* kernel = p.decoupled ? (vec ? backward_kernel<T, true, true> : backward_kernel<T, false, true>)
                             : (vec ? backward_kernel<T, true, false> : backward_kernel<T, false, false>);
  FASTNTXENT_LAUNCH(kernel, row_blocks(p.M), kThreads, stream,
                    static_cast<const T*>(p.u), p.M, p.D, p.row_stride, p.temperature, p.labels, p.period, lse,
                    grad_lse, grad_pos, grad_u);
  return cudaGetLastError();
}

}  // namespace

cudaError_t self_forward(const SelfProblem& p, float* lse, float* pos_sum, float* pos_count,
                         float* ps_sum, float* top1, cudaStream_t stream) {
  if (p.M < 1 || p.D < 1 || p.period < 1) return cudaErrorInvalidValue;
  switch (p.type) {
    case ElementType::kFloat32: return launch_forward<float>(p, lse, pos_sum, pos_count, ps_sum, top1, stream);
    case ElementType::kFloat16: return launch_forward<__half>(p, lse, pos_sum, pos_count, ps_sum, top1, stream);
    case ElementType::kBFloat16:
      return launch_forward<__nv_bfloat16>(p, lse, pos_sum, pos_count, ps_sum, top1, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t self_backward(const SelfProblem& p, const float* lse, const float* grad_lse,
                          const float* grad_pos, float* grad_u, cudaStream_t stream) {
  if (p.M < 1 || p.D < 1 || p.period < 1) return cudaErrorInvalidValue;
  switch (p.type) {
    case ElementType::kFloat32: return launch_backward<float>(p, lse, grad_lse, grad_pos, grad_u, stream);
    case ElementType::kFloat16: return launch_backward<__half>(p, lse, grad_lse, grad_pos, grad_u, stream);
    case ElementType::kBFloat16:
      return launch_backward<__nv_bfloat16>(p, lse, grad_lse, grad_pos, grad_u, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_kernels
}  // namespace fastntxent
