// A query held as int16 on a power-of-two scale, and the int16 dot products that use it: shared by the kernels
// over an int8 cache (paged_attention.cpp's decode rows, prefill_attention.cpp's tiles). Included inside each
// kernel's anonymous namespace, where AVX-512 BW intrinsics are compiled in (<immintrin.h> already included).
#pragma once
#include <cmath>

// The power of two s with amax / s in [2^13, 2^14), amax a query's largest magnitude: round(q / s) then fits an
// int16 with room and is q to within s / 2, 2^-14 of amax. 1 for a query of zeros.
inline float int16_step(float amax) {
  int e = 0;
  std::frexp(amax, &e);  // amax = f 2^e, f in [0.5, 1)
  return amax > 0.f ? std::ldexp(1.f, e - 14) : 1.f;
}

// acc + a[0] b[0] + a[1] b[1] per 32-bit lane of int16 pairs (VPDPWSSD where the CPU has AVX512-VNNI): exact.
inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
