// Prefill attention on the CPU as tiles of matrix products: a tile of a prompt chunk's query rows (every query
// head of one kv head's group) against tiles of 64 cached keys and values at a time, with an online softmax
// (FlashAttention's loop). The row kernel (paged_attention.cpp) reads each key and value once per query row and
// reduces each dot product across a vector; here the keys and values of a chunk's context are packed once
// (pack_tile) and every row tile multiplies against them with VDPBF16PS: pairs of bfloat16 multiplied exactly
// and summed in float32, sixteen keys (or sixteen output elements) per instruction.
//
// A chunk's row i sits at position first_pos + i and attends to positions 0 .. first_pos + i of its sequence,
// read through the sequence's block table: a fresh prompt (first_pos 0) and a chunk that continues a cached
// prefix (first_pos > 0) are the same loop. Tasks are (chunk, kv head, row tile), latest rows first, on the
// process's OpenMP threads (libgomp, shared with PyTorch).
//
// The softmax weights are rounded to bfloat16 for the second product (as PyTorch's and FlashAttention's bf16
// kernels do), and the row sums that normalise the output are taken over the rounded weights, so the output is
// a weighted mean of the values: its error is bounded by the weights' rounding (2^-9 relative) times the
// values' magnitude, on top of the output's own bfloat16 rounding.
//
// An int8 cache (rows of head_dim int8 values and a float32 scale, kv_cache.py) runs the same loop with two
// changes, both exact where the bfloat16 one rounds: keys are packed as int16 pairs and each query is held as
// int16 on a power-of-two scale (to 2^-14 of its largest element, finer than its bfloat16 bits: what the
// decode kernel does for bfloat16 queries), so the score products are integer dot products (VPDPWSSD) and only
// the key's and query's scales multiply in float32; values are packed as bfloat16, which holds every int8
// value exactly, and each value row's scale goes into its softmax weight before that is rounded (the
// normaliser sums the weights without it), so the error bound is the bfloat16 cache's.
//
// On a CPU with AMX (Intel Xeons since Sapphire Rapids) a bfloat16 cache's tiles run on the tile units instead
// (tile_amx: both products as TDPBF16PS, 16 query vectors at a time; 2.6x the dot-product loop on a 512-token
// prompt, measured 2026-12-05); the online softmax between the products stays on AVX-512 and takes about two
// thirds of that loop's time (docs/benchmarks.md). An int8 cache keeps the dot-product loop.
//
// Only built with AVX512-BF16 (Zen 4, Xeons since Cooper Lake): elsewhere jitney_prefill_supported says no
// and prompt rows run on the row kernel. Built and loaded by model_runner/native.py (plain C ABI).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(JITNEY_PORTABLE)
#define JITNEY_DPBF16 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define JITNEY_AMX 1  // Intel Xeons since Sapphire Rapids: both products on the tile units (tile_amx)
#include "amx.h"   // amx_permitted, configure_tiles
#endif
#endif

namespace {

#include "bf16.h"     // to_float, store
#include "softmax.h"  // exp_nonpositive, exp512_nonpositive

#ifdef JITNEY_DPBF16
#include "int16_query.h"  // int16_step, dot_pairs (the int8 cache's scores)

constexpr int MAX_M = 128;  // query vectors per task (rows x the group's heads)
constexpr int MAX_GROUP = 16;
constexpr int TK = 64;       // keys per tile: the softmax's horizontal max and sum, once per vector and tile,
constexpr int NS = TK / 16;  // then cost a fraction of the products; NS score vectors per query vector

// Where position `pos` of a sequence lives in one kv head's blocks [num_blocks, block_size, HD].
template <typename T>
inline const T* token_row(const T* base, const int32_t* table, int pos, int block_size, int hd) {
  return base + (int64_t(table[pos / block_size]) * block_size + pos % block_size) * hd;
}

// Packs keys and values k0 .. k0 + TK - 1 of one sequence's kv head (k, v: that head's blocks) for tile_bf16,
// once per chunk, head and tile (every row tile of the chunk reads them): keys in pairs along the head
// dimension (kp[d / 2][t] holds elements d and d + 1 of key t), so one VDPBF16PS gives 16 keys' partial dot
// products with a broadcast pair of query elements; values in pairs along the keys (vp[t / 2][d] holds
// element d of keys t and t + 1), so one adds 16 elements of two keys' weighted values. Keys at or past `n`
// are zeros.
template <int HD>
void pack_tile(const uint16_t* k, const uint16_t* v, const int32_t* table, int block_size, int k0, int n,
               uint32_t (*kp)[TK], uint32_t (*vp)[HD]) {
  for (int t = 0; t < TK; t += 2) {
    uint32_t kr[2][HD / 2] = {};  // copied, not cast: reading bfloat16 data through a uint32_t pointer breaks aliasing
    uint16_t vr[2][HD] = {};
    for (int u = 0; u < 2; u++) {
      if (k0 + t + u < n) {
        std::memcpy(kr[u], token_row(k, table, k0 + t + u, block_size, HD), sizeof kr[u]);
        std::memcpy(vr[u], token_row(v, table, k0 + t + u, block_size, HD), sizeof vr[u]);
      }
    }
    for (int d = 0; d < HD / 2; d++) kp[d][t] = kr[0][d], kp[d][t + 1] = kr[1][d];
    for (int d = 0; d < HD; d++) vp[t / 2][d] = uint32_t(vr[0][d]) | uint32_t(vr[1][d]) << 16;
  }
}

// pack_tile for an int8 cache (rows of HD values, then the float32 scale): keys as int16 pairs along the head
// dimension (kp[d / 2][t]: elements d and d + 1 of key t), values as bfloat16 pairs along the keys (exact: an
// int8 value has at most 8 significant bits), and each key's and value's row scale (ks[t], vs[t]; 0 past `n`).
template <int HD>
void pack_tile_q8(const int8_t* k, const int8_t* v, const int32_t* table, int block_size, int k0, int n,
                  uint32_t (*kp)[TK], uint32_t (*vp)[HD], float* ks, float* vs) {
  constexpr int RS = HD + 4;  // bytes from one cached row to the next
  for (int t = 0; t < TK; t += 2) {
    int8_t kr[2][HD] = {}, vr[2][HD] = {};
    for (int u = 0; u < 2; u++) {
      ks[t + u] = vs[t + u] = 0.f;
      if (k0 + t + u < n) {
        const int8_t* krow = token_row(k, table, k0 + t + u, block_size, RS);
        const int8_t* vrow = token_row(v, table, k0 + t + u, block_size, RS);
        std::memcpy(kr[u], krow, HD);
        std::memcpy(vr[u], vrow, HD);
        std::memcpy(&ks[t + u], krow + HD, sizeof(float));
        std::memcpy(&vs[t + u], vrow + HD, sizeof(float));
      }
    }
    for (int d = 0; d < HD / 2; d++)
      for (int u = 0; u < 2; u++)
        kp[d][t + u] = uint32_t(uint16_t(int16_t(kr[u][2 * d]))) | uint32_t(uint16_t(int16_t(kr[u][2 * d + 1]))) << 16;
    for (int d = 0; d < HD; d++) {
      uint16_t b0, b1;
      store(float(vr[0][d]), &b0);  // exact
      store(float(vr[1][d]), &b1);
      vp[t / 2][d] = uint32_t(b0) | uint32_t(b1) << 16;
    }
  }
}

// The online softmax of one query vector over one key tile: its scores s (NS vectors of 16 keys; unscaled, or
// with Q8 already scaled) become weights under the running maximum, -inf past the `seen` keys it may see (of
// the tile's n), rounded to bfloat16 in wp (pairs of keys, the second product's operand). The row sum that
// normalises the output is taken over the rounded weights, so the output stays a weighted mean of the values;
// with Q8 the weights carry their value rows' scales (vscale: the tile's TK, the values being raw int8) and
// the row sum is of the weights alone, unrounded. Returns the factor the vector's accumulator is rescaled by.
template <bool Q8>
inline float softmax_tile(__m512* s, int seen, int n, float scale, const float* vscale, uint32_t* wp,
                          float& running_max, float& denom) {
  seen = std::max(0, std::min(seen, n));
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int c = 0; c < NS; c++) {  // scaled scores, -inf where masked
    const int in = std::min(std::max(seen - 16 * c, 0), 16);
    s[c] = _mm512_mask_blend_ps(__mmask16((1u << in) - 1), _mm512_set1_ps(-INFINITY),
                                Q8 ? s[c] : _mm512_mul_ps(s[c], _mm512_set1_ps(scale)));
    mx = _mm512_max_ps(mx, s[c]);
  }
  const float m_new = std::max(running_max, _mm512_reduce_max_ps(mx));
  const float correction = exp_nonpositive(running_max - m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < NS; c++) {
    const __m512 p = exp512_nonpositive(_mm512_sub_ps(s[c], _mm512_set1_ps(m_new)));
    __m256bh w;
    if constexpr (Q8) {
      w = _mm512_cvtneps_pbh(_mm512_mul_ps(p, _mm512_loadu_ps(vscale + 16 * c)));
      sum = _mm512_add_ps(sum, p);
    } else {
      w = _mm512_cvtneps_pbh(p);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)w), 16)));
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(wp + 8 * c), (__m256i)w);
  }
  running_max = m_new;
  denom = denom * correction + _mm512_reduce_add_ps(sum);
  return correction;
}

// One task: `rows` query rows (first at position first_pos) x `group` heads from head0, against keys
// 0 .. first_pos + rows - 1 of one kv head, packed (pack_tile, or pack_tile_q8 when Q8, with the rows' scales
// in kscale and vscale, TK a tile). q and out rows are q_stride / out_stride elements apart, heads contiguous.
// Both products on VDPBF16PS (the scores on VPDPWSSD when Q8), TK keys and B query vectors at a time
// (B x (TK + HD) / 16 accumulators in registers).
template <int HD, bool Q8>
void tile(const uint16_t* q, int64_t q_stride, int head0, int group, int rows, int first_pos,
          const uint32_t* kpack, const uint32_t* vpack, const float* kscale, const float* vscale, uint16_t* out,
          int64_t out_stride, float scale) {
  static_assert(HD % 32 == 0, "whole 512-bit vectors of bfloat16 pairs");
  constexpr int64_t TILE_WORDS = int64_t(TK) * HD / 2;  // one packed tile: TK keys x HD elements in pairs
  constexpr int NV = HD / 16;  // float32 vectors per output row
  constexpr int B = 2;         // query vectors at a time
  const int m_total = rows * group;
  alignas(64) uint32_t qp[MAX_M + B][HD / 2] = {};  // each query's elements in pairs (scale goes on scores)
  alignas(64) __m512 acc[MAX_M + B][NV];
  float running_max[MAX_M + B], denom[MAX_M + B], q_scale[MAX_M + B];  // q_scale: Q8's, times `scale`
  for (int m = 0; m < MAX_M + B; m++) {
    q_scale[m] = 0.f;
    if (m < m_total) {
      const uint16_t* qrow = q + int64_t(m / group) * q_stride + int64_t(head0 + m % group) * HD;
      if constexpr (Q8) {  // q = s qi, qi int16 with |qi| <= 2^14, s a power of two: to within s / 2
        float amax = 0.f;
        for (int d = 0; d < HD; d++) amax = std::max(amax, std::fabs(to_float(qrow[d])));
        const float sq = int16_step(amax);
        for (int d = 0; d < HD; d += 2) {
          const int16_t lo = int16_t(std::nearbyint(to_float(qrow[d]) / sq));
          const int16_t hi = int16_t(std::nearbyint(to_float(qrow[d + 1]) / sq));
          qp[m][d / 2] = uint32_t(uint16_t(lo)) | uint32_t(uint16_t(hi)) << 16;
        }
        q_scale[m] = sq * scale;
      } else {
        std::memcpy(qp[m], qrow, sizeof qp[m]);
      }
    }
    for (int j = 0; j < NV; j++) acc[m][j] = _mm512_setzero_ps();
    running_max[m] = -INFINITY;
    denom[m] = 0.f;
  }
  const int context = first_pos + rows;
  for (int k0 = 0; k0 < context; k0 += TK) {
    const int n = std::min(TK, context - k0);
    const uint32_t (*kp)[TK] = reinterpret_cast<const uint32_t (*)[TK]>(kpack + int64_t(k0 / TK) * TILE_WORDS);
    const uint32_t (*vp)[HD] = reinterpret_cast<const uint32_t (*)[HD]>(vpack + int64_t(k0 / TK) * TILE_WORDS);
    // Every loop below runs a fixed count (the tile's keys past n are zeros, their weights 0), so the
    // compiler unrolls them and keeps scores and accumulators in registers.
    for (int m0 = std::max(0, k0 - first_pos) * group / B * B; m0 < m_total; m0 += B) {
      __m512 s[B][NS];  // unscaled scores
      if constexpr (Q8) {
        __m512i si[B][NS];
        for (int i = 0; i < B; i++)
          for (int c = 0; c < NS; c++) si[i][c] = _mm512_setzero_si512();
        for (int d = 0; d < HD / 2; d++) {
          __m512i qd[B];
          for (int i = 0; i < B; i++) qd[i] = _mm512_set1_epi32(int32_t(qp[m0 + i][d]));
          for (int c = 0; c < NS; c++) {
            const __m512i kd = _mm512_load_si512(kp[d] + 16 * c);
            for (int i = 0; i < B; i++) si[i][c] = dot_pairs(si[i][c], kd, qd[i]);
          }
        }
        const float* ks = kscale + int64_t(k0 / TK) * TK;
        for (int i = 0; i < B; i++)
          for (int c = 0; c < NS; c++)  // integer sums exact (|qi k| < 2^21, HD of them), then the scales
            s[i][c] = _mm512_mul_ps(_mm512_cvtepi32_ps(si[i][c]), _mm512_mul_ps(_mm512_loadu_ps(ks + 16 * c),
                                                                                _mm512_set1_ps(q_scale[m0 + i])));
      } else {
        for (int i = 0; i < B; i++)
          for (int c = 0; c < NS; c++) s[i][c] = _mm512_setzero_ps();
        for (int d = 0; d < HD / 2; d++) {
          __m512bh qd[B];
          for (int i = 0; i < B; i++) qd[i] = (__m512bh)_mm512_set1_epi32(qp[m0 + i][d]);
          for (int c = 0; c < NS; c++) {
            const __m512bh kd = (__m512bh)_mm512_load_si512(kp[d] + 16 * c);
            for (int i = 0; i < B; i++) s[i][c] = _mm512_dpbf16_ps(s[i][c], kd, qd[i]);
          }
        }
      }
      alignas(64) uint32_t wp[B][TK / 2];  // each vector's weights, rounded to bfloat16, in pairs of keys
      __m512 a[B][NV];
      for (int i = 0; i < B; i++) {
        const int m = m0 + i;
        const float correction = softmax_tile<Q8>(s[i], first_pos + m / group - k0 + 1, n, scale,
                                                  Q8 ? vscale + int64_t(k0 / TK) * TK : nullptr, wp[i],
                                                  running_max[m], denom[m]);
        const __m512 cv = _mm512_set1_ps(correction);
        for (int j = 0; j < NV; j++) a[i][j] = _mm512_mul_ps(acc[m][j], cv);
      }
      for (int t = 0; t < TK / 2; t++) {
        __m512bh wt[B];
        for (int i = 0; i < B; i++) wt[i] = (__m512bh)_mm512_set1_epi32(wp[i][t]);
        for (int j = 0; j < NV; j++) {
          const __m512bh vj = (__m512bh)_mm512_load_si512(vp[t] + j * 16);
          for (int i = 0; i < B; i++) a[i][j] = _mm512_dpbf16_ps(a[i][j], vj, wt[i]);
        }
      }
      for (int i = 0; i < B; i++)
        for (int j = 0; j < NV; j++) acc[m0 + i][j] = a[i][j];
    }
  }
  for (int m = 0; m < m_total; m++) {
    uint16_t* orow = out + int64_t(m / group) * out_stride + int64_t(head0 + m % group) * HD;
    alignas(64) float o[HD];
    for (int j = 0; j < NV; j++) _mm512_store_ps(o + j * 16, acc[m][j]);
    const float inv = 1.f / denom[m];
    for (int d = 0; d < HD; d++) store(o[d] * inv, &orow[d]);
  }
}

#ifdef JITNEY_AMX
// Every tile register as 16 rows of 64 bytes: 16 x 32 bfloat16 (the products' operands, B in pairs) or
// 16 x 16 float32 (their sums).
void configure_square_tiles() {
  configure_tiles({16, 16, 16, 16, 16, 16, 16, 16}, {64, 64, 64, 64, 64, 64, 64, 64});
}

// Columns 16 j .. 16 j + 15 of a block's weighted values into tile register C: the weights (tiles 4 and 6, keys
// 0..31 and 32..63) times the packed values (vp: pairs of keys, HD elements a row), B tiles through 5 and 7. A
// macro: GCC's tile intrinsics paste the register number into the instruction's text.
#define JITNEY_PV_TILE(C, vp, j, HD)              \
  do {                                            \
    _tile_zero(C);                                \
    _tile_loadd(5, &(vp)[0][16 * (j)], (HD) * 4); \
    _tile_dpbf16ps(C, 4, 5);                      \
    _tile_loadd(7, &(vp)[16][16 * (j)], (HD) * 4); \
    _tile_dpbf16ps(C, 6, 7);                      \
  } while (0)

// tile<HD, false> on the AMX units: the same task, packs, online softmax and rounding, with both products as
// TDPBF16PS on 16 query vectors at a time (one instruction: 16 vectors x 16 keys x 32 elements). A vector's
// scores and weighted values are sums over the head dimension and the tile's keys in the hardware's fixed
// order, whatever the other 15 vectors of its block, so a row's output does not depend on its companions.
// The scores go through memory to the softmax (AVX-512), and each tile's weighted values are added to the
// accumulators there, after the rescaling the running maximum asks for.
template <int HD>
void tile_amx(const uint16_t* q, int64_t q_stride, int head0, int group, int rows, int first_pos,
              const uint32_t* kpack, const uint32_t* vpack, uint16_t* out, int64_t out_stride, float scale) {
  constexpr int64_t TILE_WORDS = int64_t(TK) * HD / 2;
  constexpr int NV = HD / 16;
  static_assert(TK == 64 && HD % 64 == 0, "four 16-key score tiles, two 32-key weight tiles, 64 outputs a step");
  const int m_total = rows * group;
  const int blocks = (m_total + 15) / 16;
  alignas(64) uint16_t qb[MAX_M][HD];  // the task's query vectors, zeros past m_total
  alignas(64) float acc[MAX_M][HD];
  alignas(64) float sc[16][TK];        // one block's scores
  alignas(64) uint32_t wb[16][TK / 2]; // its weights, bfloat16 in key order (pairs of keys per word)
  alignas(64) float pv[16][64];        // 64 columns of its weighted values
  float correction[16];                // each vector's rescaling for this tile (softmax_tile)
  float running_max[MAX_M], denom[MAX_M];
  for (int m = 0; m < blocks * 16; m++) {
    if (m < m_total)
      std::memcpy(qb[m], q + int64_t(m / group) * q_stride + int64_t(head0 + m % group) * HD, sizeof qb[m]);
    else
      std::memset(qb[m], 0, sizeof qb[m]);
    std::memset(acc[m], 0, sizeof acc[m]);
    running_max[m] = -INFINITY;
    denom[m] = 0.f;
  }
  configure_square_tiles();
  const int context = first_pos + rows;
  for (int k0 = 0; k0 < context; k0 += TK) {
    const int n = std::min(TK, context - k0);
    const uint32_t (*kp)[TK] = reinterpret_cast<const uint32_t (*)[TK]>(kpack + int64_t(k0 / TK) * TILE_WORDS);
    const uint32_t (*vp)[HD] = reinterpret_cast<const uint32_t (*)[HD]>(vpack + int64_t(k0 / TK) * TILE_WORDS);
    for (int b = std::max(0, k0 - first_pos) * group / 16; b < blocks; b++) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int ds = 0; ds < HD / 32; ds++) {  // 32 elements of the head dimension a step
        _tile_loadd(4, &qb[16 * b][32 * ds], HD * 2);
        _tile_loadd(5, &kp[16 * ds][0], TK * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, &kp[16 * ds][16], TK * 4);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, &kp[16 * ds][32], TK * 4);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, &kp[16 * ds][48], TK * 4);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, &sc[0][0], TK * 4);
      _tile_stored(1, &sc[0][16], TK * 4);
      _tile_stored(2, &sc[0][32], TK * 4);
      _tile_stored(3, &sc[0][48], TK * 4);
      for (int i = 0; i < 16; i++) {
        const int m = 16 * b + i;
        if (m >= m_total) {
          std::memset(wb[i], 0, sizeof wb[i]);
          continue;
        }
        __m512 s[NS];
        for (int c = 0; c < NS; c++) s[c] = _mm512_load_ps(&sc[i][16 * c]);
        correction[i] = softmax_tile<false>(s, first_pos + m / group - k0 + 1, n, scale, nullptr, wb[i],
                                            running_max[m], denom[m]);
      }
      _tile_loadd(4, &wb[0][0], TK * 2);   // keys 0..31 of the block's 16 vectors
      _tile_loadd(6, &wb[0][16], TK * 2);  // keys 32..63
      for (int j0 = 0; j0 < NV; j0 += 4) {  // 64 output elements a step, four independent sums
        JITNEY_PV_TILE(0, vp, j0, HD);
        JITNEY_PV_TILE(1, vp, j0 + 1, HD);
        JITNEY_PV_TILE(2, vp, j0 + 2, HD);
        JITNEY_PV_TILE(3, vp, j0 + 3, HD);
        _tile_stored(0, &pv[0][0], 256);
        _tile_stored(1, &pv[0][16], 256);
        _tile_stored(2, &pv[0][32], 256);
        _tile_stored(3, &pv[0][48], 256);
        for (int i = 0; i < 16 && 16 * b + i < m_total; i++) {  // rescaled to the new maximum, plus this tile's
          const __m512 cv = _mm512_set1_ps(correction[i]);
          for (int u = 0; u < 4; u++) {
            float* a = &acc[16 * b + i][16 * (j0 + u)];
            _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_load_ps(a), cv, _mm512_load_ps(&pv[i][16 * u])));
          }
        }
      }
    }
  }
  _tile_release();
  for (int m = 0; m < m_total; m++) {
    uint16_t* orow = out + int64_t(m / group) * out_stride + int64_t(head0 + m % group) * HD;
    const float inv = 1.f / denom[m];
    for (int d = 0; d < HD; d++) store(acc[m][d] * inv, &orow[d]);
  }
}
#endif  // JITNEY_AMX

struct Task {
  int chunk, row0, rows, head;
};

// cache: bfloat16 (uint16_t) rows of HD, or with Q8 int8 rows of HD + 4 bytes.
template <int HD, bool Q8>
void prefill_attention(const uint16_t* q, int64_t q_stride, const void* cache, const int32_t* block_tables,
                       int64_t table_stride, const int32_t* chunks, int num_chunks, uint16_t* out, int heads,
                       int kv_heads, int64_t num_blocks, int block_size, float scale, bool amx) {
  constexpr int64_t TILE_WORDS = int64_t(TK) * HD / 2;
  const int group = heads / kv_heads;
  const int tile_rows = std::max(1, MAX_M / group);
  const int64_t head_stride = num_blocks * block_size * (Q8 ? HD + 4 : HD);  // elements of one kv head's blocks
  // Packed keys and values: for each chunk and kv head, its context's tiles (pack_tile).
  std::vector<int64_t> first_tile(num_chunks + 1, 0);
  for (int c = 0; c < num_chunks; c++)
    first_tile[c + 1] = first_tile[c] + (chunks[3 * c + 2] + chunks[3 * c + 1] + TK - 1) / TK;
  const int64_t tiles = first_tile[num_chunks];
  // 64-byte aligned (the tile loop's vector loads): a multiple of 64 bytes, as aligned_alloc asks.
  struct Free { void operator()(uint32_t* p) const { std::free(p); } };
  const size_t bytes = size_t(std::max<int64_t>(tiles, 1) * kv_heads * TILE_WORDS) * sizeof(uint32_t);
  std::unique_ptr<uint32_t, Free> kp(static_cast<uint32_t*>(std::aligned_alloc(64, bytes)));
  std::unique_ptr<uint32_t, Free> vp(static_cast<uint32_t*>(std::aligned_alloc(64, bytes)));
  uint32_t* kpack = kp.get();
  uint32_t* vpack = vp.get();
  // Q8: each packed key's and value's row scale, TK a tile, in the packs' order.
  std::vector<float> kscale(Q8 ? std::max<int64_t>(tiles, 1) * kv_heads * TK : 0), vscale(kscale.size());
  std::vector<Task> tasks;
  for (int c = 0; c < num_chunks; c++)
    for (int r = 0; r < chunks[3 * c + 1]; r += tile_rows)
      for (int h = 0; h < kv_heads; h++) tasks.push_back({c, r, std::min(tile_rows, chunks[3 * c + 1] - r), h});
  // Latest rows first (they see the most keys): the dynamic schedule then ends on short tasks.
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return chunks[3 * a.chunk + 2] + a.row0 > chunks[3 * b.chunk + 2] + b.row0;
  });
  const int64_t out_stride = int64_t(heads) * HD;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < tiles * kv_heads; i++) {
      const int64_t tile = i / kv_heads;
      const int h = int(i % kv_heads);
      const int c = int(std::upper_bound(first_tile.begin(), first_tile.end(), tile) - first_tile.begin()) - 1;
      const int32_t* table = block_tables + int64_t(chunks[3 * c]) * table_stride;
      const int64_t at = (first_tile[c] * kv_heads + int64_t(h) * (first_tile[c + 1] - first_tile[c])
                          + tile - first_tile[c]) * TILE_WORDS;
      const int k0 = int(tile - first_tile[c]) * TK, n = chunks[3 * c + 2] + chunks[3 * c + 1];
      if constexpr (Q8) {
        const int8_t* base = static_cast<const int8_t*>(cache);
        pack_tile_q8<HD>(base + h * head_stride, base + (kv_heads + h) * head_stride, table, block_size, k0, n,
                         reinterpret_cast<uint32_t (*)[TK]>(kpack + at), reinterpret_cast<uint32_t (*)[HD]>(vpack + at),
                         kscale.data() + at / TILE_WORDS * TK, vscale.data() + at / TILE_WORDS * TK);
      } else {
        const uint16_t* base = static_cast<const uint16_t*>(cache);
        pack_tile<HD>(base + h * head_stride, base + (kv_heads + h) * head_stride, table, block_size, k0, n,
                      reinterpret_cast<uint32_t (*)[TK]>(kpack + at), reinterpret_cast<uint32_t (*)[HD]>(vpack + at));
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < tasks.size(); i++) {
      const Task& t = tasks[i];
      const int64_t row = chunks[3 * t.chunk] + t.row0;  // the task's first row of the step
      const int64_t at = (first_tile[t.chunk] * kv_heads
                          + int64_t(t.head) * (first_tile[t.chunk + 1] - first_tile[t.chunk])) * TILE_WORDS;
      const float* ks = Q8 ? kscale.data() + at / TILE_WORDS * TK : nullptr;
      const float* vs = Q8 ? vscale.data() + at / TILE_WORDS * TK : nullptr;
#ifdef JITNEY_AMX
      if (!Q8 && amx) {
        tile_amx<HD>(q + row * q_stride, q_stride, t.head * group, group, t.rows, chunks[3 * t.chunk + 2] + t.row0,
                     kpack + at, vpack + at, out + row * out_stride, out_stride, scale);
        continue;
      }
#endif
      tile<HD, Q8>(q + row * q_stride, q_stride, t.head * group, group, t.rows, chunks[3 * t.chunk + 2] + t.row0,
                   kpack + at, vpack + at, ks, vs, out + row * out_stride, out_stride, scale);
    }
  }
}

#endif  // JITNEY_DPBF16

}  // namespace

extern "C" {

// Whether this build has the loop (AVX512-BF16) and a layer of this shape runs on it: head sizes 64 and 128,
// groups up to MAX_GROUP.
int jitney_prefill_supported(int heads, int kv_heads, int head_dim) {
#ifdef JITNEY_DPBF16
  return kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_GROUP &&
         (head_dim == 64 || head_dim == 128);
#else
  (void)heads, (void)kv_heads, (void)head_dim;
  return 0;
#endif
}

// Whether this build has the AMX loop (tile_amx) and the kernel granted this process the tile registers: then
// a bfloat16 cache's prompt chunks run on it unless a call asks for the dot-product loop (amx = 0).
int jitney_prefill_amx() {
#ifdef JITNEY_AMX
  return amx_permitted();
#else
  return 0;
#endif
}

// q [rows, heads, head_dim] bfloat16 (q_stride elements between rows, heads contiguous); cache: one layer's
// [2, kv_heads, num_blocks, block_size, head_dim] bfloat16, or with kv_int8 rows of head_dim int8 values and
// their float32 scale (head_dim + 4 bytes); block_tables [rows, table_stride] int32, the table
// of a chunk's sequence at the chunk's first row; chunks [num_chunks, 3] int32: (first row, rows, position of
// the first row); out [rows, heads, head_dim] contiguous: only the chunks' rows are written. Callers check
// jitney_prefill_supported. amx: the bfloat16 cache's loop, AMX tiles (where jitney_prefill_amx) or dot products.
void jitney_prefill_attention(int kv_int8, int amx, const uint16_t* q, int64_t q_stride, const void* cache,
                              const int32_t* block_tables, int64_t table_stride, const int32_t* chunks,
                              int num_chunks, uint16_t* out, int heads, int kv_heads, int head_dim,
                              int64_t num_blocks, int block_size, float scale) {
#ifdef JITNEY_DPBF16
  const auto run = kv_int8 ? (head_dim == 64 ? prefill_attention<64, true> : prefill_attention<128, true>)
                           : (head_dim == 64 ? prefill_attention<64, false> : prefill_attention<128, false>);
  run(q, q_stride, cache, block_tables, table_stride, chunks, num_chunks, out, heads, kv_heads, num_blocks,
      block_size, scale, amx && jitney_prefill_amx());
#endif
}

}  // extern "C"
