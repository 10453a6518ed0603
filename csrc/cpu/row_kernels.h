// Element-wise passes over one row of a similarity tile (the fused CPU kernels' inner loops).
//
// Each pass has a generic scalar version (any floating type, std::exp) and, for float on
// x86-64 CPUs with AVX2 + FMA (checked once at run time; the library itself is built for the
// baseline ISA), an 8-wide version with a vectorised exp (Cephes' expf polynomial, ≤ 2 ulp,
// exp(-inf) = 0, NaN in → NaN out). The two versions differ only by summation order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTNTXENT_ROW_AVX2 1
#endif

namespace fastntxent {
namespace cpu {
namespace rows {

#ifdef FASTNTXENT_ROW_AVX2
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

#define FASTNTXENT_AVX2 __attribute__((target("avx2,fma")))

FASTNTXENT_AVX2 inline __m256 exp8(__m256 x) {
  // exp(x) = 2^n · p(r), n = round(x·log2 e), r = x − n·ln 2 (ln 2 split in two parts).
  // min/max with x as the second operand keep a NaN x.
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n from the exponent bits; n = −127 (x = −88.38, also −inf) gives the bits of +0.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lanes [0, n) of a partial vector: load with zeros elsewhere, store only those lanes.
FASTNTXENT_AVX2 inline __m256i tail_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

FASTNTXENT_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FASTNTXENT_AVX2 inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FASTNTXENT_AVX2 inline float max_avx2(const float* s, int64_t n) {
  // max_ps(x, acc) returns acc when x is NaN: NaN entries are skipped, like the scalar `>`.
  __m256 acc = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm256_max_ps(_mm256_loadu_ps(s + c), acc);
  float m = hmax8(acc);
  for (; c < n; ++c) m = s[c] > m ? s[c] : m;
  return m;
}

FASTNTXENT_AVX2 inline void exp_sums_avx2(const float* s, int64_t n, float m, float& l, float& ps) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vl = _mm256_setzero_ps(), vps = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 x = _mm256_loadu_ps(s + c);
    const __m256 e = exp8(_mm256_sub_ps(x, vm));
    vl = _mm256_add_ps(vl, e);
    vps = _mm256_fmadd_ps(e, x, vps);
  }
  if (c < n) {
    const __m256i k = tail_mask(n - c);
    const __m256 x = _mm256_maskload_ps(s + c, k);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, vm)), _mm256_castsi256_ps(k));
    vl = _mm256_add_ps(vl, e);
    vps = _mm256_fmadd_ps(e, x, vps);
  }
  l = hsum8(vl);
  ps = hsum8(vps);
}

// h[c] = ak·exp(h[c] − lk) (if ak ≠ 0) + aj[c]·exp(h[c] − lj[c]) (where aj[c] ≠ 0).
FASTNTXENT_AVX2 inline void pair_exp_avx2(float* h, int64_t n, float ak, float lk, const float* aj,
                                          const float* lj) {
  const __m256 vak = _mm256_set1_ps(ak), vlk = _mm256_set1_ps(lk), zero = _mm256_setzero_ps();
  const bool row = ak != 0;
  for (int64_t c = 0; c < n; c += 8) {
    const int64_t w = std::min<int64_t>(8, n - c);
    const __m256i k = tail_mask(w);
    const __m256 s = _mm256_maskload_ps(h + c, k);
    const __m256 a = _mm256_maskload_ps(aj + c, k);
    const __m256 l = _mm256_maskload_ps(lj + c, k);
    __m256 v = _mm256_and_ps(_mm256_mul_ps(a, exp8(_mm256_sub_ps(s, l))), _mm256_cmp_ps(a, zero, _CMP_NEQ_UQ));
    if (row) v = _mm256_fmadd_ps(vak, exp8(_mm256_sub_ps(s, vlk)), v);
    _mm256_maskstore_ps(h + c, k, v);
  }
}

// h[c] = coef[c]·exp(h[c] − shift[c]) where coef[c] ≠ 0, else 0; coef == nullptr: one
// coefficient `ck` and shift `sk` for the whole row (the caller ensures ck ≠ 0).
FASTNTXENT_AVX2 inline void coef_exp_avx2(float* h, int64_t n, float ck, float sk, const float* coef,
                                          const float* shift) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t c = 0; c < n; c += 8) {
    const int64_t w = std::min<int64_t>(8, n - c);
    const __m256i k = tail_mask(w);
    const __m256 s = _mm256_maskload_ps(h + c, k);
    __m256 v;
    if (coef == nullptr) {
      v = _mm256_mul_ps(_mm256_set1_ps(ck), exp8(_mm256_sub_ps(s, _mm256_set1_ps(sk))));
    } else {
      const __m256 a = _mm256_maskload_ps(coef + c, k);
      const __m256 l = _mm256_maskload_ps(shift + c, k);
      v = _mm256_and_ps(_mm256_mul_ps(a, exp8(_mm256_sub_ps(s, l))), _mm256_cmp_ps(a, zero, _CMP_NEQ_UQ));
    }
    _mm256_maskstore_ps(h + c, k, v);
  }
}
#undef FASTNTXENT_AVX2
#endif  // FASTNTXENT_ROW_AVX2

template <typename T>
constexpr bool use_avx2() {
#ifdef FASTNTXENT_ROW_AVX2
  return std::is_same<T, float>::value;
#else
  return false;
#endif
}

// max over s[0, n), NaN entries skipped; −inf if none.
template <typename T>
inline T max_of(const T* s, int64_t n) {
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) return max_avx2(s, n);
  }
#endif
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c) m = s[c] > m ? s[c] : m;
  return m;
}

// l += Σ exp(s − m), ps += Σ exp(s − m)·s over s[0, n).
template <typename T>
inline void add_exp_sums(const T* s, int64_t n, T m, T& l, T& ps) {
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) {
      float tl, tps;
      exp_sums_avx2(s, n, m, tl, tps);
      l += tl;
      ps += tps;
      return;
    }
  }
#endif
  T tl = 0, tps = 0;
  for (int64_t c = 0; c < n; ++c) {
    const T e = std::exp(s[c] - m);
    tl += e;
    tps += e * s[c];
  }
  l += tl;
  ps += tps;
}

// The self family's backward weights of one tile row (s symmetric): in place,
// h[c] = ak·exp(h[c] − lk) + aj[c]·exp(h[c] − lj[c]), a zero weight contributing exactly 0.
template <typename T>
inline void pair_exp(T* h, int64_t n, T ak, T lk, const T* aj, const T* lj) {
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) return pair_exp_avx2(h, n, ak, lk, aj, lj);
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    T v = 0;
    if (ak != 0) v += ak * std::exp(h[c] - lk);
    if (aj[c] != 0) v += aj[c] * std::exp(h[c] - lj[c]);
    h[c] = v;
  }
}

// In place h[c] = ck·exp(h[c] − sk) for one row weight ck (0 gives exact zeros).
template <typename T>
inline void row_exp(T* h, int64_t n, T ck, T sk) {
  if (ck == 0) {
    std::fill(h, h + n, T(0));
    return;
  }
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) return coef_exp_avx2(h, n, ck, sk, nullptr, nullptr);
  }
#endif
  for (int64_t c = 0; c < n; ++c) h[c] = ck * std::exp(h[c] - sk);
}

// In place h[c] = coef[c]·exp(h[c] − shift[c]), a zero coefficient giving exactly 0.
template <typename T>
inline void column_exp(T* h, int64_t n, const T* coef, const T* shift) {
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) return coef_exp_avx2(h, n, 0, 0, coef, shift);
  }
#endif
  for (int64_t c = 0; c < n; ++c) h[c] = coef[c] != 0 ? coef[c] * std::exp(h[c] - shift[c]) : T(0);
}

// Positives of one row: sum += Σ s[c], count += #c over c with ids[c] == id.
template <typename T>
inline void add_where_label(const T* s, int64_t n, const int32_t* ids, int32_t id, T& sum, T& count) {
  T ts = 0, tc = 0;
#pragma omp simd reduction(+ : ts, tc)
  for (int64_t c = 0; c < n; ++c) {
    const bool same = ids[c] == id;
    ts += same ? s[c] : T(0);
    tc += same ? T(1) : T(0);
  }
  sum += ts;
  count += tc;
}

// h[c] += bk + b[c] where ids[c] == id (the positive-indicator part of H).
template <typename T>
inline void add_positive_weights(T* h, int64_t n, const int32_t* ids, int32_t id, T bk, const T* b) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) h[c] += ids[c] == id ? bk + b[c] : T(0);
}

}  // namespace rows
}  // namespace cpu
}  // namespace fastntxent
