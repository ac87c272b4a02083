// A few rows through bfloat16 weights, each weight read once, with software prefetch: what the layer matmuls of
// a small-batch decode step could take on this machine, timed by benchmarks/small_matmul.py beside oneDNN's
// packed kernel (which the model uses). Not the engine's: a measurement of the room left.
//
// y [m, n] = x [m, k] @ w [n, k]^T, bfloat16 in and out, float32 sums (VDPBF16PS: each product exact, summed in
// float32 pairwise per lane, then the 16 lanes added), m <= 4. Output rows in groups of 4 over OpenMP's static
// split; each group asks for the weights `ahead` groups further on into L1 before it reads its own (0: none).
// Needs AVX512-BF16; jitney_gemv_bf16_available() says whether this build has it.
#include <immintrin.h>
#include <cstdint>

#include "../../model_runner/csrc/bf16.h"  // store: float32 to bfloat16, as the kernels round

#if defined(__AVX512BF16__) && !defined(JITNEY_PORTABLE)
namespace {
constexpr int R = 4;  // output rows per group

// One group: `rows` (<= R) output rows by M input rows, every loop bound a constant where the group is full, so
// that the R x M accumulators stay in registers.
template <int M, int ROWS>
inline void group(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t n, int64_t k, int64_t r0) {
  __m512 acc[ROWS][M];
  for (int r = 0; r < ROWS; r++)
    for (int i = 0; i < M; i++) acc[r][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 32) {
    const __mmask32 mask = k - c >= 32 ? ~__mmask32(0) : (__mmask32(1) << (k - c)) - 1;
    __m512i xv[M];
    for (int i = 0; i < M; i++) xv[i] = _mm512_maskz_loadu_epi16(mask, x + i * k + c);
    for (int r = 0; r < ROWS; r++) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + (r0 + r) * k + c);
      for (int i = 0; i < M; i++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)wv, (__m512bh)xv[i]);
    }
  }
  for (int r = 0; r < ROWS; r++)
    for (int i = 0; i < M; i++) store(_mm512_reduce_add_ps(acc[r][i]), &y[i * n + r0 + r]);
}

template <int M>
void gemv(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t n, int64_t k, int64_t ahead) {
  const int64_t groups = (n + R - 1) / R;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; g++) {
    if (ahead > 0 && g + ahead < groups) {
      const int64_t p0 = (g + ahead) * R, prow = n - p0 < R ? n - p0 : R;
      const char* p = reinterpret_cast<const char*>(w + p0 * k);
      for (int64_t off = 0; off < prow * k * 2; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
    }
    const int64_t r0 = g * R;
    switch (n - r0 < R ? n - r0 : R) {
      case 4: group<M, 4>(w, x, y, n, k, r0); break;
      case 3: group<M, 3>(w, x, y, n, k, r0); break;
      case 2: group<M, 2>(w, x, y, n, k, r0); break;
      default: group<M, 1>(w, x, y, n, k, r0);
    }
  }
}
}  // namespace

extern "C" {
int jitney_gemv_bf16_available() { return 1; }

void jitney_gemv_bf16(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t n, int64_t k, int64_t m,
                      int64_t ahead) {
  switch (m) {
    case 1: gemv<1>(w, x, y, n, k, ahead); break;
    case 2: gemv<2>(w, x, y, n, k, ahead); break;
    case 3: gemv<3>(w, x, y, n, k, ahead); break;
    default: gemv<4>(w, x, y, n, k, ahead);
  }
}
}  // extern "C"
#else
extern "C" {
int jitney_gemv_bf16_available() { return 0; }
void jitney_gemv_bf16(const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t) {}
}  // extern "C"
#endif
