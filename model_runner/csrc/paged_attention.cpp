// Paged attention on the CPU, one query row at a time: a decode token, or one token of a prompt chunk. Row i
// attends to the first context_lens[i] tokens of its sequence, read in place through the sequence's block
// table (no gathered copy, no mask), with an online softmax (one pass over the context, as in FlashAttention
// and vLLM's paged-attention kernel).
//
// One task is one (row, kv head): the query heads that share that kv head (grouped-query attention) are
// attended together, so each cached key and value row is read once per task. Rows of one prompt chunk share
// their sequence's blocks, which then stay in cache from one row to the next; the 8-lane loop (AVX2) takes up
// to eight of them in one task (row_tiles), sharing each key and value load, with each row's arithmetic
// exactly that of the row alone (a 512-token float32 prompt's attention 1.4x faster on AMD Zen 3). Tasks run on the
// OpenMP threads of the process (built with g++: the same libgomp as PyTorch's, one shared thread pool).
//
// The cache holds float32, bfloat16 or int8 rows (--kv-cache-dtype int8: model_runner/kv_cache.py's layout, each
// row's head_dim int8 values followed by its float32 scale). Int8 rows are quantized as written (write_kv) and
// widened back to float32 as read, inside the loops below: a row's scale multiplies its key's score (once per
// group of keys, not per element) and its value's softmax weight.
//
// Built and loaded by model_runner/native.py; plain C ABI, no PyTorch headers (a build takes seconds, not the
// minute a PyTorch extension takes).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// Which loops a build holds follows from the instruction set it is compiled for (native.py's JITNEY_ISA):
// JITNEY_AVX512 where the CPU has AVX-512 (-march=native on such a CPU), JITNEY_AVX2 where it has AVX2 and FMA
// (x86-64-v3 and every AVX-512 CPU: the 8-lane kernel also serves what the AVX-512 one does not take).
// JITNEY_PORTABLE (set for JITNEY_ISA=portable) compiles the intrinsic paths out: the portable loops alone, as
// an Arm machine runs them, on any CPU.
#if defined(__AVX512F__) && !defined(JITNEY_PORTABLE)
#define JITNEY_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(JITNEY_PORTABLE)
#define JITNEY_AVX2 1
#endif
#if defined(JITNEY_AVX512) || defined(JITNEY_AVX2)
#include <immintrin.h>
#endif

// The build is two translation units of this file compiled side by side (model_runner/native.py), since the
// prompt-row tiles take as long to compile as everything else: with JITNEY_TILED_PART defined, only
// jitney_tiled_kernel (the float32 tiles of attend_avx2); without, the rest, which calls it.
extern "C" void* jitney_tiled_kernel(int kv_kind, int head_dim, int group);

namespace {

constexpr int MAX_GROUP = 16;   // query heads per kv head
constexpr int MAX_HEAD_DIM = 256;
constexpr int MAX_BLOCK = 256;  // tokens per KV block

// Rows of a prompt chunk attended together by the 8-lane kernel: 8 (measured on AMD Zen 3, SmolLM2's shape,
// a 512-token prompt over 30 layers, float32: 130, 122 and 119 ms for 2, 4 and 8 rows), fewer where the rows'
// float32 queries and accumulators would outgrow a 32 KB L1 (G x HD x rows <= 2048: 4 rows for Llama's 4 x 128).
constexpr int tile_rows(int group, int head_dim) { return std::clamp(2048 / (group * head_dim), 2, 8); }

#include "bf16.h"     // to_float, store
#include "softmax.h"  // exp_any, exp_nonpositive, softmax_block, exp512_nonpositive

// An int8 cache row: head_dim int8 values, then the row's float32 scale in the next four bytes (value = q *
// scale). Rows of other types are their head_dim values alone, scale 1.
template <typename TC>
constexpr bool is_q8 = std::is_same_v<TC, int8_t>;
template <typename TC>
constexpr int row_extra = is_q8<TC> ? 4 : 0;  // elements of a row past its values
template <typename TC>  // the cache's type as the C entry points' kv_kind says it: 0 float32, 1 bfloat16, 2 int8
constexpr int kv_kind_of = std::is_same_v<TC, float> ? 0 : std::is_same_v<TC, uint16_t> ? 1 : 2;
inline float to_float(int8_t x) { return float(x); }
inline float row_scale(const int8_t* row, int head_dim) {
  float s;
  std::memcpy(&s, row + head_dim, sizeof s);
  return s;
}

// x rounded to T's precision, as a PyTorch op with a T output would leave it.
template <typename T>
inline float rounded(float x) {
  T t;
  store(x, &t);
  return to_float(t);
}

// One sequence, one kv head. q: the group's query heads [group, head_dim]; k/v: this head's blocks
// [num_blocks, block_size, head_dim]; table: the sequence's block ids; out: [group, head_dim]. The query and
// output are of type TQ, the cache of type TC (a bfloat16 cache under float32 queries: the AVX2 machines' case).
// HD is head_dim when known at compile time (fully unrolled inner loops), 0 for any other size.
template <typename TQ, typename TC, int HD>
void attend(const TQ* q, const TC* k, const TC* v, const int32_t* table, int context_len, TQ* out, int group,
            int block_size, int head_dim_arg, float scale) {
  const int hd = HD ? HD : head_dim_arg;
  const int rs = hd + row_extra<TC>;  // elements from one cached row to the next
  const int64_t block_stride = int64_t(block_size) * rs;
  alignas(64) float qf[MAX_GROUP][MAX_HEAD_DIM];
  alignas(64) float acc[MAX_GROUP][MAX_HEAD_DIM];
  alignas(64) float row[MAX_HEAD_DIM];
  alignas(64) float score[MAX_GROUP][MAX_BLOCK];
  float running_max[MAX_GROUP], denom[MAX_GROUP];
  for (int g = 0; g < group; g++) {
    for (int d = 0; d < hd; d++) qf[g][d] = to_float(q[g * hd + d]) * scale;
    for (int d = 0; d < hd; d++) acc[g][d] = 0.f;
    running_max[g] = -INFINITY;
    denom[g] = 0.f;
  }
  const int num_blocks = (context_len + block_size - 1) / block_size;
  for (int b = 0; b < num_blocks; b++) {
    const TC* kb = k + table[b] * block_stride;
    const TC* vb = v + table[b] * block_stride;
    const int n = std::min(block_size, context_len - b * block_size);
    for (int t = 0; t < n; t++) {  // scores of this block's keys, every head of the group
      for (int d = 0; d < hd; d++) row[d] = to_float(kb[t * rs + d]);
      float key_scale = 1.f;
      if constexpr (is_q8<TC>) key_scale = row_scale(kb + t * rs, hd);
      for (int g = 0; g < group; g++) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < hd; d++) s += qf[g][d] * row[d];
        score[g][t] = s * key_scale;
      }
    }
    for (int g = 0; g < group; g++) {
      const float correction = softmax_block(score[g], n, running_max[g], denom[g]);
      for (int d = 0; d < hd; d++) acc[g][d] *= correction;
    }
    for (int t = 0; t < n; t++) {  // weighted values
      for (int d = 0; d < hd; d++) row[d] = to_float(vb[t * rs + d]);
      float value_scale = 1.f;
      if constexpr (is_q8<TC>) value_scale = row_scale(vb + t * rs, hd);
      for (int g = 0; g < group; g++) {
        const float p = score[g][t] * value_scale;
        for (int d = 0; d < hd; d++) acc[g][d] += p * row[d];
      }
    }
  }
  for (int g = 0; g < group; g++) {
    const float inv = 1.f / denom[g];
    for (int d = 0; d < hd; d++) store(acc[g][d] * inv, &out[g * hd + d]);
  }
}

// A specialised kernel: one sequence, one kv head, as `attend` with the group and head size fixed.
template <typename TQ, typename TC = TQ>
using AttendFn = void (*)(const TQ*, const TC*, const TC*, const int32_t*, int, TQ*, int, float);
// A kernel for `rows` consecutive query rows of one sequence (q and out rows q_stride / out_stride elements
// apart; row r attends to the first context_len + r tokens), each row's arithmetic that of the row alone.
template <typename TQ, typename TC = TQ>
using RowsFn = void (*)(const TQ*, int64_t, const TC*, const TC*, const int32_t*, int, int, TQ*, int64_t, int, float);

#if defined(JITNEY_AVX512) || defined(JITNEY_AVX2)
// Asks for block b's key and value rows ahead of their use (nothing when b is past the context). Always
// inlined: GCC 12 deletes a call to a function whose only effects are prefetches (it counts as pure).
template <int HINT, typename T>
__attribute__((always_inline)) inline void prefetch_block(const T* k, const T* v, const int32_t* table, int b,
                                                          int num_blocks, int64_t block_stride) {
  if (b >= num_blocks) return;
  const char* kb = reinterpret_cast<const char*>(k + table[b] * block_stride);
  const char* vb = reinterpret_cast<const char*>(v + table[b] * block_stride);
  for (int64_t off = 0; off < block_stride * int64_t(sizeof(T)); off += 64) {
    _mm_prefetch(kb + off, _mm_hint(HINT));
    _mm_prefetch(vb + off, _mm_hint(HINT));
  }
}

// The next PREFETCH_BLOCKS blocks' rows asked for into L2, at every block: blocks are scattered over the cache,
// and each new one would otherwise start with a miss. Into L2 only, three blocks ahead, each asked for again at
// every block until it is reached: against the next block into L1 and the one after into L2 (the first scheme),
// 1.2-1.4x at batch 64 and 128 (SmolLM2's shape, contexts 100..600, bfloat16 cache, 2 threads, AMD Zen 4:
// 80 -> 67 and 85 -> 60 ms a step over four alternating rounds in one process; the AVX2 loop there 111 -> 80 ms
// under float32 compute, the int8 kernels 1.0-1.2x), and faster than asking for each block once, or for 2, 4 or
// 5 blocks ahead. benchmarks.decode_attention's bare read (the same bytes, no arithmetic) finds the same.
// On an Intel Xeon with AMX (2026-12-05, bfloat16 cache, alternating runs): 2 blocks ahead 2-3 % faster than 3,
// 6 ahead 7 % slower; 3 kept, Zen 4's best. Unmeasured on Zen 3.
constexpr int PREFETCH_BLOCKS = 3;
template <typename T>
__attribute__((always_inline)) inline void prefetch_ahead(const T* k, const T* v, const int32_t* table, int b,
                                                          int num_blocks, int64_t block_stride) {
  for (int ahead = 1; ahead <= PREFETCH_BLOCKS; ahead++)
    prefetch_block<_MM_HINT_T1>(k, v, table, b + ahead, num_blocks, block_stride);
}
#endif

#ifdef JITNEY_AVX512
// How the AVX-512 kernel below loads, multiplies and stores each data type. `accumulate` adds a group of
// keys' value rows, weighted by their softmax numerators, to the float32 accumulators: two vectors per 32
// elements of a row, in an order of the type's own that `store` undoes.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr bool available = true;
  static constexpr int lanes = 16;  // elements of a query or key row per 512-bit vector
  using Row = __m512;
  static Row load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 dot(__m512 acc, Row q, Row k) { return _mm512_fmadd_ps(q, k, acc); }
  template <int HD, int G>
  static void accumulate(const float* v, int m, const float (*w)[16], __m512 (*acc)[HD / 16]) {
    for (int t = 0; t < m; t++)
      for (int j = 0; j < HD / 16; j++) {
        const __m512 row = _mm512_loadu_ps(v + t * HD + j * 16);
        for (int g = 0; g < G; g++) acc[g][j] = _mm512_fmadd_ps(_mm512_set1_ps(w[g][t]), row, acc[g][j]);
      }
  }
  static void store(float* p, __m512 a, __m512 b) {  // elements 0..15, 16..31
    _mm512_storeu_ps(p, a);
    _mm512_storeu_ps(p + 16, b);
  }
};

#if defined(__AVX512BF16__)
// bfloat16: scores by VDPBF16PS (bf16 pairs multiplied exactly, summed in float32). Values are widened to
// float32 and weighted by float32 FMAs: rounding the weights to bf16 for VDPBF16PS (as PyTorch's flash
// attention does for its second matmul) would add an error that grows with the spread of the values, up to
// four times the output's own rounding when |v| reaches 4 (measured); the FMAs cost about as much.
template <>
struct Vec<uint16_t> {
  static constexpr bool available = true;
  static constexpr int lanes = 32;
  using Row = __m512bh;
  static Row load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512 dot(__m512 acc, Row q, Row k) { return _mm512_dpbf16_ps(acc, q, k); }
  // 32 bf16 -> the even elements and the odd ones as float32: a bf16 is the top half of a float32, so a shift
  // or a mask of each 32-bit pair is the whole conversion (two instructions for 32 values); the accumulators
  // hold the even elements of a chunk in acc[2j], the odd ones in acc[2j + 1].
  template <int HD, int G>
  static void accumulate(const uint16_t* v, int m, const float (*w)[16], __m512 (*acc)[HD / 16]) {
    const __m512i top = _mm512_set1_epi32(int32_t(0xffff0000u));
    for (int t = 0; t < m; t++)
      for (int j = 0; j < HD / 32; j++) {
        const __m512i x = _mm512_loadu_si512(v + t * HD + j * 32);
        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(x, top));
        for (int g = 0; g < G; g++) {
          const __m512 wt = _mm512_set1_ps(w[g][t]);
          acc[g][2 * j] = _mm512_fmadd_ps(wt, even, acc[g][2 * j]);
          acc[g][2 * j + 1] = _mm512_fmadd_ps(wt, odd, acc[g][2 * j + 1]);
        }
      }
  }
  static void store(uint16_t* p, __m512 even, __m512 odd) {  // rounds to nearest even, back in element order
    const __m512i e = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even));
    const __m512i o = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd));
    _mm512_storeu_si512(p, _mm512_or_si512(e, _mm512_slli_epi32(o, 16)));
  }
};
#else
template <>
struct Vec<uint16_t> {
  static constexpr bool available = false;  // no AVX512-BF16: bfloat16 takes the portable loop
};
#endif

// Sixteen horizontal sums at once: lane i of the result is the sum of v[i]'s lanes. A transposing reduction
// (45 instructions) where sixteen separate horizontal sums take about 150.
inline __m512 sum16(const __m512 v[16]) {
  __m512 s2[8], s4[4], s8[2];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: v[2i] and v[2i+1], two partial sums each
    s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128-bit lane: v[4i .. 4i+3], one sum each
    const __m512d a = _mm512_castps_pd(s2[2 * i]), b = _mm512_castps_pd(s2[2 * i + 1]);
    s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; i++)  // the four 128-bit lanes added in pairs
    s8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s8[0], s8[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s8[0], s8[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The hot case: head size HD and G query heads per kv head known at compile time, so the G x HD float32
// accumulators live in registers. The context goes sixteen keys at a time, all in registers but the weights:
// - scores: a vector of partial products per key, then one transposing reduction (sum16) for all sixteen;
// - online softmax on the sixteen at once: the running maximum moves (and what was accumulated is rescaled)
//   only when a larger score comes, and the denominator is a vector of sixteen partial sums until the end;
// - values: widened to float32 and weighted by the softmax of their key with FMAs (Vec::accumulate).
// The next blocks' rows are prefetched while this one is worked on (prefetch_ahead).
template <typename T, int HD, int G>
void attend_avx512(const T* q, const T* k, const T* v, const int32_t* table, int context_len, T* out,
                   int block_size, float scale) {
  using V = Vec<T>;
  constexpr int QV = HD / V::lanes;  // vectors per query or key row
  constexpr int CH = HD / 32;        // chunks of 32 values per row, two float32 accumulators each
  const int64_t block_stride = int64_t(block_size) * HD;
  const __m512 scale_v = _mm512_set1_ps(scale);
  typename V::Row qv[G][QV];
  __m512 acc[G][2 * CH], denom[G];
  float running_max[G];
  alignas(64) float weight[G][16];  // this group of keys' softmax numerators
  for (int g = 0; g < G; g++) {
    for (int j = 0; j < QV; j++) qv[g][j] = V::load(q + g * HD + j * V::lanes);
    for (int j = 0; j < 2 * CH; j++) acc[g][j] = _mm512_setzero_ps();
    running_max[g] = -INFINITY;
    denom[g] = _mm512_setzero_ps();
  }
  const int num_blocks = (context_len + block_size - 1) / block_size;
  for (int b = 0; b < num_blocks; b++) {
    const T* kb = k + table[b] * block_stride;
    const T* vb = v + table[b] * block_stride;
    const int n = std::min(block_size, context_len - b * block_size);
    prefetch_ahead(k, v, table, b, num_blocks, block_stride);
    for (int t0 = 0; t0 < n; t0 += 16) {
      const int m = std::min(16, n - t0);
      const __mmask16 real = __mmask16((1u << m) - 1);  // lanes past the context score -inf
      const T* kt = kb + t0 * HD;
      const T* vt = vb + t0 * HD;
      for (int g = 0; g < G; g++) {
        __m512 part[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) {
          part[t] = _mm512_setzero_ps();
          if (t < m)
            for (int j = 0; j < QV; j++) part[t] = V::dot(part[t], qv[g][j], V::load(kt + t * HD + j * V::lanes));
        }
        const __m512 s = _mm512_mask_blend_ps(real, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(sum16(part), scale_v));
        const float top = _mm512_reduce_max_ps(s);
        if (top > running_max[g]) {  // a new maximum: rescale what was summed under the old one
          const __m512 c = _mm512_set1_ps(exp_nonpositive(running_max[g] - top));
          for (int j = 0; j < 2 * CH; j++) acc[g][j] = _mm512_mul_ps(acc[g][j], c);
          denom[g] = _mm512_mul_ps(denom[g], c);
          running_max[g] = top;
        }
        const __m512 p = exp512_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(running_max[g])));
        denom[g] = _mm512_add_ps(denom[g], p);
        _mm512_store_ps(weight[g], p);
      }
      V::template accumulate<HD, G>(vt, m, weight, acc);
    }
  }
  for (int g = 0; g < G; g++) {
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(denom[g]));
    for (int j = 0; j < CH; j++)
      V::store(out + g * HD + j * 32, _mm512_mul_ps(acc[g][2 * j], inv), _mm512_mul_ps(acc[g][2 * j + 1], inv));
  }
}

template <typename T, int HD>
AttendFn<T> pick_group(int group) {
  switch (group) {
    case 1: return attend_avx512<T, HD, 1>;
    case 2: return attend_avx512<T, HD, 2>;
    case 3: return attend_avx512<T, HD, 3>;
    case 4: return attend_avx512<T, HD, 4>;
    case 5: return attend_avx512<T, HD, 5>;
    case 6: return attend_avx512<T, HD, 6>;
    case 7: return attend_avx512<T, HD, 7>;
    case 8: return attend_avx512<T, HD, 8>;
    default: return nullptr;
  }
}

// The specialised kernel for this data type and shape, or nullptr for the portable loop.
template <typename T>
AttendFn<T> pick_avx512(int head_dim, int group) {
  if constexpr (!Vec<T>::available) {
    return nullptr;
  } else {
    return head_dim == 64 ? pick_group<T, 64>(group) : head_dim == 128 ? pick_group<T, 128>(group) : nullptr;
  }
}

#ifdef __AVX512BW__  // the int8 kernel's int16 arithmetic (every AVX-512 CPU jitney meets has it)
#define JITNEY_AVX512_Q8 1
#include "int16_query.h"  // int16_step, dot_pairs
// Sixteen horizontal sums of int32 lanes at once: sum16's transposing reduction on integers (exact).
inline __m512i sum16i(const __m512i v[16]) {
  __m512i s2[8], s4[4], s8[2];
  for (int i = 0; i < 8; i++)
    s2[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++)
    s4[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s2[2 * i], s2[2 * i + 1]), _mm512_unpackhi_epi64(s2[2 * i], s2[2 * i + 1]));
  for (int i = 0; i < 2; i++)
    s8[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_i32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(s8[0], s8[1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(s8[0], s8[1], _MM_SHUFFLE(3, 1, 3, 1)));
}


// An int8 cache under float32 or bfloat16 queries: attend_avx512's design, everything summed in float32 but the
// key dot products, which are exact integer sums.
// - scores: each query head is split once into two int16 parts on a power-of-two scale s, q = s (qh + ql 2^-15)
//   to within 2^-29 of its largest element (below float32's own rounding of q; bfloat16 queries keep qh alone,
//   within 2^-14, below bfloat16's rounding), and each key row's int8 values,
//   widened to int16, are multiplied by both with VPDPWSSD (pairs of int16 products summed into int32 lanes,
//   exact); the two sums, converted to float32 once per group of sixteen keys, times the rows' scales (collected
//   by one gather: the rows are HD + 4 bytes apart), s and the softmax scale are the scores. Four integer
//   instructions per 32 elements and head, where widening to float32 and FMAs took twice as many (measured on
//   AMD Zen 4, 2 threads: a batch-128 decode step's attention 51 -> 48 ms, batch 64 27.5 -> 26 ms);
// - values: each row widened to float32 once and weighted by G FMAs, the weights being the softmax numerators
//   times the value rows' scales (the denominator sums the numerators alone). (Integer value sums on int16
//   weights measured no faster here.)
template <typename TQ, int HD, int G>
void attend_avx512_q8(const TQ* q, const int8_t* k, const int8_t* v, const int32_t* table, int context_len,
                      TQ* out, int block_size, float scale) {
  constexpr int NV = HD / 16;  // float vectors per row
  constexpr int NK = HD / 32;  // int16 vectors per row
  constexpr int RS = HD + 4;   // bytes from one cached row to the next
  // Bfloat16 queries skip the low part: qh alone is q to within 2^-14 of its largest element, where bfloat16
  // holds that element only to 2^-9 and the output is rounded to 2^-9 too, so ql would add nothing that survives
  // (and its products and reduction cost 12-14 % of the kernel: 47.3 -> 42.0 ms at batch 128, Zen 4).
  constexpr bool LOW_PART = std::is_same_v<TQ, float>;
  static_assert(RS % 4 == 0, "scales are gathered as floats");
  const int64_t block_stride = int64_t(block_size) * RS;
  const __m512i scale_at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(RS / 4));  // floats from a row's scale to the next
  __m512i qh[G][NK], ql[G][NK];  // each query head as two int16 parts: q = s (qh + ql / 2^15)
  __m512 acc[G][NV], denom[G], q_scale[G];
  float running_max[G];
  alignas(64) float weight[G][16];  // this group of keys' softmax numerators times their value rows' scales
  for (int g = 0; g < G; g++) {
    alignas(64) float qf[HD];
    float amax = 0.f;
    for (int d = 0; d < HD; d++) {
      qf[d] = to_float(q[g * HD + d]);
      amax = std::max(amax, std::fabs(qf[d]));
    }
    // s: the power of two with amax / s in [2^13, 2^14), so that qh = round(q / s) fits an int16 with room, and
    // q - qh s (exact) leaves at most s / 2 for ql = round((q - qh s) 2^15 / s), at most 2^14: q is then
    // s (qh + ql 2^-15) to within s 2^-16, 2^-29 of amax, far below float32's own rounding of q.
    const float sq = int16_step(amax);
    const __m512 inv = _mm512_set1_ps(1.f / sq), step = _mm512_set1_ps(sq), inv_lo = _mm512_set1_ps(32768.f / sq);
    for (int c = 0; c < NK; c++) {
      __m512i h[2], l[2];
      for (int i = 0; i < 2; i++) {
        const __m512 x = _mm512_load_ps(qf + 32 * c + 16 * i);
        const __m512 xh = _mm512_roundscale_ps(_mm512_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        h[i] = _mm512_cvtps_epi32(xh);
        l[i] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_fnmadd_ps(xh, step, x), inv_lo));
      }
      qh[g][c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi32_epi16(h[0])), _mm512_cvtsepi32_epi16(h[1]), 1);
      ql[g][c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi32_epi16(l[0])), _mm512_cvtsepi32_epi16(l[1]), 1);
    }
    q_scale[g] = _mm512_set1_ps(sq * scale);
    for (int j = 0; j < NV; j++) acc[g][j] = _mm512_setzero_ps();
    running_max[g] = -INFINITY;
    denom[g] = _mm512_setzero_ps();
  }
  auto widen = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  auto widen16 = [](const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  const int num_blocks = (context_len + block_size - 1) / block_size;
  for (int b = 0; b < num_blocks; b++) {
    const int8_t* kb = k + table[b] * block_stride;
    const int8_t* vb = v + table[b] * block_stride;
    const int n = std::min(block_size, context_len - b * block_size);
    prefetch_ahead(k, v, table, b, num_blocks, block_stride);
    for (int t0 = 0; t0 < n; t0 += 16) {
      const int m = std::min(16, n - t0);
      const __mmask16 real = __mmask16((1u << m) - 1);  // lanes past the context score -inf, weigh 0
      const int8_t* kt = kb + t0 * RS;
      const int8_t* vt = vb + t0 * RS;
      const __m512 key_scale = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, scale_at, kt + HD, 4);
      const __m512 value_scale = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, scale_at, vt + HD, 4);
      for (int g = 0; g < G; g++) {
        __m512i part[16], part_lo[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) {
          part[t] = part_lo[t] = _mm512_setzero_si512();
          if (t < m)
            for (int c = 0; c < NK; c++) {
              const __m512i kk = widen16(kt + t * RS + 32 * c);
              part[t] = dot_pairs(part[t], qh[g][c], kk);
              if constexpr (LOW_PART) part_lo[t] = dot_pairs(part_lo[t], ql[g][c], kk);
            }
        }
        __m512 dots = _mm512_cvtepi32_ps(sum16i(part));
        if constexpr (LOW_PART)
          dots = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum16i(part_lo)), _mm512_set1_ps(1.f / 32768.f), dots);
        const __m512 s = _mm512_mask_blend_ps(real, _mm512_set1_ps(-INFINITY),
                                              _mm512_mul_ps(dots, _mm512_mul_ps(key_scale, q_scale[g])));
        const float top = _mm512_reduce_max_ps(s);
        if (top > running_max[g]) {  // a new maximum: rescale what was summed under the old one
          const __m512 c = _mm512_set1_ps(exp_nonpositive(running_max[g] - top));
          for (int j = 0; j < NV; j++) acc[g][j] = _mm512_mul_ps(acc[g][j], c);
          denom[g] = _mm512_mul_ps(denom[g], c);
          running_max[g] = top;
        }
        const __m512 p = exp512_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(running_max[g])));
        denom[g] = _mm512_add_ps(denom[g], p);
        _mm512_store_ps(weight[g], _mm512_mul_ps(p, value_scale));
      }
      for (int t = 0; t < m; t++)
        for (int j = 0; j < NV; j++) {
          const __m512 row = widen(vt + t * RS + j * 16);
          for (int g = 0; g < G; g++) acc[g][j] = _mm512_fmadd_ps(_mm512_set1_ps(weight[g][t]), row, acc[g][j]);
        }
    }
  }
  for (int g = 0; g < G; g++) {
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(denom[g]));
    for (int j = 0; j < NV; j++) {
      const __m512 o = _mm512_mul_ps(acc[g][j], inv);
      if constexpr (std::is_same_v<TQ, float>) {
        _mm512_storeu_ps(out + g * HD + j * 16, o);
      } else {  // rounded to nearest even as torch's cast (`store`), once per output element
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, o);
        for (int i = 0; i < 16; i++) store(tmp[i], out + g * HD + j * 16 + i);
      }
    }
  }
}

template <typename TQ, int HD>
AttendFn<TQ, int8_t> pick_group_q8(int group) {
  switch (group) {
    case 1: return attend_avx512_q8<TQ, HD, 1>;
    case 2: return attend_avx512_q8<TQ, HD, 2>;
    case 3: return attend_avx512_q8<TQ, HD, 3>;
    case 4: return attend_avx512_q8<TQ, HD, 4>;
    case 5: return attend_avx512_q8<TQ, HD, 5>;
    case 6: return attend_avx512_q8<TQ, HD, 6>;
    case 7: return attend_avx512_q8<TQ, HD, 7>;
    case 8: return attend_avx512_q8<TQ, HD, 8>;
    default: return nullptr;
  }
}

template <typename TQ>
AttendFn<TQ, int8_t> pick_avx512_q8(int head_dim, int group) {
  return head_dim == 64 ? pick_group_q8<TQ, 64>(group) : head_dim == 128 ? pick_group_q8<TQ, 128>(group) : nullptr;
}
#endif  // __AVX512BW__
#endif

#ifdef JITNEY_AVX2
// Eight elements as float32: a float32 load, or bfloat16 widened (a bf16 is the top half of a float32: zero-
// extend each to 32 bits, shift left by 16).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {  // int8 -> int32 -> float32, exact
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const uint16_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}

// Eight float32 rounded to bfloat16 as the scalar `store` rounds them (and torch's cast): to nearest even by
// adding 0x7fff plus the kept part's lowest bit, then keeping the top 16 bits; NaN becomes the quiet NaN
// 0x7fc0 (adding could carry it into an infinity). Denormals round like any other value: VCVTNEPS2BF16
// (AVX512-BF16) would flush them to zero, and so does not give torch's bits.
inline __m128i bf16_round8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i h = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7fc0), nan);
  // 32 -> 16 bits (values fit, so no saturation): PACKUSDW packs within each 128-bit half, the permute
  // brings the two halves' four results together.
  const __m256i packed = _mm256_packus_epi32(h, h);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)));
}
inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store8(uint16_t* p, __m256 x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_round8(x)); }

// Eight horizontal sums at once: lane i of the result is the sum of v[i]'s lanes (sum16's transposing
// reduction on 8 lanes: 19 instructions where eight separate horizontal sums take about 50).
inline __m256 sum8(const __m256 v[8]) {
  __m256 s2[4], s4[2];
  for (int i = 0; i < 4; i++)  // per 128-bit lane: v[2i] and v[2i+1], two partial sums each
    s2[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; i++) {  // per 128-bit lane: v[4i .. 4i+3], one sum each
    const __m256d a = _mm256_castps_pd(s2[2 * i]), b = _mm256_castps_pd(s2[2 * i + 1]);
    s4[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(s4[0], s4[1], 0x20), _mm256_permute2f128_ps(s4[0], s4[1], 0x31));
}

inline float reduce_max8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float reduce_add8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// exp_any on 8 lanes: its reduction and polynomial, with FMAs; clamped to [-87, 88]; NaN stays NaN (MAXPS and
// MINPS return their second operand when one is NaN).
inline __m256 exp256_any(__m256 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// exp512_nonpositive on 8 lanes, for the softmax (x <= 0): exactly 0 below -87, -inf included.
inline __m256 exp256_nonpositive(__m256 x) {
  return _mm256_blendv_ps(exp256_any(x), _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ));
}

// Eight float32 rounded to T's precision, as `rounded` one.
template <typename T>
inline __m256 rounded8(__m256 x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16_round8(x)), 16));
}

// Eight consecutive key rows [8, HD] as float32, for the score loop to read without a test per key: float32
// rows where they are, else copied into kf (bfloat16 widened; int8 widened and multiplied by its row's scale).
// Where fewer than eight are left (m < 8), the last real row stands in for the missing ones (never a read past
// the context, which may lie past the block); their scores are then masked out.
template <int HD, typename TC>
const float* keys_f32(const TC* rows, int m, float (*kf)[HD]) {
  constexpr int RS = HD + row_extra<TC>;
  if constexpr (std::is_same_v<TC, float>)
    if (m == 8) return rows;
  for (int t = 0; t < 8; t++) {
    const TC* row = rows + std::min(t, m - 1) * RS;
    if constexpr (is_q8<TC>) {
      const __m256 s = _mm256_set1_ps(row_scale(row, HD));
      for (int j = 0; j < HD / 8; j++) _mm256_store_ps(kf[t] + 8 * j, _mm256_mul_ps(load8(row + 8 * j), s));
    } else {
      for (int j = 0; j < HD / 8; j++) _mm256_store_ps(kf[t] + 8 * j, load8(row + 8 * j));
    }
  }
  return kf[0];
}

// A mask of the lanes below m (all bits set in lanes 0 .. m - 1): a group's keys inside a row's context.
inline __m256 lanes_below(int m) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// The score products of NQ query vectors (qs[i], float32) with eight keys [8, HD]: part[i][t] holds
// query i times key t as eight partial sums (lane l: elements l, l + 8, ... added in that order), for sum8.
// Four keys at a time, so that NQ = 2 queries share each key load within the sixteen registers; each partial
// sum's additions are in the same order whatever NQ is.
template <int HD, int NQ>
__attribute__((always_inline)) inline void score_parts(const float (*qs)[HD], const float* keys, __m256 (*part)[8]) {
  for (int t0 = 0; t0 < 8; t0 += 4) {
    __m256 a[NQ][4];
    for (int i = 0; i < NQ; i++)
      for (int t = 0; t < 4; t++) a[i][t] = _mm256_setzero_ps();
    for (int j = 0; j < HD / 8; j++) {
      __m256 qj[NQ];
      for (int i = 0; i < NQ; i++) qj[i] = _mm256_load_ps(qs[i] + 8 * j);
      for (int t = 0; t < 4; t++) {
        const __m256 key = _mm256_loadu_ps(keys + (t0 + t) * HD + 8 * j);
        for (int i = 0; i < NQ; i++) a[i][t] = _mm256_fmadd_ps(qj[i], key, a[i][t]);
      }
    }
    for (int i = 0; i < NQ; i++)
      for (int t = 0; t < 4; t++) part[i][t0 + t] = a[i][t];
  }
}

// acc[p] [HD] += sum over t < m of w[p][t] * row t of vt, for NQ accumulator rows p (each query head of one or
// two query rows), t in order: the same additions, in the same order, as one row at a time. VT vectors of each
// accumulator row in registers at a time (NQ * VT <= 12), each value vector loaded (and widened) once for them.
template <typename TC, int HD, int NQ>
__attribute__((always_inline)) inline void weigh_values(const TC* vt, int m, const float (*w)[8], float (*acc)[HD]) {
  constexpr int NV = HD / 8;
  constexpr int RS = HD + row_extra<TC>;
  constexpr int VT = std::min(NV, NQ == 1 ? 8 : NQ == 2 ? 4 : NQ <= 4 ? 2 : NQ <= 12 ? 1 : 0);
  static_assert(VT > 0, "at most 12 accumulator rows at once");
  for (int j0 = 0; j0 < NV; j0 += VT) {
    __m256 a[NQ][VT];
    for (int p = 0; p < NQ; p++)
      for (int j = 0; j < VT; j++) a[p][j] = _mm256_load_ps(acc[p] + 8 * (j0 + j));
    for (int t = 0; t < m; t++)
      for (int j = 0; j < VT; j++) {
        const __m256 row = load8(vt + t * RS + 8 * (j0 + j));
        for (int p = 0; p < NQ; p++) a[p][j] = _mm256_fmadd_ps(_mm256_broadcast_ss(&w[p][t]), row, a[p][j]);
      }
    for (int p = 0; p < NQ; p++)
      for (int j = 0; j < VT; j++) _mm256_store_ps(acc[p] + 8 * (j0 + j), a[p][j]);
  }
}

// The 8-lane kernel: attend_avx512's design with 256-bit vectors, the float32 computation under any mix of
// query and cache types (widened as read, the output rounded to TQ once), for R rows of one sequence at most
// (RowsFn): a decode row alone (R = 1), or up to R consecutive rows of a prompt chunk, which share each key
// and value load and each widened key, while every row's arithmetic stays exactly that of the row alone (the
// same products added in the same order), so how a prompt was chunked and batched never changes a bit.
// Sixteen ymm registers do not hold the G x HD float32 accumulators of a row (24 vectors for SmolLM2's 3 x 64),
// so they live in an L1 array, and each group of eight keys works on register tiles of them:
// - scores: per query head, a vector of partial products per key (score_parts, two query vectors sharing each
//   key load), then one transposing reduction (sum8); bfloat16 keys are widened once into a float32 scratch
//   that every head and row then reads;
// - online softmax on eight scores at once, rescaling only when the running maximum grows;
// - values: weigh_values, each value vector loaded (and widened) once for the G heads of one row, or of two
//   rows whose group ends at the same key.
// A decode row prefetches the next blocks as in attend_avx512 (measured on one thread, SmolLM2's shape, 64
// rows of 100..600 tokens, float32 cache: 6.3 ms without, 3.2 ms with); a prompt chunk's rows do not (its
// blocks are in cache from the rows before; prefetching them again measured 1.3x slower).
template <typename TQ, typename TC, int HD, int G, int R = 1>
void attend_avx2(const TQ* q, int64_t q_stride, const TC* k, const TC* v, const int32_t* table, int context_len,
                 int rows, TQ* out, int64_t out_stride, int block_size, float scale) {
  constexpr int NV = HD / 8;                                          // vectors per row
  constexpr int RS = HD + row_extra<TC>;                              // elements from one cached row to the next
  constexpr int PAIR_VALUES = 2 * G <= 12;                            // two rows' accumulators in registers at once
  const int64_t block_stride = int64_t(block_size) * RS;
  const __m256 scale_v = _mm256_set1_ps(scale);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  alignas(32) float qf[R * G][HD];   // query vector p = r * G + g: row r's head g
  alignas(32) float acc[R * G][HD];
  alignas(32) float kf[8][HD];  // bfloat16 keys widened, or a short group's keys padded
  alignas(32) float weight[R * G][8];                               // this group of keys' softmax numerators
  __m256 denom[R * G];
  float running_max[R * G];
  if (R == 1) rows = 1;  // a constant for the decode kernel's loops below
  const int nq = rows * G;
  for (int p = 0; p < nq; p++) {
    for (int j = 0; j < NV; j++) {
      _mm256_store_ps(qf[p] + 8 * j, load8(q + (p / G) * q_stride + (p % G) * HD + 8 * j));
      _mm256_store_ps(acc[p] + 8 * j, _mm256_setzero_ps());
    }
    running_max[p] = -INFINITY;
    denom[p] = _mm256_setzero_ps();
  }
  const int last_len = context_len + rows - 1;  // the last row's context
  const int num_blocks = (last_len + block_size - 1) / block_size;
  for (int b = 0; b < num_blocks; b++) {
    const TC* kb = k + table[b] * block_stride;
    const TC* vb = v + table[b] * block_stride;
    const int n = std::min(block_size, last_len - b * block_size);
    if (R == 1) prefetch_ahead(k, v, table, b, num_blocks, block_stride);
    for (int t0 = 0; t0 < n; t0 += 8) {
      const TC* vt = vb + t0 * RS;
      const float* keys = keys_f32(kb + t0 * RS, std::min(8, n - t0), kf);
      // Keys of this group in each row's context: more for later rows, none for rows [0, first) (rows whose
      // context ends before this group).
      int m[R], first = 0;
      for (int r = 0; r < rows; r++) {
        m[r] = std::min(8, std::min(block_size, context_len + r - b * block_size) - t0);
        first += m[r] <= 0;
      }
      __m256 value_scale = _mm256_set1_ps(1.f);  // int8 rows: their scales, collected by one gather
      if constexpr (is_q8<TC>) {
        const __m256 real = lanes_below(m[rows - 1]);
        value_scale = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), reinterpret_cast<const float*>(vt + HD),
                                               _mm256_mullo_epi32(lane, _mm256_set1_epi32(RS / 4)), real, 4);
      }
      __m256 part[2][8];
      for (int p = first * G, np; p < nq; p += np) {
        np = std::min(2, nq - p);
        if (np == 2) score_parts<HD, 2>(qf + p, keys, part);
        else score_parts<HD, 1>(qf + p, keys, part);
        for (int i = 0; i < np; i++) {
          const __m256 real = lanes_below(m[(p + i) / G]);
          const __m256 s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(sum8(part[i]), scale_v), real);
          const float top = reduce_max8(s);
          float& mx = running_max[p + i];
          if (top > mx) {  // a new maximum: rescale what was summed under the old one
            const __m256 c = _mm256_set1_ps(exp_nonpositive(mx - top));
            for (int j = 0; j < NV; j++)
              _mm256_store_ps(acc[p + i] + 8 * j, _mm256_mul_ps(_mm256_load_ps(acc[p + i] + 8 * j), c));
            denom[p + i] = _mm256_mul_ps(denom[p + i], c);
            mx = top;
          }
          const __m256 w = exp256_nonpositive(_mm256_sub_ps(s, _mm256_set1_ps(mx)));
          denom[p + i] = _mm256_add_ps(denom[p + i], w);
          // Lanes past a row's context hold 0 (or 0 times a later row's scale) and are never read.
          _mm256_store_ps(weight[p + i], is_q8<TC> ? _mm256_mul_ps(w, value_scale) : w);
        }
      }
      for (int r = first; r < rows;) {
        if (PAIR_VALUES && r + 1 < rows && m[r + 1] == m[r]) {
          if constexpr (PAIR_VALUES) weigh_values<TC, HD, 2 * G>(vt, m[r], weight + r * G, acc + r * G);
          r += 2;
        } else {
          weigh_values<TC, HD, G>(vt, m[r], weight + r * G, acc + r * G);
          r += 1;
        }
      }
    }
  }
  for (int p = 0; p < nq; p++) {
    const __m256 inv = _mm256_set1_ps(1.f / reduce_add8(denom[p]));
    for (int j = 0; j < NV; j++)
      store8(out + (p / G) * out_stride + (p % G) * HD + 8 * j, _mm256_mul_ps(_mm256_load_ps(acc[p] + 8 * j), inv));
  }
}

// attend_avx2 for this group and head size: for decode rows (one at a time), or TILED, for prompt chunks'
// rows tile_rows at a time.
template <typename TQ, typename TC, bool TILED>
RowsFn<TQ, TC> pick_avx2(int head_dim, int group) {
  if (head_dim != 64 && head_dim != 128) return nullptr;
  switch (group) {
#define JITNEY_CASE(G)                                                  \
  case G:                                                               \
    return head_dim == 64 ? attend_avx2<TQ, TC, 64, G, TILED ? tile_rows(G, 64) : 1> \
                          : attend_avx2<TQ, TC, 128, G, TILED ? tile_rows(G, 128) : 1>;
    JITNEY_CASE(1) JITNEY_CASE(2) JITNEY_CASE(3) JITNEY_CASE(4) JITNEY_CASE(5) JITNEY_CASE(6) JITNEY_CASE(7)
    JITNEY_CASE(8)
#undef JITNEY_CASE
    default: return nullptr;
  }
}
#endif

// Whether this build's AVX-512 kernel runs queries of type TQ over a cache of type TC.
template <typename TQ, typename TC>
constexpr bool avx512_takes() {
#ifdef JITNEY_AVX512
#ifdef JITNEY_AVX512_Q8
  if constexpr (is_q8<TC>) return true;  // attend_avx512_q8, under float32 or bfloat16 queries
#endif
  if constexpr (std::is_same_v<TQ, TC>) return Vec<TQ>::available;
#endif
  return false;
}

// The step's rows cut into tiles of consecutive positions of one sequence, at most `most` rows each: row i + 1
// joins row i's tile when it attends to one token more through the same blocks (the next token of the same
// prompt chunk; which sequence owns the blocks does not change what is read). Returns each tile's first row,
// then num_rows.
std::vector<int64_t> row_tiles(const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens,
                               int64_t num_rows, int block_size, int most) {
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < num_rows;) {
    starts.push_back(i);
    int64_t c = 1;
    while (c < most && i + c < num_rows && context_lens[i + c] == context_lens[i] + c &&
           std::memcmp(block_tables + i * table_stride, block_tables + (i + c) * table_stride,
                       sizeof(int32_t) * ((context_lens[i + c] + block_size - 1) / block_size)) == 0)
      c++;
    i += c;
  }
  starts.push_back(num_rows);
  return starts;
}

template <typename TQ, typename TC>
void paged_attention(const TQ* q, int64_t q_token_stride, const TC* cache, const int32_t* block_tables,
                     int64_t table_stride, const int32_t* context_lens, TQ* out, int64_t num_rows, int heads,
                     int kv_heads, int head_dim, int64_t num_blocks, int block_size, float scale) {
  const int group = heads / kv_heads;
  const int64_t head_stride = num_blocks * block_size * (head_dim + row_extra<TC>);  // one kv head's blocks
  // The widest specialised kernel this build holds for these types and this shape, else the portable loop.
  // The 8-lane kernel is only compiled for the types the AVX-512 one does not take (the build takes twice as
  // long otherwise); both take the same shapes. The 8-lane kernel also takes a prompt chunk's rows
  // tile_rows at a time (`tiled`); the others one at a time.
  AttendFn<TQ, TC> specialised = nullptr;
  RowsFn<TQ, TC> single = nullptr, tiled = nullptr;
#ifdef JITNEY_AVX512_Q8
  if constexpr (is_q8<TC>) specialised = pick_avx512_q8<TQ>(head_dim, group);
#endif
#ifdef JITNEY_AVX512
  if constexpr (!is_q8<TC> && avx512_takes<TQ, TC>()) specialised = pick_avx512<TQ>(head_dim, group);
#endif
#ifdef JITNEY_AVX2
  if constexpr (!avx512_takes<TQ, TC>()) {
    single = pick_avx2<TQ, TC, false>(head_dim, group);
    // Float32 queries only: what an AVX2 machine serves (bfloat16 arithmetic is emulated there), and the
    // build takes half as long again for each query type.
    if constexpr (std::is_same_v<TQ, float>)
      tiled = reinterpret_cast<RowsFn<TQ, TC>>(jitney_tiled_kernel(kv_kind_of<TC>, head_dim, group));
  }
#endif
  const int most = tiled ? tile_rows(group, head_dim) : 1;
  const std::vector<int64_t> tiles = row_tiles(block_tables, table_stride, context_lens, num_rows, block_size, most);
  const int64_t num_tiles = int64_t(tiles.size()) - 1;
  const int64_t out_stride = int64_t(heads) * head_dim;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t tile = 0; tile < num_tiles; tile++) {
    for (int h = 0; h < kv_heads; h++) {
      const int64_t first = tiles[tile];
      const int rows = int(tiles[tile + 1] - first);
      const TC* k = cache + int64_t(h) * head_stride;
      const TC* v = cache + int64_t(kv_heads + h) * head_stride;
      const int32_t* table = block_tables + first * table_stride;
      const TQ* q0 = q + first * q_token_stride + int64_t(h) * group * head_dim;
      TQ* o0 = out + first * out_stride + int64_t(h) * group * head_dim;
      if (single) {
        (rows > 1 ? tiled : single)(q0, q_token_stride, k, v, table, context_lens[first], rows, o0, out_stride,
                                    block_size, scale);
        continue;
      }
      const int n = context_lens[first];  // one row at a time
      if (specialised)
        specialised(q0, k, v, table, n, o0, block_size, scale);
      else if (head_dim == 64)
        attend<TQ, TC, 64>(q0, k, v, table, n, o0, group, block_size, head_dim, scale);
      else if (head_dim == 128)
        attend<TQ, TC, 128>(q0, k, v, table, n, o0, group, block_size, head_dim, scale);
      else
        attend<TQ, TC, 0>(q0, k, v, table, n, o0, group, block_size, head_dim, scale);
    }
  }
}

#ifdef JITNEY_AVX512
// The elementwise ops' 16-lane forms (GCC's own vectorization of their scalar loops ran at a third of this):
// float32 loads and stores, or bfloat16 widened as load8 does and rounded as below.
inline __m512 widen16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m256i bf16_round16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i top = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i h = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), top, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(h);  // 32 -> 16 bits: every value fits
}
// The norm's and SiLU's roundings to bfloat16 by the CPU's own instruction where it has one (VCVTNEPS2BF16,
// AVX512-BF16: one instruction where bf16_round16 takes nine). The same nearest-even rounding, but for what no
// activation holds: inputs under 2^-126 (subnormals) become 0, and a NaN keeps its sign. The K/V writes keep
// the exact rounding (store8's bf16_round8), bit for bit with PyTorch's cast on every value. Measured on the AMX
// Xeon, 2 threads, 2,048 rows: add_rms_norm 515 -> 297-337 us, silu_mul (with fast_div16) 1,258 -> 942-979 us.
inline __m256i bf16_convert16(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  return bf16_round16(x);
#endif
}
template <typename T>
inline __m512 converted16(__m512 x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return widen16(bf16_convert16(x));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_convert16(x));
}

// x / d as x * (1 / d), the reciprocal from its 14-bit estimate and one Newton step: within about two float32
// ulps of the division, which issues many times less often than a multiply (the SiLU's bottleneck with it).
// Here d = 1 + exp(-x) lies in [1, e^88], so the reciprocal never overflows.
inline __m512 fast_div16(__m512 x, __m512 d) {
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(x, r);
}
#endif

// x [rows, n] += delta (when given), then out = RMSNorm(x) * weight, row by row, with the roundings of the
// reference (transformers' LlamaRMSNorm): the sum of squares in float32, the normalised row rounded to T
// before the weight multiplies it.
template <typename T>
void add_rms_norm(T* x, const T* delta, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows > 8)
  for (int64_t r = 0; r < rows; r++) {
    T* xr = x + r * n;
    const T* dr = delta ? delta + r * n : nullptr;
    T* o = out + r * n;
    float ss = 0.f;
    int64_t i = 0;  // elements done by the 16- or 8-lane loops (none without them)
#if defined(JITNEY_AVX512)
    __m512 ss16 = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      __m512 v = load16(xr + i);
      if (dr) {  // the sum rounded once, stored as rounded and squared as stored
        v = _mm512_add_ps(v, load16(dr + i));
        if constexpr (std::is_same_v<T, float>) {
          _mm512_storeu_ps(xr + i, v);
        } else {
          const __m256i h = bf16_convert16(v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(xr + i), h);
          v = widen16(h);
        }
      }
      ss16 = _mm512_fmadd_ps(v, v, ss16);
    }
    ss = _mm512_reduce_add_ps(ss16);
#elif defined(JITNEY_AVX2)
    // GCC leaves the bfloat16 loops below mostly scalar under AVX2 alone (three times slower than AVX-512's).
    __m256 ss8 = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = dr ? rounded8<T>(_mm256_add_ps(load8(xr + i), load8(dr + i))) : load8(xr + i);
      if (dr) store8(xr + i, v);  // exact: v is already of T's precision
      ss8 = _mm256_fmadd_ps(v, v, ss8);
    }
    ss = reduce_add8(ss8);
#endif
    if (dr) {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = i; j < n; j++) {
        const float v = rounded<T>(to_float(xr[j]) + to_float(dr[j]));
        store(v, &xr[j]);
        ss += v * v;
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = i; j < n; j++) ss += to_float(xr[j]) * to_float(xr[j]);
    }
    const float inv = 1.f / std::sqrt(ss / float(n) + eps);
    int64_t j = 0;
#if defined(JITNEY_AVX512)
    const __m512 inv16 = _mm512_set1_ps(inv);
    for (; j + 16 <= n; j += 16)
      store16(o + j, _mm512_mul_ps(converted16<T>(_mm512_mul_ps(load16(xr + j), inv16)), load16(weight + j)));
#elif defined(JITNEY_AVX2)
    const __m256 inv8 = _mm256_set1_ps(inv);
    for (; j + 8 <= n; j += 8)
      store8(o + j, _mm256_mul_ps(rounded8<T>(_mm256_mul_ps(load8(xr + j), inv8)), load8(weight + j)));
#endif
    for (; j < n; j++) store(rounded<T>(to_float(xr[j]) * inv) * to_float(weight[j]), &o[j]);
  }
}

// out [rows, inter] = SiLU(gate) * up, gate_up [rows, 2 * inter] holding gate then up, SiLU rounded to T first
// (as F.silu(gate) * up computes it).
template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t rows, int64_t inter) {
#pragma omp parallel for if (rows > 2)
  for (int64_t r = 0; r < rows; r++) {
    const T* g = gate_up + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
    int64_t i = 0;
#if defined(JITNEY_AVX512)
    for (; i + 16 <= inter; i += 16) {
      const __m512 x = load16(g + i);
      const __m512 e = exp512_any(_mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 silu = converted16<T>(fast_div16(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
      store16(o + i, _mm512_mul_ps(silu, load16(u + i)));
    }
#elif defined(JITNEY_AVX2)
    // GCC vectorizes the loop below with AVX-512 (masked lanes take exp_any's NaN branch) but not with AVX2
    // alone, where it would run one exp at a time: eight at a time here, the same roundings.
    for (; i + 8 <= inter; i += 8) {
      const __m256 x = load8(g + i);
      const __m256 e = exp256_any(_mm256_sub_ps(_mm256_setzero_ps(), x));
      const __m256 silu = rounded8<T>(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
      store8(o + i, _mm256_mul_ps(silu, load8(u + i)));
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < inter; j++) {
      const float x = to_float(g[j]);
      store(rounded<T>(x / (1.f + exp_any(-x))) * to_float(u[j]), &o[j]);
    }
  }
}

// One row into an int8 cache row: round(x / scale) in [-127, 127], then scale = absmax / 127 (0 for a row of
// zeros, whose values are then 0) in the row's last four bytes. The float32 operations of int8_kv.py's
// quantize_rows, in its order (an exact maximum, one division by 127, one reciprocal, one multiplication per
// element, ties to even), so either path writes the same bits.
template <typename TS>
void quantize_row(const TS* src, int8_t* dst, int head_dim) {
  float amax = 0.f;
#pragma omp simd reduction(max : amax)
  for (int d = 0; d < head_dim; d++) amax = std::max(amax, std::fabs(to_float(src[d])));
  const float scale = amax / 127.f;
  const float inv = scale > 0.f ? 1.f / scale : 0.f;
#pragma omp simd
  for (int d = 0; d < head_dim; d++) {
    const float r = std::nearbyint(to_float(src[d]) * inv);
    dst[d] = int8_t(r > 127.f ? 127.f : r >= -127.f ? r : -127.f);  // NaN (from non-finite input): -127
  }
  std::memcpy(dst + head_dim, &scale, sizeof scale);
}

// One key or value row (head_dim values of type TS) into its cache row of type TD. Same types: a plain copy.
// Float32 into bfloat16: rounded to nearest even, by integer arithmetic (bf16_round8) also where AVX512-BF16 has
// a conversion instruction, which flushes denormals to zero and keeps a NaN's sign and payload: not the bits
// torch's cast gives. Into an int8 cache: quantize_row.
template <typename TS, typename TD>
inline void write_row(const TS* src, TD* dst, int head_dim) {
  if constexpr (is_q8<TD>) {
    quantize_row(src, dst, head_dim);
  } else if constexpr (std::is_same_v<TS, TD>) {
    std::memcpy(dst, src, sizeof(TD) * head_dim);
  } else {
    int d = 0;
#ifdef JITNEY_AVX2
    for (; d + 8 <= head_dim; d += 8) store8(dst + d, load8(src + d));  // the same bits, 8 at a time
#endif
    for (; d < head_dim; d++) store(to_float(src[d]), &dst[d]);
  }
}

// Writes this step's keys and values into their cache slots: k, v [rows, kv_heads, head_dim] (heads
// contiguous, k_stride / v_stride elements between rows), slots [rows] (block * block_size + offset), cache as
// below, each row by write_row.
template <typename TS, typename TD>
void write_kv(const TS* k, int64_t k_stride, const TS* v, int64_t v_stride, const int64_t* slots, TD* cache,
              int64_t rows, int kv_heads, int head_dim, int64_t num_blocks, int block_size) {
  const int rs = head_dim + row_extra<TD>;                 // elements of one cached row
  const int64_t head_stride = num_blocks * block_size * rs;  // elements of one kv head's blocks
  // Threads where a row's work pays for waking them: from 256 rows for a copy, from 16 for quantizing.
#pragma omp parallel for if (rows > (is_q8<TD> ? 16 : 256))
  for (int64_t i = 0; i < rows; i++)
    for (int h = 0; h < kv_heads; h++)
      for (int j = 0; j < 2; j++)  // K, then V
        write_row((j ? v + i * v_stride : k + i * k_stride) + int64_t(h) * head_dim,
                  cache + (int64_t(j) * kv_heads + h) * head_stride + slots[i] * rs, head_dim);
}

// Rotary position embedding in place on n heads of one token x [n, head_dim] (heads contiguous), HF's
// rotate-half layout: x_i cos_i + x_{(i + half) mod head_dim} ssin_i, where ssin is the sine with the first
// half's sign flipped (rope.py's table). The operations and roundings of rope.apply_rotary (x cos rounded to T,
// then the product of the rolled x and the sine added and rounded once): under bfloat16 both products are exact in
// float32, so the bits are the PyTorch path's; under float32 the sum may be fused (one rounding fewer).
template <typename T>
inline void rotate_heads(T* x, int n, int head_dim, const T* cos, const T* ssin) {
  const int half = head_dim / 2;
  float row[MAX_HEAD_DIM];
  for (int h = 0; h < n; h++, x += head_dim) {
    for (int d = 0; d < head_dim; d++) row[d] = to_float(x[d]);
#pragma omp simd
    for (int d = 0; d < head_dim; d++) {
      const float a = rounded<T>(row[d] * to_float(cos[d]));
      store(a + row[d < half ? d + half : d - half] * to_float(ssin[d]), &x[d]);
    }
  }
}

// A layer's step before attention, in one pass over its tokens: qkv [rows, heads + 2 kv_heads, head_dim] (the
// fused projection's output, heads contiguous, qkv_stride elements between rows) has its query and key heads
// rotated in place by each token's cos and signed sine ([rows, head_dim] each, contiguous), and its (rotated)
// keys and values written into their cache slots as write_kv does. Where PyTorch took six operations (a roll,
// two multiplications and an add, over fresh tensors) and write_kv a seventh.
template <typename T, typename TD>
void rope_write_kv(T* qkv, int64_t qkv_stride, const T* cos, const T* ssin, const int64_t* slots, TD* cache,
                   int64_t rows, int heads, int kv_heads, int head_dim, int64_t num_blocks, int block_size) {
  const int rs = head_dim + row_extra<TD>;
  const int64_t head_stride = num_blocks * block_size * rs;
  // Rows in parallel from a few: each row's six K/V writes land in blocks far apart (a cache miss each), which
  // the two cores overlap. One thread up to 64 rows took a decode step at batch 64 about as long as at 128.
#pragma omp parallel for if (rows > 8)
  for (int64_t i = 0; i < rows; i++) {
    T* x = qkv + i * qkv_stride;
    rotate_heads(x, heads + kv_heads, head_dim, cos + i * head_dim, ssin + i * head_dim);
    for (int h = 0; h < kv_heads; h++)
      for (int j = 0; j < 2; j++)  // K, then V
        write_row(x + int64_t(heads + j * kv_heads + h) * head_dim,
                  cache + (int64_t(j) * kv_heads + h) * head_stride + slots[i] * rs, head_dim);
  }
}

// The index of each row's largest value, as torch.argmax gives it: the first maximum, or the first NaN where a
// row holds one (NaN compares above everything there). Two passes over a row that stays in L2 (a 49,152-token
// vocabulary is 192 KB in float32): a vectorized maximum, then the first index holding it. Rows in parallel: at
// batch 128 torch's argmax took 5.5 ms of a decode step on AMD Zen 4, on one core. Bfloat16 rows are widened as
// they are read (exact), so the index is the one their float32 cast gives, without writing that cast.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  float m = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; i++) {
    const float v = to_float(x[i]);
    m = v > m ? v : m;
    nan |= v != v;
  }
  for (int64_t i = 0; i < n; i++) {
    const float v = to_float(x[i]);
    if (nan ? v != v : v == m) return i;
  }
  return 0;  // n == 0 is refused by the caller; every row value -inf ends above at i = 0
}

}  // namespace

#ifdef JITNEY_TILED_PART
extern "C" void* jitney_tiled_kernel(int kv_kind, int head_dim, int group) {
#ifdef JITNEY_AVX2
  switch (kv_kind) {
    case 0: return reinterpret_cast<void*>(pick_avx2<float, float, true>(head_dim, group));
    case 1: return reinterpret_cast<void*>(pick_avx2<float, uint16_t, true>(head_dim, group));
    default: return reinterpret_cast<void*>(pick_avx2<float, int8_t, true>(head_dim, group));
  }
#else
  return nullptr;
#endif
}
#else
extern "C" {

void jitney_argmax(int is_bf16, const void* x, int64_t rows, int64_t n, int64_t row_stride, int64_t* out) {
#pragma omp parallel for if (rows > 1)
  for (int64_t r = 0; r < rows; r++)
    out[r] = is_bf16 ? argmax_row(static_cast<const uint16_t*>(x) + r * row_stride, n)
                     : argmax_row(static_cast<const float*>(x) + r * row_stride, n);
}

void jitney_add_rms_norm(int is_bf16, void* x, const void* delta, const void* weight, void* out, int64_t rows,
                         int64_t n, float eps) {
  if (is_bf16)
    add_rms_norm(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(delta),
                 static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows, n, eps);
  else
    add_rms_norm(static_cast<float*>(x), static_cast<const float*>(delta), static_cast<const float*>(weight),
                 static_cast<float*>(out), rows, n, eps);
}

void jitney_silu_mul(int is_bf16, const void* gate_up, void* out, int64_t rows, int64_t inter) {
  if (is_bf16)
    silu_mul(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), rows, inter);
  else
    silu_mul(static_cast<const float*>(gate_up), static_cast<float*>(out), rows, inter);
}

// src_bf16: 1 for bfloat16 k, v, 0 for float32; dst_kind: the cache's type, 0 float32, 1 bfloat16, 2 int8.
void jitney_write_kv(int src_bf16, int dst_kind, const void* k, int64_t k_stride, const void* v, int64_t v_stride,
                     const int64_t* slots, void* cache, int64_t rows, int kv_heads, int head_dim,
                     int64_t num_blocks, int block_size) {
  const int dst_bf16 = dst_kind == 1;
  if (dst_kind == 2 && src_bf16)
    write_kv(static_cast<const uint16_t*>(k), k_stride, static_cast<const uint16_t*>(v), v_stride, slots,
             static_cast<int8_t*>(cache), rows, kv_heads, head_dim, num_blocks, block_size);
  else if (dst_kind == 2)
    write_kv(static_cast<const float*>(k), k_stride, static_cast<const float*>(v), v_stride, slots,
             static_cast<int8_t*>(cache), rows, kv_heads, head_dim, num_blocks, block_size);
  else if (src_bf16 && dst_bf16)
    write_kv(static_cast<const uint16_t*>(k), k_stride, static_cast<const uint16_t*>(v), v_stride, slots,
             static_cast<uint16_t*>(cache), rows, kv_heads, head_dim, num_blocks, block_size);
  else if (dst_bf16)
    write_kv(static_cast<const float*>(k), k_stride, static_cast<const float*>(v), v_stride, slots,
             static_cast<uint16_t*>(cache), rows, kv_heads, head_dim, num_blocks, block_size);
  else
    write_kv(static_cast<const float*>(k), k_stride, static_cast<const float*>(v), v_stride, slots,
             static_cast<float*>(cache), rows, kv_heads, head_dim, num_blocks, block_size);
}

// qkv, cos, ssin of type T (is_bf16: bfloat16, else float32); dst_kind as jitney_write_kv's. A bfloat16 qkv
// needs a bfloat16 or int8 cache.
void jitney_rope_write_kv(int is_bf16, int dst_kind, void* qkv, int64_t qkv_stride, const void* cos,
                          const void* ssin, const int64_t* slots, void* cache, int64_t rows, int heads, int kv_heads,
                          int head_dim, int64_t num_blocks, int block_size) {
  if (is_bf16 && dst_kind == 2)
    rope_write_kv(static_cast<uint16_t*>(qkv), qkv_stride, static_cast<const uint16_t*>(cos),
                  static_cast<const uint16_t*>(ssin), slots, static_cast<int8_t*>(cache), rows, heads, kv_heads,
                  head_dim, num_blocks, block_size);
  else if (is_bf16)
    rope_write_kv(static_cast<uint16_t*>(qkv), qkv_stride, static_cast<const uint16_t*>(cos),
                  static_cast<const uint16_t*>(ssin), slots, static_cast<uint16_t*>(cache), rows, heads, kv_heads,
                  head_dim, num_blocks, block_size);
  else if (dst_kind == 2)
    rope_write_kv(static_cast<float*>(qkv), qkv_stride, static_cast<const float*>(cos),
                  static_cast<const float*>(ssin), slots, static_cast<int8_t*>(cache), rows, heads, kv_heads,
                  head_dim, num_blocks, block_size);
  else if (dst_kind == 1)
    rope_write_kv(static_cast<float*>(qkv), qkv_stride, static_cast<const float*>(cos),
                  static_cast<const float*>(ssin), slots, static_cast<uint16_t*>(cache), rows, heads, kv_heads,
                  head_dim, num_blocks, block_size);
  else
    rope_write_kv(static_cast<float*>(qkv), qkv_stride, static_cast<const float*>(cos),
                  static_cast<const float*>(ssin), slots, static_cast<float*>(cache), rows, heads, kv_heads,
                  head_dim, num_blocks, block_size);
}

// The loop this build runs: what native.py reports at start-up.
const char* jitney_isa() {
#if defined(JITNEY_AVX512) && defined(__AVX512BF16__)
  return "avx512-bf16";
#elif defined(JITNEY_AVX512)
  return "avx512";
#elif defined(JITNEY_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

int jitney_limits(int which) {
  return which == 0 ? MAX_GROUP : which == 1 ? MAX_HEAD_DIM : MAX_BLOCK;
}

// q [rows, heads, head_dim] with q_token_stride elements between rows (heads contiguous);
// cache: one layer's [2 (K, V), kv_heads, num_blocks, block_size, head_dim (+ 4 for int8)], contiguous;
// block_tables [rows, table_stride] int32; context_lens [rows] int32 (tokens to attend, >= 1);
// out [rows, heads, head_dim] contiguous, of q's type. q_bf16: 1 for bfloat16, 0 for float32; kv_kind: the
// cache's type, 0 float32, 1 bfloat16, 2 int8 (rows of head_dim + 4 bytes). Bfloat16 queries need a bfloat16
// or int8 cache.
void jitney_paged_attention(int q_bf16, int kv_kind, const void* q, int64_t q_token_stride, const void* cache,
                            const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens,
                            void* out, int64_t num_rows, int heads, int kv_heads, int head_dim,
                            int64_t num_blocks, int block_size, float scale) {
  const int kv_bf16 = kv_kind == 1;
  if (kv_kind == 2 && q_bf16)
    paged_attention(static_cast<const uint16_t*>(q), q_token_stride, static_cast<const int8_t*>(cache),
                    block_tables, table_stride, context_lens, static_cast<uint16_t*>(out), num_rows, heads,
                    kv_heads, head_dim, num_blocks, block_size, scale);
  else if (kv_kind == 2)
    paged_attention(static_cast<const float*>(q), q_token_stride, static_cast<const int8_t*>(cache),
                    block_tables, table_stride, context_lens, static_cast<float*>(out), num_rows, heads,
                    kv_heads, head_dim, num_blocks, block_size, scale);
  else if (q_bf16 && kv_bf16)
    paged_attention(static_cast<const uint16_t*>(q), q_token_stride, static_cast<const uint16_t*>(cache),
                    block_tables, table_stride, context_lens, static_cast<uint16_t*>(out), num_rows, heads,
                    kv_heads, head_dim, num_blocks, block_size, scale);
  else if (kv_bf16)
    paged_attention(static_cast<const float*>(q), q_token_stride, static_cast<const uint16_t*>(cache),
                    block_tables, table_stride, context_lens, static_cast<float*>(out), num_rows, heads,
                    kv_heads, head_dim, num_blocks, block_size, scale);
  else
    paged_attention(static_cast<const float*>(q), q_token_stride, static_cast<const float*>(cache), block_tables,
                    table_stride, context_lens, static_cast<float*>(out), num_rows, heads, kv_heads, head_dim,
                    num_blocks, block_size, scale);
}

}  // extern "C"
#endif  // JITNEY_TILED_PART
