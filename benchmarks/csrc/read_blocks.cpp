// The bare read of what decode attention reads: benchmarks/decode_attention.py's bound for its kernel. Every K
// and V row each query row attends to, in the kernel's order and task split (one task per query row and kv head,
// OpenMP's dynamic schedule over the process's pool; the next `ahead` blocks asked for into L2 at every block,
// as csrc/paged_attention.cpp's prefetch_ahead does with 3), folded into a checksum and nothing else. Its rate,
// at the best `ahead`, is what this machine's memory gives that access pattern (short runs scattered over a
// large cache): the kernel, which does this read and its arithmetic besides, cannot read faster.
#include <algorithm>
#include <cstdint>

namespace {

// A uint64_t that may sit at any address and alias anything (an int8 cache's rows are 68 bytes).
typedef uint64_t __attribute__((may_alias, aligned(1))) word_t;

inline uint64_t fold(const char* p, int64_t bytes) {
  const word_t* w = reinterpret_cast<const word_t*>(p);
  uint64_t s = 0;
#pragma omp simd reduction(^ : s)
  for (int64_t i = 0; i < bytes / 8; i++) s ^= w[i];
  for (int64_t i = bytes / 8 * 8; i < bytes; i++) s ^= uint8_t(p[i]);
  return s;
}

inline void prefetch(const char* block, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(block + off, 0, 2);  // prefetcht1: into L2
}

}  // namespace

extern "C" {

// cache: one layer's [2 (K, V), kv_heads, num_blocks, block_size, row_bytes] bytes; block_tables [rows,
// table_stride] int32; context_lens [rows] int32; ahead: blocks prefetched (0: none). Returns the checksum (so
// that the reads cannot be dropped).
uint64_t jitney_read_blocks(const char* cache, const int32_t* block_tables, int64_t table_stride,
                            const int32_t* context_lens, int64_t num_rows, int kv_heads, int64_t num_blocks,
                            int block_size, int64_t row_bytes, int ahead) {
  const int64_t block_bytes = block_size * row_bytes;
  const int64_t head_stride = num_blocks * block_bytes;
  uint64_t total = 0;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) reduction(^ : total)
  for (int64_t i = 0; i < num_rows; i++) {
    for (int h = 0; h < kv_heads; h++) {
      const char* k = cache + int64_t(h) * head_stride;
      const char* v = cache + int64_t(kv_heads + h) * head_stride;
      const int32_t* table = block_tables + i * table_stride;
      const int n = context_lens[i], blocks = (n + block_size - 1) / block_size;
      uint64_t s = 0;
      for (int b = 0; b < blocks; b++) {
        for (int a = 1; a <= ahead && b + a < blocks; a++) {
          prefetch(k + table[b + a] * block_bytes, block_bytes);
          prefetch(v + table[b + a] * block_bytes, block_bytes);
        }
        const int64_t bytes = std::min(block_size, n - b * block_size) * row_bytes;  // the rows attended
        s ^= fold(k + table[b] * block_bytes, bytes) ^ fold(v + table[b] * block_bytes, bytes);
      }
      total ^= s;
    }
  }
  return total;
}

}  // extern "C"
