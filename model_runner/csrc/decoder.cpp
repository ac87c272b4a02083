// The decoder stack of a model whose every layer matmul is quantized, run as one native call: for each layer the
// same kernels, with the same arguments, in the same order as model.py's DecoderLayer calls them one by one from
// Python (qkv matmul; rotary + K/V write; paged attention; o matmul + residual add + norm; gate/up matmul;
// SiLU-and-multiply; down matmul + residual add + norm), so the output is bit for bit the Python loop's.
//
// Why: at batch 1 a quantized step's kernels take about 5 ms on AMD Zen 3 while the ~270 calls from Python that
// start them (argument checks, ctypes, tensor allocation, each in a cache just flushed by the weights streaming
// past) took 4 more. A float model cannot take this path: its matmuls are oneDNN's, reached through torch.
//
// The kernels are not linked in: their addresses come from the loaded attention and quantized-matmul libraries
// (model_runner/fused.py), so this file holds only the loop, builds in a second, and runs whichever of their
// instruction-set loops those libraries were built for.
#include <cstdint>
#include <memory>
#include <new>

namespace {

using QMatmul = void (*)(int fmt, int bf16, const void* x, int64_t ldx, const void* qs, const void* dw,
                         const void* mw, const void* row_scale, void* y, int64_t ldy, int64_t m, int64_t n, int64_t k);
using AddRmsNorm = void (*)(int is_bf16, void* x, const void* delta, const void* weight, void* out, int64_t rows,
                            int64_t n, float eps);
using SiluMul = void (*)(int is_bf16, const void* gate_up, void* out, int64_t rows, int64_t inter);
using RopeWriteKV = void (*)(int is_bf16, int dst_kind, void* qkv, int64_t qkv_stride, const void* cos,
                             const void* ssin, const int64_t* slots, void* cache, int64_t rows, int heads,
                             int kv_heads, int head_dim, int64_t num_blocks, int block_size);
using PagedAttention = void (*)(int q_bf16, int kv_kind, const void* q, int64_t q_token_stride, const void* cache,
                                const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens,
                                void* out, int64_t num_rows, int heads, int kv_heads, int head_dim,
                                int64_t num_blocks, int block_size, float scale);

// A layer's table (int64 slots, fused.py writes it): input norm, post-attention norm, then the four matmuls
// qkv, o, gate_up, down, each as its number of parts (1..MAX_PARTS, one per weight format) and per part
// (format, qs, d, m, row_scale, rows n); unused parts are zeros.
constexpr int MAX_PARTS = 3;
constexpr int PART_SLOTS = 6;
constexpr int LINEAR_SLOTS = 1 + MAX_PARTS * PART_SLOTS;
constexpr int LAYER_SLOTS = 2 + 4 * LINEAR_SLOTS;

template <typename P>
P as(int64_t v) { return reinterpret_cast<P>(static_cast<intptr_t>(v)); }

// y [rows, sum of the parts' n] = x [rows, k] times the parts' rows, each part into its own columns (as
// qmatmul.matmul does it).
void linear(QMatmul qmatmul, const int64_t* lin, int bf16, const void* x, int64_t k, void* y, int64_t rows,
            int64_t elem) {
  int64_t n = 0;
  for (int p = 0; p < lin[0]; p++) n += lin[1 + p * PART_SLOTS + 5];
  int64_t col = 0;
  for (int p = 0; p < lin[0]; p++) {
    const int64_t* part = lin + 1 + p * PART_SLOTS;
    qmatmul(int(part[0]), bf16, x, k, as<const void*>(part[1]), as<const void*>(part[2]), as<const void*>(part[3]),
            as<const void*>(part[4]), static_cast<char*>(y) + col * elem, n, rows, part[5], k);
    col += part[5];
  }
}

}  // namespace

extern "C" {

// kernels: the addresses of jitney_qmatmul, jitney_add_rms_norm, jitney_silu_mul, jitney_rope_write_kv and
// jitney_paged_attention. shape: hidden, intermediate, heads, kv_heads, head_dim, num_blocks, block_size,
// kv_kind (0 float32, 1 bfloat16, 2 int8), is_bf16 (the compute dtype), layers. x [rows, hidden]: the residual
// stream after the embedding, updated in place; h [rows, hidden]: receives the last layer's output normed by
// final_norm. cos, ssin [rows, head_dim]; slots [rows]; block_tables [rows, table_stride]; context_lens [rows];
// caches: each layer's cache address. Returns 0, or 1 where the scratch buffers could not be allocated.
int jitney_decoder_forward(const int64_t* kernels, const int64_t* shape, const int64_t* layer_tables,
                            const int64_t* caches, const void* final_norm, float eps, float scale, void* x, void* h,
                            int64_t rows, const void* cos, const void* ssin, const int64_t* slots,
                            const int32_t* block_tables, int64_t table_stride, const int32_t* context_lens) {
  const auto qmatmul = as<QMatmul>(kernels[0]);
  const auto add_rms_norm = as<AddRmsNorm>(kernels[1]);
  const auto silu_mul = as<SiluMul>(kernels[2]);
  const auto rope_write_kv = as<RopeWriteKV>(kernels[3]);
  const auto paged_attention = as<PagedAttention>(kernels[4]);
  const int64_t hidden = shape[0], inter = shape[1];
  const int heads = int(shape[2]), kv_heads = int(shape[3]), head_dim = int(shape[4]);
  const int64_t num_blocks = shape[5];
  const int block_size = int(shape[6]), kv_kind = int(shape[7]), bf16 = int(shape[8]), layers = int(shape[9]);
  const int64_t elem = bf16 ? 2 : 4;
  const int64_t width = int64_t(heads + 2 * kv_heads) * head_dim;  // the fused projection's row
  // Scratch, as the Python loop allocates it per call (uninitialized: every byte is written before it is read):
  // qkv, attention output, a matmul's output before its residual add, gate/up, and SiLU(gate) * up.
  const int64_t sizes[] = {rows * width, rows * heads * head_dim, rows * hidden, rows * 2 * inter, rows * inter};
  std::unique_ptr<char[]> scratch[5];
  for (int i = 0; i < 5; i++) {
    scratch[i].reset(new (std::nothrow) char[sizes[i] * elem]);
    if (!scratch[i]) return 1;  // out of memory: the caller raises, where an exception here would end the process
  }
  char *qkv = scratch[0].get(), *attn = scratch[1].get(), *delta = scratch[2].get(), *gate_up = scratch[3].get(),
       *act = scratch[4].get();
  add_rms_norm(bf16, x, nullptr, as<const void*>(layer_tables[0]), h, rows, hidden, eps);
  for (int i = 0; i < layers; i++) {
    const int64_t* t = layer_tables + int64_t(i) * LAYER_SLOTS;
    const int64_t* lin = t + 2;
    void* cache = as<void*>(caches[i]);
    const void* next_norm = i + 1 < layers ? as<const void*>(t[LAYER_SLOTS]) : final_norm;
    linear(qmatmul, lin, bf16, h, hidden, qkv, rows, elem);
    rope_write_kv(bf16, kv_kind, qkv, width, cos, ssin, slots, cache, rows, heads, kv_heads, head_dim,
                  num_blocks, block_size);
    paged_attention(bf16, kv_kind, qkv, width, cache, block_tables, table_stride, context_lens, attn,
                    rows, heads, kv_heads, head_dim, num_blocks, block_size, scale);
    linear(qmatmul, lin + LINEAR_SLOTS, bf16, attn, int64_t(heads) * head_dim, delta, rows, elem);
    add_rms_norm(bf16, x, delta, as<const void*>(t[1]), h, rows, hidden, eps);
    linear(qmatmul, lin + 2 * LINEAR_SLOTS, bf16, h, hidden, gate_up, rows, elem);
    silu_mul(bf16, gate_up, act, rows, inter);
    linear(qmatmul, lin + 3 * LINEAR_SLOTS, bf16, act, inter, delta, rows, elem);
    add_rms_norm(bf16, x, delta, next_norm, h, rows, hidden, eps);
  }
  return 0;
}

int jitney_decoder_layer_slots() { return LAYER_SLOTS; }

}  // extern "C"
