// Small kernels for tests/test_cuda_emulation.py that check the host emulation of CUDA itself
// (csrc/emulation/cuda_host_emulation.h): what it must compute, and each rule it must enforce.
//   emulation_rules SCENARIO
// Positive scenarios print their results and exit 0; a scenario that breaks a rule must end
// in the emulator's abort with its message (or, for store_then_read nosync, a ThreadSanitizer
// report in the TSan build).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../csrc/cuda/launch.h"

using namespace nvcuda;

namespace {

// Shared memory is one array per block, poisoned when each block starts; shuffles exchange.
// 2 blocks of 64 threads; out[3b + 0]: a never-written element, [3b + 1]: written by thread 63,
// [3b + 2]: lane 0's value of lane 3.
__global__ void shared_and_shuffle(float* out) {
  __shared__ float s[64];
  const unsigned t = threadIdx.x;
  if (t == 0) out[blockIdx.x * 3 + 0] = s[5];
  __syncthreads();
  s[t] = static_cast<float>(blockIdx.x * 100 + t);
  __syncthreads();
  if (t == 0) out[blockIdx.x * 3 + 1] = s[63];
  const float v = __shfl_xor_sync(0xffffffffu, static_cast<float>(t), 3);
  if (t == 0) out[blockIdx.x * 3 + 2] = v;
}

// D = A·B for 16×16 tiles in global memory, every fragment layout; one warp.
template <typename LA, typename LB>
__global__ void product(const __half* a, const __half* b, float* d, bool store_col_major) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::fill_fragment(fc, 0.f);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, store_col_major ? wmma::mem_col_major : wmma::mem_row_major);
}

template <typename LA, typename LB>
int check_product(bool store_col_major, const char* name) {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  alignas(32) static __half a[256], b[256];  // WMMA pointers: 32-byte aligned
  alignas(32) static float d[256];
  std::vector<float> af(256), bf(256);
  for (float& x : d) x = NAN;
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2half(nd(gen));
    b[i] = __float2half(nd(gen));
    af[i] = __half2float(a[i]);
    bf[i] = __half2float(b[i]);
  }
  const bool a_row = std::is_same_v<LA, wmma::row_major>, b_row = std::is_same_v<LB, wmma::row_major>;
  auto* kernel = &product<LA, LB>;  // one macro argument
  FASTNTXENT_LAUNCH(kernel, 1, 32, nullptr, a, b, d, store_col_major);
  double worst = 0;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      double ref = 0, mag = 0;
      for (int k = 0; k < 16; ++k) {
        const double x = af[a_row ? i * 16 + k : k * 16 + i], y = bf[b_row ? k * 16 + j : j * 16 + k];
        ref += x * y;
        mag += std::fabs(x * y);
      }
      const double got = d[store_col_major ? j * 16 + i : i * 16 + j];
      const double err = std::isnan(got) ? INFINITY : std::fabs(got - ref) / (mag + 1e-30);
      if (err > worst) worst = err;
    }
  }
  std::printf("product %s: max error %.3e (relative to sum |a_ik b_kj|)\n", name, worst);
  return worst <= 1e-6 ? 0 : 1;
}

// --- rule breakers: one warp (or two) each --------------------------------------------
__global__ void bad_ldm() {
  __shared__ __align__(128) __half s[16 * 24];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, s, 20);  // 20 is not a multiple of 8
}

__global__ void bad_alignment() {
  __shared__ __align__(128) __half s[16 * 24 + 8];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, s + 8, 24);  // 16 bytes past a 128-byte boundary
}

__global__ void tile_past_shared() {
  __shared__ __align__(128) __half s[16 * 16];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, s, 24);  // 16 rows of stride 24 need 376 elements
}

__global__ void lane_skips_mma() {
  __shared__ __align__(128) __half s[16 * 16];
  for (int e = threadIdx.x; e < 256; e += 32) s[e] = __float2half(1.f);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, s, 16);
  wmma::load_matrix_sync(fb, s, 16);
  wmma::fill_fragment(fc, 0.f);
  if (threadIdx.x != 5) wmma::mma_sync(fc, fa, fb, fc);
  __syncwarp();
}

__global__ void lane_returns_before_store(float* out) {
  __shared__ __align__(128) float s[16 * 16];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 1.f);
  if (threadIdx.x == 7) return;
  wmma::store_matrix_sync(s, fc, 16, wmma::mem_row_major);
  out[threadIdx.x] = 0.f;
}

__global__ void undefined_fragment() {
  __shared__ __align__(128) __half s[16 * 16];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;  // never loaded
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, s, 16);
  wmma::fill_fragment(fc, 0.f);
  wmma::mma_sync(fc, fa, fb, fc);
}

__global__ void shuffle_after_lane_exit(float* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void syncthreads_after_return(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void divergent_warp(float* out) {
  if (threadIdx.x < 16) __syncwarp();
  else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void deadlock() {
  if (threadIdx.x == 0) __syncthreads();
  else __syncwarp();
}

// A store_matrix_sync, then each lane reads an element another lane stored: needs __syncwarp.
__global__ void store_then_read(float* out, bool sync) {
  __shared__ __align__(128) float s[16 * 16];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 2.f);
  wmma::store_matrix_sync(s, fc, 16, wmma::mem_row_major);
  if (sync) __syncwarp();
  const unsigned lane = threadIdx.x;
  out[lane] = s[((lane / 2 + 1) % 16) * 16 + 8 * (lane % 2)];  // row of lane 2(lane/2 + 1)
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  std::vector<float> out(64, -1.f);
  if (what == "shared_and_shuffle") {
    FASTNTXENT_LAUNCH(shared_and_shuffle, 2, 64, nullptr, out.data());
    for (int i = 0; i < 6; ++i) std::printf("%g ", out[i]);
    std::printf("\n");
    return 0;
  }
  if (what == "product") {
    int bad = 0;
    bad += check_product<wmma::row_major, wmma::col_major>(false, "A row, B col, store row");
    bad += check_product<wmma::row_major, wmma::row_major>(false, "A row, B row, store row");
    bad += check_product<wmma::col_major, wmma::col_major>(true, "A col, B col, store col");
    bad += check_product<wmma::col_major, wmma::row_major>(true, "A col, B row, store col");
    return bad;
  }
  if (what == "launch_config") {  // as on the device: an invalid configuration is a launch error
    FASTNTXENT_LAUNCH(deadlock, 0, 32, nullptr);
    const cudaError_t e1 = cudaGetLastError();
    FASTNTXENT_LAUNCH(deadlock, 1, 2048, nullptr);
    const cudaError_t e2 = cudaGetLastError();
    std::printf("%d %d %d\n", static_cast<int>(e1), static_cast<int>(e2), static_cast<int>(cudaGetLastError()));
    return 0;
  }
  if (what == "bad_ldm") FASTNTXENT_LAUNCH(bad_ldm, 1, 32, nullptr);
  else if (what == "bad_alignment") FASTNTXENT_LAUNCH(bad_alignment, 1, 32, nullptr);
  else if (what == "tile_past_shared") FASTNTXENT_LAUNCH(tile_past_shared, 1, 32, nullptr);
  else if (what == "lane_skips_mma") FASTNTXENT_LAUNCH(lane_skips_mma, 1, 32, nullptr);
  else if (what == "lane_returns_before_store") FASTNTXENT_LAUNCH(lane_returns_before_store, 1, 32, nullptr, out.data());
  else if (what == "undefined_fragment") FASTNTXENT_LAUNCH(undefined_fragment, 1, 32, nullptr);
  else if (what == "shuffle_after_lane_exit") FASTNTXENT_LAUNCH(shuffle_after_lane_exit, 1, 32, nullptr, out.data());
  else if (what == "syncthreads_after_return") FASTNTXENT_LAUNCH(syncthreads_after_return, 1, 64, nullptr, out.data());
  else if (what == "divergent_warp") FASTNTXENT_LAUNCH(divergent_warp, 1, 32, nullptr, out.data());
  else if (what == "deadlock") FASTNTXENT_LAUNCH(deadlock, 1, 32, nullptr);
  else if (what == "store_then_read_sync") FASTNTXENT_LAUNCH(store_then_read, 1, 32, nullptr, out.data(), true);
  else if (what == "store_then_read_nosync") FASTNTXENT_LAUNCH(store_then_read, 1, 32, nullptr, out.data(), false);
  else {
    std::fprintf(stderr, "unknown scenario %s\n", what.c_str());
    return 2;
  }
  std::printf("completed %s: out[0] = %g\n", what.c_str(), out[0]);
  return 0;
}
