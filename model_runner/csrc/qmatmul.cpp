// y = x W^T for quantized weights W [N, K] and float32 or bfloat16 activations x [M, K] (row stride ldx), on the
// CPU: the activations are quantized to 16-bit integers per block of 32 (a float32 scale per block, round to
// nearest) held as two signed 8-bit digits, and each block's dot product is an integer one (AVX2 vpmaddubsw,
// AVX-512 VNNI vpdpbusd on two tiles at once, once per digit), scaled in float32. The weights are fetched ahead
// in software (fetch_ahead): at batch 1 that is what makes the loop run at the memory's speed.
//
// Why 16 bits and not llama.cpp's 8 (Q8_0 / Q8_1 activations): 8-bit activations err by up to 1/254 of their
// block's largest value, 0.3-0.8 % of each matmul's output on SmolLM2 (measured), several times the compute
// dtype's own rounding (bfloat16: 2^-8 relative, once per output), and through 30 layers that was enough to turn
// "The capital of France is Paris." into "L'Etoile, la Marseillaise, ..." on the README's first prompt. With
// steps of 1/32258 of the block's largest value the activations are finer than bfloat16 holds them (8
// significant bits) for every value above 1/128 of its block's largest, so the quantized model agrees with the
// float model of the same (dequantized) weights to the compute dtype's precision. The cost is a second integer
// dot product per block; the weights read, what bounds a batch-1 step, are the same bytes.
//
// Weight formats (model_runner/quant.py repacks them at load; the numbers are those of the file, unchanged):
//   0 Q4_0   GGUF: per block of 32, an fp16 scale d and 4-bit q in 0..15;        w = d (q - 8)
//   1 Q4_1   GGUF: per block of 32, fp16 d and fp16 min m, 4-bit q in 0..15;      w = d q + m
//   2 Q8_0   GGUF: per block of 32, fp16 d and int8 q;                            w = d q
//   3 INT8   per output row, a float32 scale s and int8 q (symmetric);           w = s q
// Rows are stored in tiles of 8 so that the 8 lanes of an integer dot product are 8 output rows: for tile t and
// block b, group j (0..7) holds K positions 4j..4j+3 of the 8 rows as 32 bytes [row r: bytes 4r..4r+3]. A
// broadcast of the activation's 4 bytes at 4j then gives, lane by lane, the partial dot products of 8 rows at
// once (the layout llama.cpp's CPU "repack" buffers use for the same reason), so the float work of a block (one
// scale multiply and add) is shared by 8 rows instead of being done per row. 4-bit groups j and j + 4 share a
// byte (low and high nibble): 128 bytes per tile-block; 8-bit ones take 256.
//
// Every output element is computed by the same operations in the same order whatever M and the tiling of rows
// across threads: a sequence's logits do not depend on its companions in a batch (batch invariance).
//
// Built and loaded by model_runner/native.py (JITNEY_ISA picks the loop: avx512-vnni, avx2 or portable).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(JITNEY_PORTABLE)
#define JITNEY_AVX2 1
#include <immintrin.h>
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define JITNEY_VNNI 1
#if defined(__AVX512BW__) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define JITNEY_AMX_INT8 1  // Intel Xeons since Sapphire Rapids: large batches' integer sums on the tile units
#include "amx.h"           // amx_permitted, configure_tiles
#endif
#endif
#endif

namespace {

enum Format { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, INT8 = 3 };
constexpr int QK = 32;    // values per block
constexpr int TILE = 8;   // output rows per tile
constexpr int SROWS = 4;  // activation rows tile_kernel computes together (each weight block is unpacked once for them)

constexpr int tile_bytes(int fmt) { return (fmt == Q4_0 || fmt == Q4_1) ? 128 : 256; }

inline float half_to_float(uint16_t h) {  // IEEE binary16 -> binary32, exact (subnormals included)
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  const float sign = (h & 0x8000) ? -1.f : 1.f;
  if (exp == 0) return sign * float(man) * 5.9604644775390625e-08f;  // man x 2^-24, exact
  uint32_t bits = uint32_t(h & 0x8000) << 16 | (exp == 0x1f ? 0x7f800000u : (exp + 112) << 23) | man << 13;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#include "bf16.h"  // to_float, store

// The activations of one row, quantized: Q = round(x / d) with d = max|x| / QMAX per block (|Q| <= QMAX), held as
// two 8-bit digits Q = RADIX hi + lo (hi = round(Q / RADIX), |hi|, |lo| <= 127: the split is exact), and the sum
// of each block's Q (the Q4 formats' offsets need it: sum_i (q_i - 8) a_i = sum_i q_i a_i - 8 sum_i a_i).
// Integer ranges: a block's sum_i w_i Q_i is at most 32 x 128 x 32258 < 2^31 (int32, exact); sum_i Q_i < 2^20.
constexpr int RADIX = 254;
constexpr int QMAX = 127 * RADIX;  // 32258
// A block whose largest magnitude is below this quantizes to zeros: QMAX / max|x| would overflow float32 (from
// 9.5e-35 down), and such a block adds less than float32 resolves to any output beside a block of normal size.
constexpr float TINY = 0x1p-112f;  // 1.9e-34
struct QRow {
  const int8_t* hi;
  const int8_t* lo;
  const float* d;
  const int32_t* sum;
};

template <typename T>
void quantize_row_scalar(const T* x, int64_t k, int8_t* hi, int8_t* lo, float* d, int32_t* sum) {
  for (int64_t b = 0; b < k / QK; ++b) {
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(to_float(x[b * QK + i])));
    const float scale = amax / float(QMAX), inv = amax >= TINY ? float(QMAX) / amax : 0.f;
    int32_t s = 0;
    for (int i = 0; i < QK; ++i) {
      // |x inv| <= QMAX (1 + 2^-23): the clamp only catches that last rounding of amax's own value.
      const int v = std::clamp(int(std::nearbyint(to_float(x[b * QK + i]) * inv)), -QMAX, QMAX);
      const int h = v >= 0 ? (v + RADIX / 2) / RADIX : -((-v + RADIX / 2) / RADIX);  // round(v / RADIX)
      hi[b * QK + i] = int8_t(h);
      lo[b * QK + i] = int8_t(v - RADIX * h);  // |v - RADIX h| <= RADIX / 2 = 127
      s += v;
    }
    d[b] = scale;
    sum[b] = s;
  }
}

#if defined(JITNEY_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const uint16_t* x) {  // bfloat16 -> float32: the top half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}

// 16 values' Q: round(x inv) to nearest even (the product in float32, the conversion under the default rounding
// mode, as std::nearbyint), clamped to +-QMAX; split into digits as quantize_row_scalar does, the high one
// round(Q / RADIX) half away from zero: (|Q| + RADIX / 2) / RADIX by float division, exact here (the numerator is
// an integer below 2^24 and is either a multiple of RADIX or at least 1/RADIX from one), then Q's sign.
inline __m512i quantize16(__m512 x, float inv, int8_t* hi, int8_t* lo) {
  const __m512i qmax = _mm512_set1_epi32(QMAX);
  const __m512i v = _mm512_max_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), qmax),
                                     _mm512_min_epi32(qmax, _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(inv)))));
  const __m512 num = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_abs_epi32(v), _mm512_set1_epi32(RADIX / 2)));
  __m512i h = _mm512_cvttps_epi32(_mm512_div_ps(num, _mm512_set1_ps(float(RADIX))));
  h = _mm512_mask_sub_epi32(h, _mm512_cmplt_epi32_mask(v, _mm512_setzero_si512()), _mm512_setzero_si512(), h);
  const __m512i l = _mm512_sub_epi32(v, _mm512_mullo_epi32(h, _mm512_set1_epi32(RADIX)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtepi32_epi8(h));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtepi32_epi8(l));
  return v;
}

// quantize_row_scalar's digits, scales and sums, 16 values at a time (a step quantizes every activation of every
// matmul: one element at a time that was 0.12 ms of a 128-row gate/up matmul's 1.27). The same numbers: tested.
template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* hi, int8_t* lo, float* d, int32_t* sum) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < k / QK; ++b) {
    const __m512 x0 = load16(x + b * QK), x1 = load16(x + b * QK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, absmask), _mm512_and_ps(x1, absmask)));
    const float inv = amax >= TINY ? float(QMAX) / amax : 0.f;
    const __m512i v = _mm512_add_epi32(quantize16(x0, inv, hi + b * QK, lo + b * QK),
                                       quantize16(x1, inv, hi + b * QK + 16, lo + b * QK + 16));
    d[b] = amax / float(QMAX);
    sum[b] = _mm512_reduce_add_epi32(v);
  }
}
#else
template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* hi, int8_t* lo, float* d, int32_t* sum) {
  quantize_row_scalar(x, k, hi, lo, d, sum);
}
#endif

// --- one tile of 8 output rows, R (1..SROWS) activation rows: acc[r][lane] += row lane's dot with row r -----------

#if defined(JITNEY_AVX2)

// Lane sums of u8 x s8 products, 4 per lane: one vpdpbusd with VNNI, vpmaddubsw + vpmaddwd without.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(JITNEY_VNNI)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// RADIX hi + lo, lane by lane (exact: see QMAX).
inline __m256i combine_digits(__m256i hi, __m256i lo) {
  return _mm256_add_epi32(_mm256_mullo_epi32(hi, _mm256_set1_epi32(RADIX)), lo);
}

// Software prefetch of the block `ahead` blocks past block b of a tile's stream (tiles lie one after another,
// so near a tile's end it fetches the next ones). A batch-1 step reads every weight once, and the hardware's
// prefetchers alone left it waiting: measured on the Xeon with AMX (2 threads, q4, 2026-12-05), the 30 layers'
// 63 MiB took 4.7 ms of a batch-1 step fetching nothing ahead, 3.6-3.9 ms 16 blocks ahead and 2.2-2.4 ms 64
// blocks (8 KiB of Q4) ahead, the copy bandwidth; 48 to 128 all did about as well. Past the last tile a
// prefetch is a no-op, never a fault.
template <int fmt>
inline void fetch_ahead(const uint8_t* blk, const uint16_t* dw, const uint16_t* mw, int64_t b, int64_t ahead) {
  for (int i = 0; i < tile_bytes(fmt); i += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blk + ahead * tile_bytes(fmt) + i), _MM_HINT_T0);
  if (fmt != INT8) _mm_prefetch(reinterpret_cast<const char*>(dw + (b + ahead) * TILE), _MM_HINT_T0);
  if (fmt == Q4_1) _mm_prefetch(reinterpret_cast<const char*>(mw + (b + ahead) * TILE), _MM_HINT_T0);
}
constexpr int64_t BLOCKS_AHEAD = 64;

template <int fmt, int R>
void tile_kernel(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t nb, const QRow* a,
                 float out[][TILE]) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  constexpr int tb = tile_bytes(fmt);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = qs + b * tb;
    fetch_ahead<fmt>(blk, dw, mw, b, BLOCKS_AHEAD);
    __m256i w[8];
    if constexpr (fmt == Q4_0 || fmt == Q4_1) {
      for (int p = 0; p < 4; ++p) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * p));
        w[p] = _mm256_and_si256(v, low4);
        w[p + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
    } else {
      for (int j = 0; j < 8; ++j) w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * j));
    }
    constexpr bool signed_w = fmt == Q8_0 || fmt == INT8;
    __m256i wabs[8] = {};
    if constexpr (signed_w)  // u8 x s8 products: |w| times a with w's sign (|w| <= 128 fits a u8)
      for (int j = 0; j < 8; ++j) wabs[j] = _mm256_abs_epi8(w[j]);
    __m256 scale = _mm256_set1_ps(1.f), minv = _mm256_setzero_ps();
    if (fmt != INT8) scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dw + b * TILE)));
    if (fmt == Q4_1) minv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mw + b * TILE)));
    for (int r = 0; r < R; ++r) {
      const int32_t* ah = reinterpret_cast<const int32_t*>(a[r].hi + b * QK);
      const int32_t* al = reinterpret_cast<const int32_t*>(a[r].lo + b * QK);
      __m256i isum;
      if constexpr (signed_w) {
        __m256i sh = _mm256_setzero_si256(), sl = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          sh = dot_u8s8(sh, wabs[j], _mm256_sign_epi8(_mm256_set1_epi32(ah[j]), w[j]));
          sl = dot_u8s8(sl, wabs[j], _mm256_sign_epi8(_mm256_set1_epi32(al[j]), w[j]));
        }
        isum = combine_digits(sh, sl);
      } else {
#if defined(JITNEY_VNNI)
        __m256i sh = _mm256_setzero_si256(), sl = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          sh = _mm256_dpbusd_epi32(sh, w[j], _mm256_set1_epi32(ah[j]));
          sl = _mm256_dpbusd_epi32(sl, w[j], _mm256_set1_epi32(al[j]));
        }
        isum = combine_digits(sh, sl);
#else
        // 4-bit x 8-bit pair sums are at most 2 * 15 * 127 = 3810: eight of them add up in int16 without overflow,
        // and the widening vpmaddwd multiplies the high digit's by RADIX on the way (<= 2 x 30480 x 254 < 2^31).
        __m256i sh = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(ah[0]));
        __m256i sl = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(al[0]));
        for (int j = 1; j < 8; ++j) {
          sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(ah[j])));
          sl = _mm256_add_epi16(sl, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(al[j])));
        }
        isum = _mm256_add_epi32(_mm256_madd_epi16(sh, _mm256_set1_epi16(RADIX)),
                                _mm256_madd_epi16(sl, _mm256_set1_epi16(1)));
#endif
        if (fmt == Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * a[r].sum[b]));
      }
      const float da = a[r].d[b];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scale, _mm256_set1_ps(da)), acc[r]);
      if (fmt == Q4_1) acc[r] = _mm256_fmadd_ps(minv, _mm256_set1_ps(da * float(a[r].sum[b])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], acc[r]);
}

#if defined(JITNEY_VNNI) && defined(__AVX512BW__)
#define JITNEY_VNNI512 1
// Two tiles at once on 16 lanes (512-bit vectors: lanes 0..7 tile t's rows, 8..15 tile t + 1's): half the
// instructions of two tile_kernel calls for the same work. Every lane does tile_kernel's operations in its
// order (the integer sums are exact, the float ones the same FMAs), so an output does not depend on which of
// the two kernels computed it, nor on M or the threads' split.
inline __m512i join(const uint8_t* lo, const uint8_t* hi) {  // 32 bytes of each tile into one vector
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)), 1);
}

inline __m512 join_half(const uint16_t* lo, const uint16_t* hi) {  // 8 fp16 scales of each tile, as float32
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1));
}

// One block's integer sums for one activation row and 16 outputs (digits hi and lo), added to its float32 sums:
// the digits combined, Q4_0's offset, the scales. The one definition of this float work for tile_pair_kernel and
// tile_pair_amx, so that their outputs are the same bits.
template <int fmt>
inline __m512 add_block(__m512 acc, __m512i sh, __m512i sl, __m512 scale, __m512 minv, float da, int32_t sum) {
  __m512i isum = _mm512_add_epi32(_mm512_mullo_epi32(sh, _mm512_set1_epi32(RADIX)), sl);
  if (fmt == Q4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * sum));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(scale, _mm512_set1_ps(da)), acc);
  if (fmt == Q4_1) acc = _mm512_fmadd_ps(minv, _mm512_set1_ps(da * float(sum)), acc);
  return acc;
}

// Block b's 8 K groups of both tiles (lanes 0..7 one tile's rows, 8..15 the other's) as bytes: Q4's nibbles
// unpacked (0..15), Q8_0's and INT8's as stored (signed). What both pair kernels multiply; both tiles' streams
// fetched ahead on the way.
template <int fmt>
inline void pair_groups(const uint8_t* qs0, const uint8_t* qs1, const uint16_t* dw0, const uint16_t* dw1,
                        const uint16_t* mw0, const uint16_t* mw1, int64_t b, __m512i w[8]) {
  const uint8_t *b0 = qs0 + b * tile_bytes(fmt), *b1 = qs1 + b * tile_bytes(fmt);
  fetch_ahead<fmt>(b0, dw0, mw0, b, BLOCKS_AHEAD);
  fetch_ahead<fmt>(b1, dw1, mw1, b, BLOCKS_AHEAD);
  if constexpr (fmt == Q4_0 || fmt == Q4_1) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int p = 0; p < 4; ++p) {
      const __m512i v = join(b0 + 32 * p, b1 + 32 * p);
      w[p] = _mm512_and_si512(v, low4);
      w[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
  } else {
    for (int j = 0; j < 8; ++j) w[j] = join(b0 + 32 * j, b1 + 32 * j);
  }
}

// The two tiles' fp16 scales (and Q4_1's minimums) of block b as float32, lane by lane.
template <int fmt>
inline void block_scales(const uint16_t* dw0, const uint16_t* dw1, const uint16_t* mw0, const uint16_t* mw1,
                         int64_t b, __m512& scale, __m512& minv) {
  scale = fmt == INT8 ? _mm512_set1_ps(1.f) : join_half(dw0 + b * TILE, dw1 + b * TILE);
  minv = fmt == Q4_1 ? join_half(mw0 + b * TILE, mw1 + b * TILE) : _mm512_setzero_ps();
}

template <int fmt, int R>
void tile_pair_kernel(const uint8_t* qs0, const uint8_t* qs1, const uint16_t* dw0, const uint16_t* dw1,
                      const uint16_t* mw0, const uint16_t* mw1, int64_t nb, const QRow* a, float out[][2 * TILE]) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  constexpr bool signed_w = fmt == Q8_0 || fmt == INT8;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i w[8];
    pair_groups<fmt>(qs0, qs1, dw0, dw1, mw0, mw1, b, w);
    __mmask64 neg[8] = {};  // signed weights: |w| as the u8 operand, w's sign moved onto the activation
    if constexpr (signed_w)
      for (int j = 0; j < 8; ++j) {
        neg[j] = _mm512_movepi8_mask(w[j]);
        w[j] = _mm512_abs_epi8(w[j]);
      }
    __m512 scale, minv;
    block_scales<fmt>(dw0, dw1, mw0, mw1, b, scale, minv);
    for (int r = 0; r < R; ++r) {
      const int32_t* ah = reinterpret_cast<const int32_t*>(a[r].hi + b * QK);
      const int32_t* al = reinterpret_cast<const int32_t*>(a[r].lo + b * QK);
      __m512i sh = _mm512_setzero_si512(), sl = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        __m512i h = _mm512_set1_epi32(ah[j]), l = _mm512_set1_epi32(al[j]);
        if constexpr (signed_w) {  // a digit's magnitude is at most 127: its negation is exact
          h = _mm512_mask_sub_epi8(h, neg[j], _mm512_setzero_si512(), h);
          l = _mm512_mask_sub_epi8(l, neg[j], _mm512_setzero_si512(), l);
        }
        sh = _mm512_dpbusd_epi32(sh, w[j], h);
        sl = _mm512_dpbusd_epi32(sl, w[j], l);
      }
      acc[r] = add_block<fmt>(acc[r], sh, sl, scale, minv, a[r].d[b], a[r].sum[b]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], acc[r]);
}

#if defined(JITNEY_AMX_INT8)
constexpr int AROWS = 16;  // activation rows of an AMX task: one A tile's rows

// tile_pair_kernel's integer sums on the AMX tile units, 16 activation rows at a time. Per block: A (tiles 0
// and 1) the rows' 32 high and low digits, 16 rows of 32 bytes straight from the quantized activations; B (tile
// 2) the block's weights of both tiles as 8 rows of 4-byte K groups by 16 output rows, which is the packed layout
// itself (two tiles side by side, Q4's nibbles unpacked to bytes); C (tiles 4 and 5) = A B by TDPBSSD, 16 x 16
// exact int32 sums per digit. They are the integers the VNNI loop computes, and add_block does the float work
// in its order, so the outputs are tile_pair_kernel's bits and a row's result does not depend on which of the
// two its batch size sent it to.
inline void configure_q_tiles() {
  configure_tiles({AROWS, AROWS, 8, 0, AROWS, AROWS, 0, 0}, {QK, QK, 64, 0, 64, 64, 0, 0});
}

template <int fmt>
void tile_pair_amx(const uint8_t* qs0, const uint8_t* qs1, const uint16_t* dw0, const uint16_t* dw1,
                   const uint16_t* mw0, const uint16_t* mw1, int64_t nb, const int8_t* hi, const int8_t* lo,
                   int64_t k, const float* d, const int32_t* sum, float out[][2 * TILE]) {
  alignas(64) int8_t bt[8][64];
  alignas(64) int32_t c[2][AROWS][16];
  __m512 acc[AROWS];
  for (int r = 0; r < AROWS; ++r) acc[r] = _mm512_setzero_ps();
  configure_q_tiles();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i w[8];
    pair_groups<fmt>(qs0, qs1, dw0, dw1, mw0, mw1, b, w);
    for (int j = 0; j < 8; ++j) _mm512_store_si512(bt[j], w[j]);
    _tile_loadd(2, bt, 64);
    _tile_loadd(0, hi + b * QK, k);
    _tile_loadd(1, lo + b * QK, k);
    _tile_zero(4);
    _tile_zero(5);
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(5, 1, 2);
    _tile_stored(4, c[0], 64);
    _tile_stored(5, c[1], 64);
    __m512 scale, minv;
    block_scales<fmt>(dw0, dw1, mw0, mw1, b, scale, minv);
    for (int r = 0; r < AROWS; ++r)
      acc[r] = add_block<fmt>(acc[r], _mm512_load_si512(c[0][r]), _mm512_load_si512(c[1][r]), scale, minv,
                              d[r * nb + b], sum[r * nb + b]);
  }
  _tile_release();
  for (int r = 0; r < AROWS; ++r) _mm512_storeu_ps(out[r], acc[r]);
}
#endif
#endif

#else  // portable: the same tiles, unpacked block by block into plain rows the compiler can vectorize

template <int fmt, int R>
void tile_kernel(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t nb, const QRow* a,
                 float out[][TILE]) {
  float acc[R][TILE] = {};
  constexpr int tb = tile_bytes(fmt);
  int8_t w[TILE][QK];  // this block's weights, lane by lane (Q4: the nibble, 0..15, not yet offset)
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = qs + b * tb;
    for (int j = 0; j < 8; ++j)
      for (int lane = 0; lane < TILE; ++lane)
        for (int t = 0; t < 4; ++t) {
          if (fmt == Q4_0 || fmt == Q4_1) {
            const uint8_t byte = blk[32 * (j & 3) + 4 * lane + t];
            w[lane][4 * j + t] = int8_t(j < 4 ? byte & 0x0f : byte >> 4);
          } else {
            w[lane][4 * j + t] = int8_t(blk[32 * j + 4 * lane + t]);
          }
        }
    for (int r = 0; r < R; ++r) {
      const int8_t* ah = a[r].hi + b * QK;
      const int8_t* al = a[r].lo + b * QK;
      const float da = a[r].d[b];
      for (int lane = 0; lane < TILE; ++lane) {
        int32_t sh = 0, sl = 0;  // integer sums: exact in any order, so vectorizing them changes no result
        for (int i = 0; i < QK; ++i) {
          sh += int32_t(w[lane][i]) * int32_t(ah[i]);
          sl += int32_t(w[lane][i]) * int32_t(al[i]);
        }
        int32_t isum = RADIX * sh + sl;
        if (fmt == Q4_0) isum -= 8 * a[r].sum[b];
        const float scale = fmt == INT8 ? 1.f : half_to_float(dw[b * TILE + lane]);
        acc[r][lane] += float(isum) * (scale * da);
        if (fmt == Q4_1) acc[r][lane] += half_to_float(mw[b * TILE + lane]) * (da * float(a[r].sum[b]));
      }
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(out[r], acc[r], sizeof acc[r]);
}

#endif

#if defined(JITNEY_VNNI512)
constexpr int PAIR = 2;   // tiles per task: tile_pair_kernel
constexpr int MROWS = 8;  // activation rows per task (32 vector registers hold 8 rows' sums beside the weights)
#else
constexpr int PAIR = 1;
constexpr int MROWS = SROWS;
#endif
#if defined(JITNEY_AMX_INT8)
constexpr int GROUP = AROWS;  // activation rows per task: a full group runs on the tiles, a partial one below
bool amx_enabled = true;      // jitney_qmatmul_set_amx: tests compare the two loops
#else
constexpr int GROUP = MROWS;
#endif

// f(std::integral_constant<int, rows>) for rows in 1..R: a kernel's row count as a template argument.
template <int R, typename F>
inline void with_rows(int rows, F&& f) {
  if constexpr (R > 1)
    if (rows < R) return with_rows<R - 1>(rows, f);
  f(std::integral_constant<int, R>{});
}

template <int fmt, typename T>
void qmatmul(const T* x, int64_t ldx, const uint8_t* qs, const uint16_t* dw, const uint16_t* mw,
             const float* row_scale, T* y, int64_t ldy, int64_t m, int64_t n, int64_t k) {
  const int64_t nb = k / QK, tiles = (n + TILE - 1) / TILE;
  std::vector<int8_t> ahi(m * k), alo(m * k);
  std::vector<float> ad(m * nb);
  std::vector<int32_t> asum(m * nb);
#pragma omp parallel for schedule(static) if (m * k >= 4096)
  for (int64_t i = 0; i < m; ++i)
    quantize_row(x + i * ldx, k, &ahi[i * k], &alo[i * k], &ad[i * nb], &asum[i * nb]);
  const int64_t groups = (m + GROUP - 1) / GROUP, units = (tiles + PAIR - 1) / PAIR;
#if defined(JITNEY_AMX_INT8)
  const bool amx = amx_enabled && amx_permitted();
#endif
  // One task: PAIR tiles of 8 output rows for GROUP activation rows. Tiles vary fastest, so that at batch 1 both
  // threads split the weights (the bytes that bound the step) and at large batches a tile's weights stay in cache.
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < units * groups; ++task) {
    const int64_t t = task % units * PAIR, g = task / units, i0 = g * GROUP, rows = std::min<int64_t>(GROUP, m - i0);
    QRow a[GROUP];
    for (int r = 0; r < rows; ++r)
      a[r] = {&ahi[(i0 + r) * k], &alo[(i0 + r) * k], &ad[(i0 + r) * nb], &asum[(i0 + r) * nb]};
    float out[GROUP][PAIR * TILE];
    const int lanes = int(std::min<int64_t>(PAIR * TILE, n - t * TILE));
    const auto tq = [&](int64_t u) { return qs + u * nb * tile_bytes(fmt); };
    const auto tm = [&](const uint16_t* s, int64_t u) { return s ? s + u * nb * TILE : nullptr; };
#if defined(JITNEY_AMX_INT8)
    if (lanes > TILE && rows == AROWS && amx) {
      tile_pair_amx<fmt>(tq(t), tq(t + 1), tm(dw, t), tm(dw, t + 1), tm(mw, t), tm(mw, t + 1), nb, &ahi[i0 * k],
                         &alo[i0 * k], k, &ad[i0 * nb], &asum[i0 * nb], out);
    } else
#endif
#if defined(JITNEY_VNNI512)
    if (lanes > TILE) {
      for (int r0 = 0; r0 < rows; r0 += MROWS)
        with_rows<MROWS>(int(std::min<int64_t>(MROWS, rows - r0)), [&](auto r) {
          tile_pair_kernel<fmt, r.value>(tq(t), tq(t + 1), tm(dw, t), tm(dw, t + 1), tm(mw, t), tm(mw, t + 1), nb,
                                         a + r0, out + r0);
        });
    } else
#endif
    {
      float one[GROUP][TILE];
      for (int r0 = 0; r0 < rows; r0 += SROWS)
        with_rows<SROWS>(int(std::min<int64_t>(SROWS, rows - r0)), [&](auto r) {
          tile_kernel<fmt, r.value>(tq(t), tm(dw, t), tm(mw, t), nb, a + r0, one + r0);
        });
      for (int r = 0; r < rows; ++r) std::memcpy(out[r], one[r], sizeof one[r]);
    }
    for (int r = 0; r < rows; ++r)
      for (int lane = 0; lane < lanes; ++lane) {
        const float v = fmt == INT8 ? out[r][lane] * row_scale[t * TILE + lane] : out[r][lane];
        store(v, y + (i0 + r) * ldy + t * TILE + lane);
      }
  }
}

template <int fmt>
void run(int bf16, const void* x, int64_t ldx, const uint8_t* qs, const uint16_t* dw, const uint16_t* mw,
         const float* row_scale, void* y, int64_t ldy, int64_t m, int64_t n, int64_t k) {
  if (bf16)
    qmatmul<fmt>(static_cast<const uint16_t*>(x), ldx, qs, dw, mw, row_scale, static_cast<uint16_t*>(y), ldy, m,
                 n, k);
  else
    qmatmul<fmt>(static_cast<const float*>(x), ldx, qs, dw, mw, row_scale, static_cast<float*>(y), ldy, m, n, k);
}


// --- dequantization: whole tiles back to plain rows, for the float matmul of large batches -----------------------
//
// quant.py multiplies a large batch by the weights through the compute dtype's own matmul (oneDNN): it turns a
// slice of tiles back into rows of float32 or bfloat16 here, a slice small enough to stay in cache, and hands
// it to torch. Each value is the one QuantWeight.dequantize computes (gguf's formulas in float32: d (q - 8),
// d q + m, d q, s q; d q is exact in float32, so d q + m rounds once, as an FMA does), rounded to bfloat16 to
// nearest even for a bfloat16 compute (the bits torch's cast gives: what an unquantized bfloat16 model holds).
// In a step the weights come from memory, not cache (a model's 92 MiB against a 32 MiB L3): the loop fetches
// 16 blocks ahead (2-4 KiB), which took a dequantization streaming from memory from 0.056 to 0.040 ns a weight
// on Zen 4 (2 threads; 0.034 from cache), where the hardware's prefetchers alone leave it waiting.

// Row r (0..7) of a tile-block, as its 32 values in K order: bytes (Q8_0, INT8: int8; Q4: 0..15).
template <int fmt>
inline void block_row_scalar(const uint8_t* blk, int r, int8_t* q) {
  for (int i = 0; i < QK; ++i) {
    const int t = i & 3;
    if (fmt == Q4_0 || fmt == Q4_1) {
      const uint8_t byte = blk[32 * ((i & 15) >> 2) + 4 * r + t];
      q[i] = int8_t(i < 16 ? byte & 0x0f : byte >> 4);
    } else {
      q[i] = int8_t(blk[32 * (i >> 2) + 4 * r + t]);
    }
  }
}

template <int fmt>
inline float dequant_value(int8_t q, float d, float m) {
  if constexpr (fmt == Q4_0) return d * float(int(q) - 8);
  else if constexpr (fmt == Q4_1) return std::fma(d, float(q), m);  // d q exact: one rounding either way
  else return float(q) * d;  // Q8_0 (d: the block's), INT8 (d: the row's scale)
}

#if defined(JITNEY_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define JITNEY_DEQUANT_AVX512 1
constexpr int64_t AHEAD = 16;  // blocks of a tile fetched ahead of the one being dequantized

// 32 float32 values (lo: the first 16) to bfloat16, to nearest even: the instruction where the CPU has it
// (it flushes subnormals, which no weight is: d q + m with fp16 d and m is 0 or above 2^-24 in magnitude), else
// bf16.h's rule on 16 lanes at a time.
inline __m512i to_bf16(__m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#else
  auto round = [](__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                          _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16));
  };
  return _mm512_inserti64x4(_mm512_castsi256_si512(round(lo)), round(hi), 1);
#endif
}

// One row's 32 values as int32 lanes (k 0..15, k 16..31), scaled (w = q d, or q d + m for Q4_1) and stored.
template <int fmt, typename T>
inline void emit_row(__m512i q0, __m512i q1, __m512 d, __m512 m, T* out) {
  __m512 w0 = _mm512_cvtepi32_ps(q0), w1 = _mm512_cvtepi32_ps(q1);
  if constexpr (fmt == Q4_1) {
    w0 = _mm512_fmadd_ps(w0, d, m);
    w1 = _mm512_fmadd_ps(w1, d, m);
  } else {
    w0 = _mm512_mul_ps(w0, d);
    w1 = _mm512_mul_ps(w1, d);
  }
  if constexpr (sizeof(T) == 4) {
    _mm512_storeu_ps(reinterpret_cast<float*>(out), w0);
    _mm512_storeu_ps(reinterpret_cast<float*>(out) + 16, w1);
  } else {
    _mm512_storeu_si512(out, to_bf16(w0, w1));
  }
}

// Dword transpose of 4 groups: c[j] holds, dword r, row r's 4 bytes of group j; afterwards the 128-bit lane 0
// of u[i] holds row i's groups 0..3 in order and lane 1 row i + 4's.
inline void transpose4(const __m256i c[4], __m256i u[4]) {
  const __m256i t0 = _mm256_unpacklo_epi32(c[0], c[1]), t1 = _mm256_unpackhi_epi32(c[0], c[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(c[2], c[3]), t3 = _mm256_unpackhi_epi32(c[2], c[3]);
  u[0] = _mm256_unpacklo_epi64(t0, t2);
  u[1] = _mm256_unpackhi_epi64(t0, t2);
  u[2] = _mm256_unpacklo_epi64(t1, t3);
  u[3] = _mm256_unpackhi_epi64(t1, t3);
}

template <int fmt, typename T>
void dequant_tile(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, const float* rs, int64_t nb, T* out,
                  int64_t ldo) {
  alignas(32) float d[TILE], m[TILE] = {};
  if (fmt == INT8) _mm256_store_ps(d, _mm256_loadu_ps(rs));
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = qs + b * tile_bytes(fmt);
    fetch_ahead<fmt>(blk, dw, mw, b, AHEAD);  // the section's header says why
    if (fmt != INT8)
      _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dw + b * TILE))));
    if (fmt == Q4_1)
      _mm256_store_ps(m, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mw + b * TILE))));
    if constexpr (fmt == Q4_0 || fmt == Q4_1) {
      __m256i c[4], u[4];
      for (int p = 0; p < 4; ++p) c[p] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * p));
      transpose4(c, u);
      const __m256i low4 = _mm256_set1_epi8(0x0f);
      for (int i = 0; i < 4; ++i) {
        const __m256i lo = _mm256_and_si256(u[i], low4), hi = _mm256_and_si256(_mm256_srli_epi16(u[i], 4), low4);
        for (int half = 0; half < 2; ++half) {
          const int r = i + 4 * half;
          const __m128i l = half ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo);
          const __m128i h = half ? _mm256_extracti128_si256(hi, 1) : _mm256_castsi256_si128(hi);
          const __m512 vd = _mm512_set1_ps(d[r]);
          T* o = out + r * ldo + b * QK;
          if constexpr (sizeof(T) == 2) {
            // 16 possible values per row and block: their bfloat16 table, looked up by the nibbles (vpermw).
            const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const __m512 table = fmt == Q4_1 ? _mm512_fmadd_ps(iota, vd, _mm512_set1_ps(m[r]))
                                             : _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.f)), vd);
            const __m512i idx = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(l), h, 1));
            _mm512_storeu_si512(o, _mm512_permutexvar_epi16(idx, to_bf16(table, table)));
          } else {
            __m512i q0 = _mm512_cvtepu8_epi32(l), q1 = _mm512_cvtepu8_epi32(h);
            if (fmt == Q4_0) {
              q0 = _mm512_sub_epi32(q0, _mm512_set1_epi32(8));
              q1 = _mm512_sub_epi32(q1, _mm512_set1_epi32(8));
            }
            emit_row<fmt>(q0, q1, vd, _mm512_set1_ps(m[r]), o);
          }
        }
      }
    } else {
      __m256i c[8], u[8];
      for (int j = 0; j < 8; ++j) c[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * j));
      transpose4(c, u);          // groups 0..3: row i | row i + 4
      transpose4(c + 4, u + 4);  // groups 4..7
      for (int i = 0; i < 4; ++i) {
        for (int half = 0; half < 2; ++half) {
          const int r = i + 4 * half;
          const __m128i g03 = half ? _mm256_extracti128_si256(u[i], 1) : _mm256_castsi256_si128(u[i]);
          const __m128i g47 = half ? _mm256_extracti128_si256(u[i + 4], 1) : _mm256_castsi256_si128(u[i + 4]);
          emit_row<fmt>(_mm512_cvtepi8_epi32(g03), _mm512_cvtepi8_epi32(g47), _mm512_set1_ps(d[r]),
                        _mm512_setzero_ps(), out + r * ldo + b * QK);
        }
      }
    }
  }
}

#else

template <int fmt, typename T>
void dequant_tile(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, const float* rs, int64_t nb, T* out,
                  int64_t ldo) {
  int8_t q[QK];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = qs + b * tile_bytes(fmt);
    for (int r = 0; r < TILE; ++r) {
      block_row_scalar<fmt>(blk, r, q);
      const float d = fmt == INT8 ? rs[r] : half_to_float(dw[b * TILE + r]);
      const float m = fmt == Q4_1 ? half_to_float(mw[b * TILE + r]) : 0.f;
      T* o = out + r * ldo + b * QK;
      for (int i = 0; i < QK; ++i) store(dequant_value<fmt>(q[i], d, m), o + i);
    }
  }
}

#endif

template <int fmt, typename T>
void dequantize(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, const float* row_scale, int64_t tile0,
                int64_t tiles, int64_t k, T* out, int64_t ldo) {
  const int64_t nb = k / QK;
#pragma omp parallel for schedule(static) if (tiles * k >= 32768)
  for (int64_t t = tile0; t < tile0 + tiles; ++t)
    dequant_tile<fmt>(qs + t * nb * tile_bytes(fmt), dw ? dw + t * nb * TILE : nullptr,
                      mw ? mw + t * nb * TILE : nullptr, row_scale ? row_scale + t * TILE : nullptr, nb,
                      out + (t - tile0) * TILE * ldo, ldo);
}

template <int fmt>
void run_dequantize(int bf16, const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, const float* row_scale,
                    int64_t tile0, int64_t tiles, int64_t k, void* out, int64_t ldo) {
  if (bf16)
    dequantize<fmt>(qs, dw, mw, row_scale, tile0, tiles, k, static_cast<uint16_t*>(out), ldo);
  else
    dequantize<fmt>(qs, dw, mw, row_scale, tile0, tiles, k, static_cast<float*>(out), ldo);
}

}  // namespace

extern "C" {

const char* jitney_qmatmul_isa() {
#if defined(JITNEY_AMX_INT8)
  return amx_enabled && amx_permitted() ? "avx512-vnni + amx-int8 (rows in groups of 16)" : "avx512-vnni";
#elif defined(JITNEY_VNNI)
  return "avx512-vnni";
#elif defined(JITNEY_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// One row's activations as the loop quantizes them (for tests): x [k] in float32 (bf16 = 0) or bfloat16; hi, lo
// [k]; d, sum [k / 32]. scalar: 1 for the one-value-at-a-time rule the vector code must match.
void jitney_qmatmul_quantize_row(int bf16, int scalar, const void* x, int64_t k, int8_t* hi, int8_t* lo, float* d,
                                 int32_t* sum) {
  if (bf16)
    (scalar ? quantize_row_scalar<uint16_t> : quantize_row<uint16_t>)(static_cast<const uint16_t*>(x), k, hi, lo,
                                                                        d, sum);
  else
    (scalar ? quantize_row_scalar<float> : quantize_row<float>)(static_cast<const float*>(x), k, hi, lo, d, sum);
}

// Whether steps of 16 rows and more take the AMX tiles where the CPU and the kernel allow (on by default; tests
// turn it off to compare the VNNI loop's bits). Returns whether they now do.
int jitney_qmatmul_set_amx(int on) {
#if defined(JITNEY_AMX_INT8)
  amx_enabled = on != 0;
  return amx_enabled && amx_permitted();
#else
  (void)on;
  return 0;
#endif
}

// x [m, k] (row stride ldx) in float32 (bf16 = 0) or bfloat16 (bf16 = 1); y [m, n] (row stride ldy) in the
// same dtype. k is a multiple of 32. qs, dw, mw, row_scale: the tiles quant.py packs (dw unused for INT8, mw
// only for Q4_1, row_scale only for INT8, padded to whole tiles).
void jitney_qmatmul(int fmt, int bf16, const void* x, int64_t ldx, const uint8_t* qs, const uint16_t* dw,
                    const uint16_t* mw, const float* row_scale, void* y, int64_t ldy, int64_t m, int64_t n,
                    int64_t k) {
  switch (fmt) {
    case Q4_0: return run<Q4_0>(bf16, x, ldx, qs, dw, mw, row_scale, y, ldy, m, n, k);
    case Q4_1: return run<Q4_1>(bf16, x, ldx, qs, dw, mw, row_scale, y, ldy, m, n, k);
    case Q8_0: return run<Q8_0>(bf16, x, ldx, qs, dw, mw, row_scale, y, ldy, m, n, k);
    default: return run<INT8>(bf16, x, ldx, qs, dw, mw, row_scale, y, ldy, m, n, k);
  }
}

// Tiles tile0 .. tile0 + tiles - 1 of a quantized weight (the pointers as for jitney_qmatmul, from tile 0) as
// plain rows: out [tiles * 8, k] (row stride ldo) in float32 (bf16 = 0) or bfloat16 (bf16 = 1); padded rows
// come out as zeros (zero scales).
void jitney_dequantize(int fmt, int bf16, const uint8_t* qs, const uint16_t* dw, const uint16_t* mw,
                       const float* row_scale, int64_t tile0, int64_t tiles, int64_t k, void* out, int64_t ldo) {
  switch (fmt) {
    case Q4_0: return run_dequantize<Q4_0>(bf16, qs, dw, mw, row_scale, tile0, tiles, k, out, ldo);
    case Q4_1: return run_dequantize<Q4_1>(bf16, qs, dw, mw, row_scale, tile0, tiles, k, out, ldo);
    case Q8_0: return run_dequantize<Q8_0>(bf16, qs, dw, mw, row_scale, tile0, tiles, k, out, ldo);
    default: return run_dequantize<INT8>(bf16, qs, dw, mw, row_scale, tile0, tiles, k, out, ldo);
  }
}

}  // extern "C"
