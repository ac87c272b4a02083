// The online softmax's arithmetic, shared by the attention kernels (paged_attention.cpp, prefill_attention.cpp).
// Included inside each kernel's anonymous namespace.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// exp(x) in a form the compiler vectorizes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7, below float32 rounding of the sums it feeds), 2^n put straight into the
// exponent bits. The argument is clamped to [-87, 88] so that 2^n stays a normal float.
inline float exp_any(float x) {
  if (x != x) return x;  // NaN stays NaN (and never reaches the float -> int conversion below)
  const float clamped = std::min(std::max(x, -87.f), 88.f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for precision
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// exp(x) for the softmax (x <= 0): exactly 0 below -87, -inf included.
inline float exp_nonpositive(float x) { return x < -87.f ? 0.f : exp_any(x); }

// Online softmax, one block of one head: turns the block's scores into weights under the running maximum,
// adds them to the running sum, and returns the factor by which what was accumulated under the old maximum
// must be rescaled (0 on the first block, whose old maximum is -inf).
inline float softmax_block(float* score, int n, float& running_max, float& denom) {
  float m = running_max;
  for (int t = 0; t < n; t++) m = std::max(m, score[t]);
  const float correction = exp_nonpositive(running_max - m);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int t = 0; t < n; t++) {
    score[t] = exp_nonpositive(score[t] - m);
    sum += score[t];
  }
  denom = denom * correction + sum;
  running_max = m;
  return correction;
}

#if defined(__AVX512F__) && !defined(JITNEY_PORTABLE)
// exp_any on 16 lanes: its reduction and polynomial, with FMAs; clamped to [-87, 88]; NaN stays NaN (MAXPS and
// MINPS return their second operand when one is NaN).
inline __m512 exp512_any(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_set1_ps(88.f), _mm512_max_ps(_mm512_set1_ps(-87.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// exp512_any for the softmax (x <= 0): exactly 0 below -87, -inf included.
inline __m512 exp512_nonpositive(__m512 x) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ), exp512_any(x),
                              _mm512_setzero_ps());
}
#endif
