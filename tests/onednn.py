"""What oneDNN's bfloat16 matmul does on this CPU, for tests whose claim rests on it: the first of the model's
matmul shapes where a row's result depends on something it should not, or "" where none does.

Measured: on AMD Zen 4 (AVX512-BF16) a packed and a plain weight give the same bits and a row's result does not
depend on the rows beside it; on an Intel Xeon with AMX (2026-12-05) neither holds (oneDNN picks its kernel
and blocking by the number of rows, and sums in another order), so bfloat16 text there can change with
batching, as docs/README.md's batch-invariance section says: the promise is float32's."""
import torch
import torch.nn.functional as F

ROWS = (1, 7, 16, 33, 64, 128, 256, 512)  # decodes of a few to a full batch, prompt steps


def _shapes(cfg) -> list[tuple[int, int]]:
    """[out, in] of the model's matmuls: fused q/k/v, o, fused gate/up, down, the output head."""
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return [(qkv, cfg.hidden_size), (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim),
            (2 * cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size),
            (cfg.vocab_size, cfg.hidden_size)]


def _packed(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def packed_and_plain_differ(cfg) -> str:
    """Where a packed weight (the unquantized model's, linear.py) and a plain one (the q4 dense path's slices)
    give different bits."""
    gen = torch.Generator().manual_seed(0)
    for n, k in _shapes(cfg):
        w = torch.randn(n, k, generator=gen).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        for m in ROWS:
            x = torch.randn(m, k, generator=gen).bfloat16()
            if not torch.equal(_packed(x, packed), F.linear(x, w)):
                return f"{m} rows x [{n}, {k}]"
    return ""


def rows_change_results(cfg) -> str:
    """Where a row's result through a packed weight changes with the number of rows multiplied with it."""
    gen = torch.Generator().manual_seed(0)
    for n, k in _shapes(cfg):
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, generator=gen).bfloat16(), 64)
        x = torch.randn(max(ROWS), k, generator=gen).bfloat16()
        full = _packed(x, packed)
        for m in ROWS[:-1]:
            if not torch.equal(_packed(x[:m].contiguous(), packed), full[:m]):
                return f"{m} of {max(ROWS)} rows x [{n}, {k}]"
    return ""
