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

// No fused multiply-adds but the written ones: GCC would otherwise contract the intrinsics'
// mul + sub (they are plain vector arithmetic to it), and h·sc − lse must round h·sc first,
// exactly as the forward did, for exp(s − lse) to be 1 where the forward's lse is s.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

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
  // exp(x) = 2^n · exp(r + c), n = round(x·log2 e), r + c = x − n·ln 2 kept to ~2^-48 (ln 2
  // split in a 9-bit head, exact product, and a tail; TwoSum for the rounding of r). Within
  // 0.6 ulp of the true value (glibc: 0.5): the gradients' a·P + b cancels where P ≈ 1, so a
  // 1-ulp exp would show there. min/max with x as the second operand keep a NaN x.
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 hi = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // exact
  const __m256 lo = _mm256_mul_ps(n, _mm256_set1_ps(2.12194440054690583e-4f));  // x − n·ln2 = hi + lo
  const __m256 r = _mm256_add_ps(hi, lo);
  const __m256 bb = _mm256_sub_ps(r, hi);
  const __m256 c = _mm256_add_ps(_mm256_sub_ps(hi, _mm256_sub_ps(r, bb)), _mm256_sub_ps(lo, bb));  // TwoSum
  // exp(r) − 1 − r = r²·(1/2! + r/3! + … + r⁶/8!): Taylor to degree 8 (truncation < 3e-10
  // relative on |r| ≤ ln2/2), coefficients 1/k! rounded to float.
  __m256 p = _mm256_set1_ps(2.48015873015873e-05f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.98412698412698e-04f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.38888888888889e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.33333333333333e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.16666666666667e-02f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66666666666667e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  // exp(r + c) ≈ (1 + r) + (r²·p + c·(1 + r)), 1 + r split exactly into s + e (Fast2Sum):
  // one rounding of size ulp/2 at the end, the small correction term's own is ~ulp/30.
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 s = _mm256_add_ps(one, r);
  const __m256 e = _mm256_add_ps(_mm256_sub_ps(one, s), r);
  const __m256 q = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(e, _mm256_fmadd_ps(c, r, c)));
  p = _mm256_add_ps(s, q);
  // 2^n from the exponent bits; n = −127 (x = −88.38, also −inf) gives the bits of +0.
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
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

// s = h[c]·sc; h[c] = ak·exp(s − lk) (if ak ≠ 0) + aj[c]·exp(s − lj[c]) (where aj[c] ≠ 0).
FASTNTXENT_AVX2 inline void pair_exp_avx2(float* h, int64_t n, float sc, float ak, float lk, const float* aj,
                                          const float* lj) {
  const __m256 vak = _mm256_set1_ps(ak), vlk = _mm256_set1_ps(lk), vsc = _mm256_set1_ps(sc);
  const __m256 zero = _mm256_setzero_ps();
  const bool row = ak != 0;
  for (int64_t c = 0; c < n; c += 8) {
    const int64_t w = std::min<int64_t>(8, n - c);
    const __m256i k = tail_mask(w);
    const __m256 s = _mm256_mul_ps(_mm256_maskload_ps(h + c, k), vsc);
    const __m256 a = _mm256_maskload_ps(aj + c, k);
    const __m256 l = _mm256_maskload_ps(lj + c, k);
    __m256 v = _mm256_and_ps(_mm256_mul_ps(a, exp8(_mm256_sub_ps(s, l))), _mm256_cmp_ps(a, zero, _CMP_NEQ_UQ));
    if (row) v = _mm256_fmadd_ps(vak, exp8(_mm256_sub_ps(s, vlk)), v);
    _mm256_maskstore_ps(h + c, k, v);
  }
}

// h[c] = coef[c]·exp(h[c]·sc − shift[c]) where coef[c] ≠ 0, else 0; coef == nullptr: one
// coefficient `ck` and shift `sk` for the whole row (the caller ensures ck ≠ 0).
FASTNTXENT_AVX2 inline void coef_exp_avx2(float* h, int64_t n, float sc, float ck, float sk, const float* coef,
                                          const float* shift) {
  const __m256 zero = _mm256_setzero_ps(), vsc = _mm256_set1_ps(sc);
  for (int64_t c = 0; c < n; c += 8) {
    const int64_t w = std::min<int64_t>(8, n - c);
    const __m256i k = tail_mask(w);
    const __m256 s = _mm256_mul_ps(_mm256_maskload_ps(h + c, k), vsc);
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
FASTNTXENT_AVX2 inline void where_label_avx2(const float* s, int64_t n, const int32_t* ids, int32_t id, float& sum,
                                             float& count) {
  const __m256i vid = _mm256_set1_epi32(id);
  __m256 vs = _mm256_setzero_ps(), vc = _mm256_setzero_ps();
  for (int64_t c = 0; c < n; c += 8) {
    const __m256i k = tail_mask(std::min<int64_t>(8, n - c));
    const __m256i same = _mm256_and_si256(k, _mm256_cmpeq_epi32(_mm256_maskload_epi32(ids + c, k), vid));
    vs = _mm256_add_ps(vs, _mm256_and_ps(_mm256_maskload_ps(s + c, same), _mm256_castsi256_ps(same)));
    vc = _mm256_add_ps(vc, _mm256_and_ps(_mm256_set1_ps(1.0f), _mm256_castsi256_ps(same)));
  }
  sum = hsum8(vs);
  count = hsum8(vc);
}

FASTNTXENT_AVX2 inline void positive_weights_avx2(float* h, int64_t n, const int32_t* ids, int32_t id, float bk,
                                                  const float* b) {
  const __m256i vid = _mm256_set1_epi32(id);
  const __m256 vbk = _mm256_set1_ps(bk);
  for (int64_t c = 0; c < n; c += 8) {
    const __m256i k = tail_mask(std::min<int64_t>(8, n - c));
    const __m256i same = _mm256_and_si256(k, _mm256_cmpeq_epi32(_mm256_maskload_epi32(ids + c, k), vid));
    if (_mm256_testz_si256(same, same)) continue;
    const __m256 w = _mm256_add_ps(vbk, _mm256_maskload_ps(b + c, same));
    _mm256_maskstore_ps(h + c, same, _mm256_add_ps(_mm256_maskload_ps(h + c, same), w));
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

// The scalar pass of the two below: l += Σ exp(s − m), ps += Σ exp(s − m)·s over the c of
// s[0, n) with keep(c).
template <typename T, typename Keep>
inline void exp_sums_scalar(const T* s, int64_t n, T m, T& l, T& ps, Keep keep) {
  T tl = 0, tps = 0;
  for (int64_t c = 0; c < n; ++c) {
    if (!keep(c)) continue;
    const T e = std::exp(s[c] - m);
    tl += e;
    tps += e * s[c];
  }
  l += tl;
  ps += tps;
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
  exp_sums_scalar(s, n, m, l, ps, [](int64_t) { return true; });
}

// The backward passes take the raw tile h = u·vᵀ and form the logit s = h·sc (one rounding,
// as the forward's scale_row) before subtracting a logsumexp: where P ≈ 1 the gradient's
// a·P + b cancels, so the backward must see the forward's logits bit for bit.

// The self family's backward weights of one tile row (s symmetric): in place,
// h[c] = ak·exp(s − lk) + aj[c]·exp(s − lj[c]), a zero weight contributing exactly 0.
template <typename T>
inline void pair_exp(T* h, int64_t n, T sc, T ak, T lk, const T* aj, const T* lj) {
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) return pair_exp_avx2(h, n, sc, ak, lk, aj, lj);
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    const T s = h[c] * sc;
    T v = 0;
    if (ak != 0) v += ak * std::exp(s - lk);
    if (aj[c] != 0) v += aj[c] * std::exp(s - lj[c]);
    h[c] = v;
  }
}

// In place h[c] = ck·exp(h[c]·sc − sk) for one row weight ck (0 gives exact zeros).
template <typename T>
inline void row_exp(T* h, int64_t n, T sc, T ck, T sk) {
  if (ck == 0) {
    std::fill(h, h + n, T(0));
    return;
  }
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) return coef_exp_avx2(h, n, sc, ck, sk, nullptr, nullptr);
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    const T s = h[c] * sc;
    h[c] = ck * std::exp(s - sk);
  }
}

// In place s[c] = h[c]·sc: the logits of one tile row.
template <typename T>
inline void scale_row(T* h, int64_t n, T sc) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) h[c] *= sc;
}

// Positives of one row: sum += Σ s[c], count += #c over c with ids[c] == id.
template <typename T>
inline void add_where_label(const T* s, int64_t n, const int32_t* ids, int32_t id, T& sum, T& count) {
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) {
      float ts, tc;
      where_label_avx2(s, n, ids, id, ts, tc);
      sum += ts;
      count += tc;
      return;
    }
  }
#endif
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

// l += Σ exp(s − m), ps += Σ exp(s − m)·s over the c of s[0, n) with ids[c] ≠ id: the
// decoupled logsumexp, positives left out (scalar: DCL is the rarer path).
template <typename T>
inline void add_exp_sums_except_label(const T* s, int64_t n, const int32_t* ids, int32_t id, T m, T& l, T& ps) {
  exp_sums_scalar(s, n, m, l, ps, [&](int64_t c) { return ids[c] != id; });
}

// h[c] = 0 where ids[c] == id: a decoupled row has no softmax weight at its positives.
template <typename T>
inline void zero_where_label(T* h, int64_t n, const int32_t* ids, int32_t id) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) h[c] = ids[c] == id ? T(0) : h[c];
}

// h[c] += bk + b[c] where ids[c] == id (the positive-indicator part of H).
template <typename T>
inline void add_positive_weights(T* h, int64_t n, const int32_t* ids, int32_t id, T bk, const T* b) {
#ifdef FASTNTXENT_ROW_AVX2
  if constexpr (use_avx2<T>()) {
    if (has_avx2()) return positive_weights_avx2(h, n, ids, id, bk, b);
  }
#endif
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) h[c] += ids[c] == id ? bk + b[c] : T(0);
}

}  // namespace rows
}  // namespace cpu
}  // namespace fastntxent

#pragma GCC pop_options
