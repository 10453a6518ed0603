// Host emulation of the CUDA execution model, for running the hand-written kernels
// (csrc/cuda/*.cu, unchanged) with the host C++ compiler on CPU memory, under ThreadSanitizer
// and AddressSanitizer. Header-only; C++20 (<barrier>); GCC/Clang on ELF systems.
//
// It implements exactly what the kernels use, no more:
//   * one OS thread per CUDA thread; the blocks of a grid run one after another, each block's
//     threads concurrently; `threadIdx` / `blockIdx` / `blockDim` / `gridDim` are thread-local;
//   * `__syncthreads()` is a std::barrier over the block's threads; each warp of 32 threads has
//     its own std::barrier for `__syncwarp` and `__shfl_xor_sync` (a value exchange);
//   * `__shared__` variables: see "Shared memory" below;
//   * `__half` / `__nv_bfloat16` with round-to-nearest-even conversions written here;
//   * `__expf` as exp2f(x·log2 e) (the hardware's formula, without ex2.approx's own error),
//     `fmaf` / `fmaxf` / `logf` / INFINITY from <math.h>;
//   * `nvcuda::wmma` 16×16×16 fragments with fp32 accumulation (see "WMMA" below);
//   * cudaError_t / cudaStream_t / cudaGetLastError, and the launch (csrc/cuda/launch.h).
//
// Every rule that the hardware punishes silently is checked and aborts with a message naming
// the kernel, block and thread:
//   * WMMA: ldm a multiple of 8 elements (16-bit types) / 4 (fp32), pointer 32-byte aligned,
//     every lane of the warp executing the same sequence of warp collectives with the same
//     (warp-uniform) pointer, ldm and layout, fragments defined before use, and a tile that
//     starts in a __shared__ array staying inside it;
//   * __shfl_xor_sync / __syncwarp: all 32 lanes take part with the same intrinsic and mask;
//     a lane named in the mask that has exited is an error (as on Volta and later);
//   * __syncthreads: reached by every thread of the block (none has returned meanwhile);
//   * no progress for FASTNTXENT_EMULATION_WATCHDOG seconds (default 120): a deadlock (threads
//     waiting at different barriers); the states of all threads are printed.
//
// Shared memory. The kernels declare `__shared__ __align__(128) unsigned char smem[N];` inside
// the kernel function. A prefix macro cannot turn that declaration into a reference, so here
// `__shared__` is `static`: one object per kernel (per template instantiation), which is
// per-block storage shared by the block's threads because the blocks of a launch run one at a
// time and launches are serialised (a process-wide mutex). Before each block starts, every
// __shared__ array of the kernel is filled with 0xFF bytes (NaN in fp32, fp16 and bf16; -1 in
// integers), so a read of shared memory that no thread wrote shows up as NaN in the results.
// The arrays are found in the ELF symbol table of the object holding the kernel (the local
// statics of the kernel function, `_ZZ<kernel>E<name>`), which also gives their exact sizes:
// the WMMA bound checks use them, and under AddressSanitizer the arrays are globals with
// redzones, so any access past the declared size is reported. The emulated object must keep
// its .symtab (do not strip it).
//
// WMMA. A fragment is a per-lane object like on the hardware, with a layout chosen here: lane l
// owns row l/2 and columns [8·(l%2), 8·(l%2)+8) of the 16×16 accumulator; its matrix_a
// fragment holds row l/2 of A, its matrix_b fragment columns [8·(l%2), +8) of B. So
// load/mma/store are lane-local (each lane reads and writes only its share of the tile in
// memory) and no barrier is implied: as on the hardware, a store_matrix_sync followed by reads
// of other lanes' elements needs a __syncwarp(), and ThreadSanitizer reports it if it is
// missing. That every lane took part in each collective is checked at the warp's next
// barrier (every __syncwarp, shuffle, __syncthreads) and when the block ends, from a per-lane
// log of the collectives and their arguments. The product accumulates in fp32, k in order
// (16-bit products are exact in fp32); the hardware's internal rounding is not reproduced.
#pragma once

#if defined(__CUDACC__)
#error "cuda_host_emulation.h is for the host C++ compiler; nvcc builds the real kernels"
#endif
#if __cplusplus < 202002L
#error "cuda_host_emulation.h needs C++20 (std::barrier)"
#endif

#define FASTNTXENT_CUDA_HOST_EMULATION 1

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <math.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#if defined(__SANITIZE_ADDRESS__)
// GCC gives no AddressSanitizer redzone to a global aligned to more than 64 bytes, so under
// ASan the alignment is capped at 64 (the kernels need 32: the WMMA pointer rule, checked).
#define __align__(n) __attribute__((aligned((n) > 64 ? 64 : (n))))
#else
#define __align__(n) __attribute__((aligned(n)))
#endif
#define __shared__ static  // per-kernel object = per-block storage (blocks run one at a time)
// __restrict__ is a GCC/Clang keyword already.

// ---------------------------------------------------------------------------------------
// Built-in variables and runtime types
// ---------------------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
// Vector types of CUDA's vector_types.h that the kernels use: 16-byte aligned, as on the GPU, so
// that a misaligned vector access is undefined behaviour here too (UBSan reports it).
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
struct __attribute__((aligned(16))) longlong2 {
  long long x, y;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace cuda_emu {
inline thread_local cudaError_t last_error = cudaSuccess;
}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::last_error;
  cuda_emu::last_error = cudaSuccess;
  return e;
}

// ---------------------------------------------------------------------------------------
// 16-bit floating point: storage types and round-to-nearest-even conversions
// ---------------------------------------------------------------------------------------
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};

namespace cuda_emu {

inline uint32_t float_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}
inline float bits_float(uint32_t x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

inline unsigned short float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN, quiet
  if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {  // normal half (|f| >= 2^-14): rebias the exponent, round 13 bits
    uint32_t h = a - 0x38000000u;
    h += 0xfffu + ((h >> 13) & 1u);
    return static_cast<unsigned short>(sign | (h >> 13));
  }
  if (a < 0x33000000u) return static_cast<unsigned short>(sign);  // below 2^-25 (2^-25 ties to 0)
  // Subnormal half: the value in units of 2^-24, rounded to nearest even.
  const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return static_cast<unsigned short>(sign | q);
}

inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline unsigned short float_to_bfloat16_bits(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((x >> 16) | 0x40u);  // NaN, quiet
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<unsigned short>(x >> 16);
}

inline float bfloat16_bits_to_float(unsigned short b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace cuda_emu

inline __half __float2half(float f) { return __half{cuda_emu::float_to_half_bits(f)}; }
inline float __half2float(__half h) { return cuda_emu::half_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{cuda_emu::float_to_bfloat16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return cuda_emu::bfloat16_bits_to_float(b.bits); }

// The hardware computes __expf(x) as ex2.approx(x · log2 e) with the product rounded to fp32;
// the rounding of the product is modelled, ex2.approx's own error (~2 ulp) is not.
inline float __expf(float x) { return exp2f(x * 1.44269504088896341f); }

// ---------------------------------------------------------------------------------------
// Runtime: threads, blocks, barriers, checks
// ---------------------------------------------------------------------------------------
namespace cuda_emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned char kSharedPoison = 0xFF;

struct Block;

// Which barrier a thread has arrived at (published before arriving, read by the completion).
enum class SyncOp : int { kNone, kSyncThreads, kSyncWarp, kShfl, kExit };

inline const char* sync_op_name(SyncOp op) {
  switch (op) {
    case SyncOp::kNone: return "running";
    case SyncOp::kSyncThreads: return "__syncthreads()";
    case SyncOp::kSyncWarp: return "__syncwarp()";
    case SyncOp::kShfl: return "__shfl_xor_sync()";
    case SyncOp::kExit: return "returned from the kernel";
  }
  return "?";
}

// Per-lane log of the warp collectives (WMMA) executed: all lanes of a warp must agree.
struct CollectiveLog {
  uint64_t count = 0;
  uint64_t hash = 0xcbf29ce484222325ull;
  const char* last = "none";
  const void* last_ptr = nullptr;
  unsigned last_ldm = 0;
  bool operator==(const CollectiveLog& o) const { return count == o.count && hash == o.hash; }
};

struct ThreadState {
  Block* block = nullptr;
  unsigned linear = 0, warp = 0, lane = 0;
  CollectiveLog log;
  // Warp barrier: the op, its mask and argument, the exchange slots (double-buffered by the
  // parity of the warp's phase), and the phase count.
  SyncOp warp_op = SyncOp::kNone;
  unsigned warp_mask = 0;
  int shfl_arg = 0;
  uint32_t xchg[2] = {0, 0};
  uint64_t warp_phase = 0;
  // Block barrier.
  SyncOp block_op = SyncOp::kNone;
  // What the thread is doing, for the deadlock report (read by the watchdog).
  std::atomic<int> state{static_cast<int>(SyncOp::kNone)};
};

struct SharedRegion {
  unsigned char* begin;
  size_t size;
  std::string name;
};

struct KernelInfo {
  std::string name;  // demangled
  std::vector<SharedRegion> shared;
};

[[noreturn]] inline void fail(const char* fmt, ...);

struct WarpCompletion {
  Block* block;
  unsigned warp;
  void operator()() noexcept;
};
struct BlockCompletion {
  Block* block;
  void operator()() noexcept;
};

struct Block {
  const KernelInfo* kernel = nullptr;
  uint3 idx{0, 0, 0};
  dim3 dim, grid;
  unsigned nthreads = 0, nwarps = 0;
  std::unique_ptr<ThreadState[]> threads;
  std::vector<std::unique_ptr<std::barrier<WarpCompletion>>> warp_bars;
  std::unique_ptr<std::barrier<BlockCompletion>> block_bar;
  std::vector<uint32_t> warp_exited;  // lanes that have returned; owned by the warp's completions
  std::vector<bool> block_exited;     // threads that have returned; owned by the block completions
  std::atomic<uint64_t> progress{0};
  std::mutex done_mutex;
  std::condition_variable done_cv;
  unsigned done = 0;  // guarded by done_mutex
};

inline thread_local ThreadState* self_state = nullptr;

inline ThreadState& self(const char* what) {
  if (self_state == nullptr) fail("%s called outside an emulated kernel launch", what);
  return *self_state;
}

inline std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = (status == 0 && d != nullptr) ? d : name;
  std::free(d);
  return out;
}

// Set while a barrier's completion runs: its messages name the block, not the thread that
// happened to complete the phase.
inline thread_local const Block* completing_block = nullptr;

[[noreturn]] inline void fail(const char* fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  char where[256] = "";
  const Block* b = completing_block != nullptr ? completing_block
                   : self_state != nullptr     ? self_state->block
                                               : nullptr;
  if (b != nullptr && completing_block != nullptr) {
    std::snprintf(where, sizeof where, "\n  in block (%u,%u,%u), kernel ", b->idx.x, b->idx.y, b->idx.z);
  } else if (b != nullptr) {
    std::snprintf(where, sizeof where, "\n  in block (%u,%u,%u), thread (%u,%u,%u) = warp %u lane %u, kernel ",
                  b->idx.x, b->idx.y, b->idx.z, threadIdx.x, threadIdx.y, threadIdx.z, self_state->warp,
                  self_state->lane);
  }
  const std::string kernel = b != nullptr && b->kernel != nullptr ? b->kernel->name : "";
  std::fprintf(stderr, "cuda_host_emulation: error: %s%s%s\n", msg, where, kernel.c_str());
  std::fflush(stderr);
  std::abort();
}

// --- the __shared__ arrays of a kernel, from the ELF symbol table ------------------------
class MappedFile {
 public:
  explicit MappedFile(const char* path) {
    fd_ = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return;
    struct stat st;
    if (::fstat(fd_, &st) == 0 && st.st_size > 0) {
      size_ = static_cast<size_t>(st.st_size);
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
      data_ = p == MAP_FAILED ? nullptr : static_cast<const unsigned char*>(p);
    }
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const unsigned char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  int fd_ = -1;
  const unsigned char* data_ = nullptr;
  size_t size_ = 0;
};

inline KernelInfo find_kernel_info(const void* fn) {
  Dl_info info{};
  if (::dladdr(fn, &info) == 0) fail("kernel %p is not in any loaded object", fn);
  const char* path = (info.dli_fname != nullptr && info.dli_fname[0] != '\0') ? info.dli_fname : "/proc/self/exe";
  MappedFile file(path);
  const unsigned char* base = file.data();
  if (base == nullptr || file.size() < sizeof(Elf64_Ehdr) || std::memcmp(base, ELFMAG, SELFMAG) != 0 ||
      base[EI_CLASS] != ELFCLASS64)
    fail("cannot read the ELF file %s holding the kernels", path);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
  const Elf64_Shdr* symtab = nullptr;
  for (unsigned i = 0; i < eh->e_shnum; ++i)
    if (sh[i].sh_type == SHT_SYMTAB) symtab = &sh[i];
  if (symtab == nullptr)
    fail("%s has no symbol table (.symtab): the emulated kernels must not be stripped, the __shared__ arrays "
         "are found there", path);
  const char* strtab = reinterpret_cast<const char*>(base + sh[symtab->sh_link].sh_offset);
  const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + symtab->sh_offset);
  const size_t nsyms = symtab->sh_size / sizeof(Elf64_Sym);
  const uintptr_t load = eh->e_type == ET_DYN ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
  const uintptr_t rel = reinterpret_cast<uintptr_t>(fn) - load;

  const char* fname = nullptr;
  for (size_t i = 0; i < nsyms && fname == nullptr; ++i)
    if (ELF64_ST_TYPE(syms[i].st_info) == STT_FUNC && syms[i].st_value == rel && syms[i].st_name != 0)
      fname = strtab + syms[i].st_name;
  if (fname == nullptr) fail("kernel %p has no symbol in %s", fn, path);

  KernelInfo k;
  k.name = demangle(fname);
  // Local statics of the function: _ZZ<encoding>E<name>[_<discriminator>].
  const std::string prefix = std::strncmp(fname, "_Z", 2) == 0
                                 ? "_ZZ" + std::string(fname + 2) + "E"
                                 : "_ZZ" + std::to_string(std::strlen(fname)) + fname + "E";
  for (size_t i = 0; i < nsyms; ++i) {
    const Elf64_Sym& s = syms[i];
    if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || s.st_size == 0 || s.st_shndx == SHN_UNDEF ||
        s.st_shndx >= eh->e_shnum || (sh[s.st_shndx].sh_flags & SHF_WRITE) == 0)
      continue;
    const char* name = strtab + s.st_name;
    if (std::strncmp(name, prefix.c_str(), prefix.size()) != 0) continue;
    k.shared.push_back({reinterpret_cast<unsigned char*>(load + s.st_value), static_cast<size_t>(s.st_size),
                        demangle(name)});
  }
  return k;
}

// Serialises launches (the __shared__ statics are per kernel) and caches the kernel data.
struct Runtime {
  std::mutex launch_mutex;
  std::map<const void*, KernelInfo> kernels;  // guarded by launch_mutex
};
inline Runtime& runtime() {
  static Runtime r;
  return r;
}

inline double watchdog_seconds() {
  const char* v = std::getenv("FASTNTXENT_EMULATION_WATCHDOG");
  const double s = v != nullptr ? std::atof(v) : 0.0;
  return s > 0 ? s : 120.0;
}

// --- barrier completions: run once per phase, after every participant arrived ------------
inline void check_warp_logs(const Block& b, unsigned warp, uint32_t lanes, const char* at) {
  const ThreadState* first = nullptr;
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (!(lanes >> l & 1u)) continue;
    const ThreadState& t = b.threads[warp * kWarpSize + l];
    if (first == nullptr) {
      first = &t;
    } else if (!(t.log == first->log)) {
      fail("warp %u: lanes %u and %u disagree on the warp-collective (WMMA) operations executed before %s: lane "
           "%u has executed %llu (last: %s, pointer %p, ldm %u), lane %u %llu (last: %s, pointer %p, ldm %u). Every lane "
           "of the warp must execute each collective, with the same pointer, ldm and layout.",
           warp, first->lane, t.lane, at, first->lane, static_cast<unsigned long long>(first->log.count),
           first->log.last, first->log.last_ptr, first->log.last_ldm, t.lane,
           static_cast<unsigned long long>(t.log.count), t.log.last, t.log.last_ptr, t.log.last_ldm);
    }
  }
}

inline void WarpCompletion::operator()() noexcept {
  Block& b = *block;
  completing_block = &b;
  const uint32_t exited_before = b.warp_exited[warp];
  uint32_t syncing = 0, exiting = 0;
  const ThreadState* ref = nullptr;
  for (unsigned l = 0; l < kWarpSize; ++l) {
    if (exited_before >> l & 1u) continue;
    const ThreadState& t = b.threads[warp * kWarpSize + l];
    if (t.warp_op == SyncOp::kExit) {
      exiting |= 1u << l;
    } else {
      syncing |= 1u << l;
      if (ref == nullptr) ref = &t;
      if (t.warp_op != ref->warp_op || t.warp_mask != ref->warp_mask)
        fail("warp %u diverges: lane %u is at %s with mask 0x%08x, lane %u at %s with mask 0x%08x", warp,
             ref->lane, sync_op_name(ref->warp_op), ref->warp_mask, t.lane, sync_op_name(t.warp_op), t.warp_mask);
    }
  }
  if (ref != nullptr) {
    const uint32_t gone = (exited_before | exiting) & ref->warp_mask;
    if (gone != 0) {
      const unsigned l = static_cast<unsigned>(__builtin_ctz(gone));
      fail("warp %u: lane %u is named in the mask 0x%08x of %s (lane %u) but has exited: on Volta and later this "
           "is undefined behaviour",
           warp, l, ref->warp_mask, sync_op_name(ref->warp_op), ref->lane);
    }
    check_warp_logs(b, warp, syncing, sync_op_name(ref->warp_op));
  }
  for (unsigned l = 0; l < kWarpSize; ++l)
    if (!(exited_before >> l & 1u)) b.threads[warp * kWarpSize + l].warp_op = SyncOp::kNone;
  b.warp_exited[warp] = exited_before | exiting;
  b.progress.fetch_add(1, std::memory_order_relaxed);
  completing_block = nullptr;
}

inline void BlockCompletion::operator()() noexcept {
  Block& b = *block;
  completing_block = &b;
  int first_sync = -1, first_exit = -1;
  for (unsigned i = 0; i < b.nthreads; ++i) {
    if (b.block_exited[i]) continue;
    const SyncOp op = b.threads[i].block_op;
    if (op == SyncOp::kExit) {
      if (first_exit < 0) first_exit = static_cast<int>(i);
    } else if (first_sync < 0) {
      first_sync = static_cast<int>(i);
    }
  }
  if (first_sync >= 0 && first_exit >= 0)
    fail("thread %d returned from the kernel while thread %d waits at __syncthreads(): every thread of the block "
         "must reach each __syncthreads()",
         first_exit, first_sync);
  if (first_sync >= 0) {
    for (unsigned w = 0; w < b.nwarps; ++w) {
      uint32_t lanes = 0;
      for (unsigned l = 0; l < kWarpSize; ++l)
        if (!b.block_exited[w * kWarpSize + l]) lanes |= 1u << l;
      check_warp_logs(b, w, lanes, "__syncthreads()");
    }
  }
  for (unsigned i = 0; i < b.nthreads; ++i) {
    if (b.block_exited[i]) continue;
    if (b.threads[i].block_op == SyncOp::kExit) b.block_exited[i] = true;
    b.threads[i].block_op = SyncOp::kNone;
  }
  b.progress.fetch_add(1, std::memory_order_relaxed);
  completing_block = nullptr;
}

// --- the launch -------------------------------------------------------------------------
inline void run_block(Block& b, const std::function<void()>& body) {
  std::vector<std::thread> workers;
  workers.reserve(b.nthreads);
  for (unsigned i = 0; i < b.nthreads; ++i) {
    workers.emplace_back([&b, &body, i] {
      ThreadState& t = b.threads[i];
      self_state = &t;
      threadIdx = {i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y)};
      blockIdx = b.idx;
      blockDim = b.dim;
      gridDim = b.grid;
      body();
      // Returning: leave both barriers (an arrival that may complete the current phase).
      t.state.store(static_cast<int>(SyncOp::kExit), std::memory_order_relaxed);
      t.warp_op = SyncOp::kExit;
      t.block_op = SyncOp::kExit;
      b.warp_bars[t.warp]->arrive_and_drop();
      b.block_bar->arrive_and_drop();
      {
        std::lock_guard<std::mutex> lock(b.done_mutex);
        ++b.done;
      }
      b.done_cv.notify_one();
      self_state = nullptr;
    });
  }
  // Watchdog: no barrier phase completed and no thread finished for a while is a deadlock.
  const auto limit = std::chrono::duration<double>(watchdog_seconds());
  {
    std::unique_lock<std::mutex> lock(b.done_mutex);
    uint64_t seen = b.progress.load(std::memory_order_relaxed) + b.done;
    auto since = std::chrono::steady_clock::now();
    while (b.done < b.nthreads) {
      b.done_cv.wait_for(lock, std::chrono::milliseconds(500));
      const uint64_t now_seen = b.progress.load(std::memory_order_relaxed) + b.done;
      const auto now = std::chrono::steady_clock::now();
      if (now_seen != seen) {
        seen = now_seen;
        since = now;
      } else if (b.done < b.nthreads && now - since > limit) {
        std::fprintf(stderr, "cuda_host_emulation: error: no progress for %.0f s in block (%u,%u,%u) of %s: a "
                             "deadlock (threads waiting at different barriers). Thread states:\n",
                     limit.count(), b.idx.x, b.idx.y, b.idx.z, b.kernel->name.c_str());
        for (unsigned i = 0; i < b.nthreads; ++i)
          std::fprintf(stderr, "  thread %u (warp %u lane %u): %s\n", i, i / kWarpSize, i % kWarpSize,
                       sync_op_name(static_cast<SyncOp>(b.threads[i].state.load(std::memory_order_relaxed))));
        std::fflush(stderr);
        std::abort();
      }
    }
  }
  for (auto& w : workers) w.join();
  completing_block = &b;
  for (unsigned w = 0; w < b.nwarps; ++w) check_warp_logs(b, w, kFullMask, "the end of the kernel");
  completing_block = nullptr;
}

inline void run_grid(const void* fn, dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u ||
      nthreads < 1 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (nthreads % kWarpSize != 0)
    fail("a block of %llu threads: the emulation supports whole warps only (a multiple of 32 threads)",
         static_cast<unsigned long long>(nthreads));
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.launch_mutex);
  auto it = rt.kernels.find(fn);
  if (it == rt.kernels.end()) {
    it = rt.kernels.emplace(fn, find_kernel_info(fn)).first;
    const char* verbose = std::getenv("FASTNTXENT_EMULATION_VERBOSE");
    if (verbose != nullptr && verbose[0] == '1') {
      for (const SharedRegion& r : it->second.shared)
        std::fprintf(stderr, "cuda_host_emulation: kernel %s: __shared__ %s, %zu bytes\n", it->second.name.c_str(),
                     r.name.c_str(), r.size);
      if (it->second.shared.empty())
        std::fprintf(stderr, "cuda_host_emulation: kernel %s: no __shared__ arrays\n", it->second.name.c_str());
    }
  }
  const KernelInfo& kernel = it->second;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        for (const SharedRegion& r : kernel.shared) std::memset(r.begin, kSharedPoison, r.size);
        Block b;
        b.kernel = &kernel;
        b.idx = {x, y, z};
        b.dim = block;
        b.grid = grid;
        b.nthreads = static_cast<unsigned>(nthreads);
        b.nwarps = b.nthreads / kWarpSize;
        b.threads.reset(new ThreadState[b.nthreads]);
        for (unsigned i = 0; i < b.nthreads; ++i) {
          b.threads[i].block = &b;
          b.threads[i].linear = i;
          b.threads[i].warp = i / kWarpSize;
          b.threads[i].lane = i % kWarpSize;
        }
        for (unsigned w = 0; w < b.nwarps; ++w)
          b.warp_bars.push_back(std::make_unique<std::barrier<WarpCompletion>>(kWarpSize, WarpCompletion{&b, w}));
        b.block_bar = std::make_unique<std::barrier<BlockCompletion>>(b.nthreads, BlockCompletion{&b});
        b.warp_exited.assign(b.nwarps, 0u);
        b.block_exited.assign(b.nthreads, false);
        run_block(b, body);
      }
    }
  }
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t /*stream: launches are synchronous*/,
            A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // As on the device, the arguments are converted to the parameter types once, then each
  // thread receives its own copy.
  const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, [&] { std::apply(kernel, params); });
}

// --- checks shared by the intrinsics ----------------------------------------------------
// a: ldm for loads and stores (shown in messages), else another argument; b: types and layouts.
inline void note_collective(ThreadState& t, int op, const char* name, const void* ptr, uint64_t a, uint64_t b) {
  auto mix = [&t](uint64_t v) {
    t.log.hash ^= v;
    t.log.hash *= 0x100000001b3ull;
  };
  mix(static_cast<uint64_t>(op));
  mix(reinterpret_cast<uintptr_t>(ptr));
  mix(a);
  mix(b);
  ++t.log.count;
  t.log.last = name;
  t.log.last_ptr = ptr;
  t.log.last_ldm = ptr != nullptr ? static_cast<unsigned>(a) : 0;
}

// A WMMA tile starting in a __shared__ array must end inside it.
inline void check_shared_extent(const ThreadState& t, const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const SharedRegion& r : t.block->kernel->shared) {
    if (c >= r.begin && c < r.begin + r.size) {
      if (c + bytes > r.begin + r.size)
        fail("%s: the 16x16 tile at byte %zu of __shared__ %s reaches byte %zu, past its declared size %zu", what,
             static_cast<size_t>(c - r.begin), r.name.c_str(), static_cast<size_t>(c + bytes - r.begin), r.size);
      return;
    }
  }
}

inline void warp_sync(ThreadState& t, SyncOp op, unsigned mask, int arg, const char* what) {
  if (mask != kFullMask)
    fail("%s with mask 0x%08x: the emulation supports the full-warp mask 0xffffffff only", what, mask);
  t.warp_op = op;
  t.warp_mask = mask;
  t.shfl_arg = arg;
  t.state.store(static_cast<int>(op), std::memory_order_relaxed);
  t.block->warp_bars[t.warp]->arrive_and_wait();
  t.state.store(static_cast<int>(SyncOp::kNone), std::memory_order_relaxed);
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics
// ---------------------------------------------------------------------------------------
inline void __syncthreads() {
  cuda_emu::ThreadState& t = cuda_emu::self("__syncthreads");
  t.block_op = cuda_emu::SyncOp::kSyncThreads;
  t.state.store(static_cast<int>(cuda_emu::SyncOp::kSyncThreads), std::memory_order_relaxed);
  t.block->block_bar->arrive_and_wait();
  t.state.store(static_cast<int>(cuda_emu::SyncOp::kNone), std::memory_order_relaxed);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::ThreadState& t = cuda_emu::self("__syncwarp");
  cuda_emu::warp_sync(t, cuda_emu::SyncOp::kSyncWarp, mask, 0, "__syncwarp");
  ++t.warp_phase;
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "emulated __shfl_xor_sync: 32-bit types only");
  cuda_emu::ThreadState& t = cuda_emu::self("__shfl_xor_sync");
  if (width != warpSize) cuda_emu::fail("__shfl_xor_sync with width %d: the emulation supports width 32 only", width);
  if (laneMask < 0 || laneMask >= warpSize) cuda_emu::fail("__shfl_xor_sync: laneMask %d outside [0, 32)", laneMask);
  const unsigned slot = static_cast<unsigned>(t.warp_phase & 1u);
  std::memcpy(&t.xchg[slot], &var, sizeof var);
  cuda_emu::warp_sync(t, cuda_emu::SyncOp::kShfl, mask, laneMask, "__shfl_xor_sync");
  const cuda_emu::ThreadState& src = t.block->threads[t.warp * cuda_emu::kWarpSize + (t.lane ^ static_cast<unsigned>(laneMask))];
  T out;
  std::memcpy(&out, &src.xchg[slot], sizeof out);
  ++t.warp_phase;
  return out;
}

// ---------------------------------------------------------------------------------------
// nvcuda::wmma: 16×16×16 fragments of __half / __nv_bfloat16 with fp32 accumulators
// ---------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment {
  static_assert(m == 16 && n == 16 && k == 16, "emulated wmma: the 16x16x16 shape only");
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b> || std::is_same_v<Use, accumulator>,
                "wmma::fragment use must be matrix_a, matrix_b or accumulator");
  static_assert(std::is_same_v<Use, accumulator>
                    ? (std::is_same_v<T, float> && std::is_void_v<Layout>)
                    : ((std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) &&
                       (std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>)),
                "emulated wmma: matrix_a/matrix_b of __half or __nv_bfloat16 with row_major/col_major, float "
                "accumulators");

 public:
  // This lane's share: matrix_a: A[l/2][0..16); matrix_b: B[0..16)[8(l%2)..+8) (k-major);
  // accumulator: C[l/2][8(l%2)..+8).
  static constexpr int kShare = std::is_same_v<Use, matrix_a> ? 16 : std::is_same_v<Use, matrix_b> ? 128 : 8;
  T v[kShare];
  bool defined = false;  // filled or loaded
};

namespace detail {
template <typename T>
constexpr unsigned ldm_multiple() { return 16 / sizeof(T); }  // 16 bytes: 8 for 16-bit types, 4 for fp32

template <typename T>
inline void check_pointer_ldm(const cuda_emu::ThreadState& t, const void* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    cuda_emu::fail("%s: pointer %p is not 32-byte (256-bit) aligned", what, p);
  if (ldm % ldm_multiple<T>() != 0)
    cuda_emu::fail("%s: ldm %u is not a multiple of %u elements (16 bytes) for %u-byte elements", what, ldm,
                   ldm_multiple<T>(), static_cast<unsigned>(sizeof(T)));
  cuda_emu::check_shared_extent(t, p, (15 * size_t{ldm} + 16) * sizeof(T), what);
}
template <typename T>
constexpr int type_id() { return std::is_same_v<T, float> ? 1 : std::is_same_v<T, __half> ? 2 : 3; }
template <typename L>
constexpr int layout_id() { return std::is_same_v<L, row_major> ? 1 : std::is_same_v<L, col_major> ? 2 : 0; }
inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
inline T from_f(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half(x);
  else return __float2bfloat16(x);
}
}  // namespace detail

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, const std::type_identity_t<T>& value) {
  cuda_emu::ThreadState& t = cuda_emu::self("wmma::fill_fragment");
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof value);
  cuda_emu::note_collective(t, 1, "wmma::fill_fragment", nullptr, bits, detail::type_id<T>());
  for (auto& e : f.v) e = value;
  f.defined = true;
}

template <typename T, typename L>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& a, const T* p, unsigned ldm) {
  cuda_emu::ThreadState& t = cuda_emu::self("wmma::load_matrix_sync");
  detail::check_pointer_ldm<T>(t, p, ldm, "wmma::load_matrix_sync(matrix_a)");
  cuda_emu::note_collective(t, 2, "wmma::load_matrix_sync(matrix_a)", p, ldm,
                            detail::type_id<T>() * 4 + detail::layout_id<L>());
  const size_t r = t.lane / 2;
  for (size_t kk = 0; kk < 16; ++kk) a.v[kk] = std::is_same_v<L, row_major> ? p[r * ldm + kk] : p[kk * ldm + r];
  a.defined = true;
}

template <typename T, typename L>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& b, const T* p, unsigned ldm) {
  cuda_emu::ThreadState& t = cuda_emu::self("wmma::load_matrix_sync");
  detail::check_pointer_ldm<T>(t, p, ldm, "wmma::load_matrix_sync(matrix_b)");
  cuda_emu::note_collective(t, 3, "wmma::load_matrix_sync(matrix_b)", p, ldm,
                            detail::type_id<T>() * 4 + detail::layout_id<L>());
  const size_t c0 = 8 * (t.lane % 2);
  for (size_t kk = 0; kk < 16; ++kk)
    for (size_t j = 0; j < 8; ++j)
      b.v[kk * 8 + j] = std::is_same_v<L, row_major> ? p[kk * ldm + c0 + j] : p[(c0 + j) * ldm + kk];
  b.defined = true;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  cuda_emu::ThreadState& t = cuda_emu::self("wmma::mma_sync");
  if (!a.defined || !b.defined || !c.defined)
    cuda_emu::fail("wmma::mma_sync: the %s fragment was never loaded or filled",
                   !a.defined ? "matrix_a" : !b.defined ? "matrix_b" : "accumulator");
  cuda_emu::note_collective(t, 4, "wmma::mma_sync", nullptr, detail::type_id<T>(),
                            detail::layout_id<LA>() * 4 + detail::layout_id<LB>());
  float out[8];
  for (int j = 0; j < 8; ++j) {
    float acc = c.v[j];
    for (int kk = 0; kk < 16; ++kk) acc += detail::to_f(a.v[kk]) * detail::to_f(b.v[kk * 8 + j]);
    out[j] = acc;
  }
  for (int j = 0; j < 8; ++j) d.v[j] = out[j];
  d.defined = true;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& c, unsigned ldm,
                              layout_t layout) {
  cuda_emu::ThreadState& t = cuda_emu::self("wmma::store_matrix_sync");
  if (!c.defined) cuda_emu::fail("wmma::store_matrix_sync: the accumulator fragment was never filled or computed");
  detail::check_pointer_ldm<float>(t, p, ldm, "wmma::store_matrix_sync");
  cuda_emu::note_collective(t, 5, "wmma::store_matrix_sync", p, ldm, static_cast<uint64_t>(layout));
  const size_t r = t.lane / 2, c0 = 8 * (t.lane % 2);
  for (size_t j = 0; j < 8; ++j) {
    if (layout == mem_row_major) p[r * ldm + c0 + j] = c.v[j];
    else p[(c0 + j) * ldm + r] = c.v[j];
  }
}

}  // namespace wmma
}  // namespace nvcuda
