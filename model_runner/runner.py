"""ModelRunner: loads a model and its KV cache, and executes one step of a schedule.

A step is a list of (sequence, num_new_tokens): each sequence feeds its next tokens (a prompt chunk, or the
one token it sampled last step). The runner flattens them into one batch, runs one forward, and samples a
token for every sequence whose chunk reached its last token. It never changes a Sequence: the caller
(the scheduler) owns their state, so a plan can be replayed or tested without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import native, qmatmul, quant, threads
from .attention import AttentionMetadata, DecodeGroup, NativeAttention, PrefillChunk
from .config import ModelConfig, RunnerConfig
from .context_window import check_prompt_fits
from .errors import InvalidRequestError, ModelLoadError
from .grammar import GrammarCompiler, apply_grammar_masks
from .kv_cache import allocate_kv_cache, kv_cache_bytes_per_block, plan_num_blocks
from .loader import load_model_dir
from .precision import resolve_precision
from .model import LlamaModel
from .sampler import Sampler, TokenLogprob, gather_logprobs
from .sampling_params import SamplingParams
from .sequence import Sequence
from .step_budget import default_max_num_batched_tokens


@dataclass
class StepLogprobs:
    """What one step computed for one sequence: prompt tokens' logprobs (by their index in the prompt) for the
    chunk it fed, and the sampled token's, when the sequence asked for them."""
    prompt: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    sampled: TokenLogprob | None = None


@dataclass
class StepOutput:
    """Everything one step yields, returned whole (as vLLM's ModelRunnerOutput), consumed in one place."""
    tokens: list[int | None]  # per scheduled entry, in plan order: the sampled token, None mid-prompt
    logprobs: dict[int, StepLogprobs] = field(default_factory=dict)  # by seq_id, for sequences that asked


class ModelRunner:
    def __init__(self, cfg: RunnerConfig | None = None, progress: bool = True):
        # Loading, steps and scoring all run on the process's torch thread (model_runner/threads.py: one OpenMP
        # pool in the process, or every step pays for two).
        threads.torch_thread().run(self._load, cfg or RunnerConfig(), progress)

    def _load(self, cfg: RunnerConfig, progress: bool) -> None:
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        if cfg.quantization != "none" and cfg.device != "cpu":
            raise ModelLoadError(f"--quantization {cfg.quantization} runs on the CPU (its matmul is a CPU kernel); "
                                 f"use --quantization none on {cfg.device}")
        self.cfg = cfg
        self.device = cfg.device
        self.threads = threads.apply(cfg.threads)  # before loading: the repack and conversion run threaded too
        path, weights, self.tokenizer = load_model_dir(cfg.model, progress=progress, quantization=cfg.quantization,
                                                       runner=cfg)
        self.model_path = path
        self.model_config: ModelConfig = ModelConfig.from_hf_dir(path)
        mc = self.model_config
        self.precision = resolve_precision(cfg.dtype, cfg.kv_cache_dtype, cfg.device)
        self.dtype, self.kv_dtype = self.precision.compute, self.precision.kv_cache
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        # The tokenizer may know more end-of-turn tokens than config.json (e.g. <|im_end|> for chat).
        eos = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.weight_bytes = quant.bytes_by_format(weights, self.dtype)
        resident = qmatmul.dense_weights_resident(cfg.quant_dense_weights, cfg.quantization)
        self.quant_dense_rows = qmatmul.dense_min_rows(self.dtype, cfg.quant_dense_rows, resident)
        if resident and self.quant_dense_rows is None:
            raise ModelLoadError("--quant-dense-weights resident keeps the dense path's weights, but --quant-dense-rows "
                                 f"{cfg.quant_dense_rows} takes no dense path here (auto takes one only for bfloat16 on "
                                 "a CPU with native bfloat16): give --quant-dense-rows N, or leave the flag out")
        with torch.inference_mode():
            self.model = LlamaModel(mc, weights, self.dtype, self.device, self.max_model_len, self.quant_dense_rows)
            # bytes the dense path's kept weights add (--quant-dense-weights resident), on top of weight_bytes
            self.dense_weight_bytes = self.model.keep_dense_weights() if resident else 0
        del weights
        self.block_size = cfg.block_size
        self.num_blocks = plan_num_blocks(mc, cfg.block_size, self.kv_dtype, cfg.device, cfg.kv_cache_memory,
                                          cfg.memory_utilization)
        self.kv_cache = allocate_kv_cache(mc, self.num_blocks, cfg.block_size, self.kv_dtype, cfg.device)
        self.sampler = Sampler(cfg.seed)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, self.eos_token_ids)  # response_format
        # Attention by the native kernel where it builds for this device and model (see attention.py).
        self.native_attention = native.supported(self.device, self.dtype, mc.num_attention_heads,
                                                 mc.num_key_value_heads, mc.head_dim, cfg.block_size, self.kv_dtype)
        # Prompt chunks by the tiled kernel where it runs (bfloat16 on AVX512-BF16; attention.py).
        self.tiled_prefill = self.native_attention and native.prefill_supported(
            self.dtype, self.kv_dtype, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim)
        # What builds here (use_kernels): attention, tiled prompts, elementwise ops.
        self.native_kernels = (self.native_attention, self.tiled_prefill, self.model.ops.native)

    def use_kernels(self, attention: bool, elementwise: bool) -> None:
        """Which paths the next steps take, native or PyTorch (benchmarks/kernels.py times each): a native one
        only where it builds here, so this can turn one off, never on where it cannot run."""
        self.native_attention = attention and self.native_kernels[0]
        self.tiled_prefill = attention and self.native_kernels[1]
        self.model.ops.native = elementwise and self.native_kernels[2]

    def default_max_num_batched_tokens(self) -> tuple[int, str]:
        """The step budget an engine takes when its BatcherConfig leaves it to the runner, and why
        (step_budget.py: what a prompt token costs here)."""
        return default_max_num_batched_tokens(self.device, self.dtype, self.cfg.quantization,
                                              self.dense_weight_bytes > 0)

    # --- reporting -------------------------------------------------------------------------------------

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * kv_cache_bytes_per_block(self.model_config, self.block_size, self.kv_dtype)

    def describe(self) -> str:
        mc = self.model_config
        return (f"model {self.cfg.model} ({mc.num_hidden_layers} layers, {mc.num_attention_heads}/"
                f"{mc.num_key_value_heads} heads, vocab {mc.vocab_size}) on {self.device}; "
                f"{self.precision.describe()}; {quant.describe_bytes(self.weight_bytes)}"
                + (f", quantized matmul by the {quant.isa()} loop" + (f" (dequantized into torch's matmul "
                   f"from {self.quant_dense_rows} rows" + (f", those weights kept dequantized: "
                   f"+{self.dense_weight_bytes / 2**20:.1f} MiB" if self.dense_weight_bytes else "") + ")"
                   if self.quant_dense_rows else "")
                   + (", the decoder stack in one native call (steps on that loop)" if self.model.fused else "")
                   if self.cfg.quantization != "none" else "")
                + f"; KV cache {self.kv_cache_bytes / 2**30:.2f} GiB = {self.num_blocks} "
                f"blocks x {self.block_size} tokens = {self.num_blocks * self.block_size:,} tokens; attention by "
                + (f"the native kernel ({native.isa()} loop{', prompts tiled' if self.tiled_prefill else ''})"
                   if self.native_attention else "the PyTorch path")
                + f"; {self.threads} thread{'s' if self.threads > 1 else ''} per step")

    # --- requests ---------------------------------------------------------------------------------------

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Refuses what could never run, before it reaches a queue or the model."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        check_prompt_fits(len(prompt_token_ids), self.max_model_len)
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")

    def check_params(self, params: SamplingParams) -> None:
        """Token ids in the sampling parameters must index this model's vocabulary (the sampler scatters on them)."""
        vocab = self.model_config.vocab_size
        bad = [t for t in (*params.stop_token_ids, *(t for t, _ in params.logit_bias)) if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def score(self, seq: Sequence) -> torch.Tensor:
        """Logits [n, vocab] at every position of seq's tokens (reference checks), through the paged path; seq
        holds blocks for all of them and none is computed yet."""
        return threads.torch_thread().run(self._score, seq)

    @torch.inference_mode()
    def _score(self, seq: Sequence) -> torch.Tensor:
        meta, input_ids, positions = self._prepare([(seq, len(seq))])
        return self.model.logits(self.model.forward(input_ids, positions, self.kv_cache, meta))

    # --- one step ---------------------------------------------------------------------------------------

    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepOutput:
        """Runs one forward over the scheduled chunks; returns a sampled token per entry (None if mid-prompt) and
        the logprobs of the sequences that asked for them. On the torch thread, whoever calls (the engine calls
        from it already).

        Every sequence must already hold KV blocks for num_computed_tokens + num_new_tokens tokens.
        """
        return threads.torch_thread().run(self._execute, scheduled)

    @torch.inference_mode()
    def _execute(self, scheduled: list[tuple[Sequence, int]]) -> StepOutput:
        if torch.get_num_threads() != self.threads:  # another runner of this process asked for another count
            threads.apply(self.threads)
        # Single-token chunks first, shortest context first (the PyTorch path attends them in groups of similar
        # length; the native kernel takes any order).
        order = sorted(range(len(scheduled)),
                       key=lambda i: (scheduled[i][1] != 1, scheduled[i][0].num_computed_tokens))
        items = [scheduled[i] for i in order]
        meta, input_ids, positions = self._prepare(items)
        hidden = self.model.forward(input_ids, positions, self.kv_cache, meta)

        rows, sampled_items = [], []
        end = 0
        for seq, n in items:
            end += n
            if seq.num_computed_tokens + n == len(seq.token_ids):
                rows.append(end - 1)
                sampled_items.append(seq)
        step_logprobs: dict[int, StepLogprobs] = {}
        if any(s.params.prompt_logprobs is not None for s, _ in items):
            self._prompt_logprobs(items, hidden, step_logprobs)
        tokens: dict[int, int] = {}
        if rows:
            logits = self.model.head(hidden[torch.tensor(rows, device=self.device)])  # the compute dtype
            # Logprobs of the raw distribution: taken before min_tokens, penalties, bias or temperature touch it.
            want = [i for i, s in enumerate(sampled_items) if s.params.logprobs is not None]
            raw = logits[torch.tensor(want, device=self.device)].float().log_softmax(-1) if want else None
            self._suppress_early_stops(logits, sampled_items)
            if any(s.matcher is not None for s in sampled_items):  # every later step keeps -inf at -inf
                apply_grammar_masks(logits, [s.matcher for s in sampled_items], self.grammars.mask_words)
            histories = ([s.token_ids for s in sampled_items]
                         if any(s.params.repetition_penalty != 1.0 for s in sampled_items) else None)
            outputs = ([s.output_token_ids for s in sampled_items]
                       if any(s.params.has_penalties for s in sampled_items) else None)
            chosen = self.sampler(logits, [s.params for s in sampled_items], [s.generator for s in sampled_items],
                                  histories, outputs)
            if want:
                entries = gather_logprobs(raw, chosen[torch.tensor(want, device=chosen.device)],
                                          [sampled_items[i].params.logprobs for i in want])
                for i, entry in zip(want, entries):
                    step_logprobs.setdefault(sampled_items[i].seq_id, StepLogprobs()).sampled = entry
            tokens = {s.seq_id: t for s, t in zip(sampled_items, chosen.tolist())}
        return StepOutput([tokens.get(seq.seq_id) for seq, _ in scheduled], step_logprobs)

    def _prompt_logprobs(self, items: list[tuple[Sequence, int]], hidden: torch.Tensor,
                         into: dict[int, StepLogprobs]) -> None:
        """For chunks of sequences that asked for prompt_logprobs: the logprob of each prompt token this chunk
        predicts (the row at position p predicts token p + 1), from the same hidden states, in float32."""
        rows, targets, ks, owners = [], [], [], []
        start_row = 0
        for seq, n in items:
            if seq.params.prompt_logprobs is not None:
                first = seq.num_computed_tokens
                for p in range(first, min(first + n, seq.num_prompt_tokens - 1)):
                    rows.append(start_row + p - first)
                    targets.append(seq.token_ids[p + 1])
                    ks.append(seq.params.prompt_logprobs)
                    owners.append((seq.seq_id, p + 1))
            start_row += n
        if not rows:
            return
        logprobs = self.model.logits(hidden[torch.tensor(rows, device=self.device)]).float().log_softmax(-1)
        for (seq_id, index), entry in zip(owners, gather_logprobs(logprobs, torch.tensor(targets), ks)):
            into.setdefault(seq_id, StepLogprobs()).prompt.append((index, entry))

    def _suppress_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: a sequence that may not stop yet cannot sample EOS or its stop tokens."""
        for row, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                banned = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else list(self.eos_token_ids))
                logits[row, banned] = float("-inf")

    def _prepare(self, items: list[tuple[Sequence, int]]) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        """Flat tensors for one step. Decodes (single-token chunks) come first, as `execute` orders them."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        for s, n in items:
            start = s.num_computed_tokens
            ids.extend(s.token_ids[start: start + n])
            pos.extend(range(start, start + n))
        table_of = [s.block_table for s, n in items for _ in range(n)]
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(table_of, pos)], device=dev)
        positions = torch.tensor(pos, device=dev)
        if self.native_attention:
            meta = AttentionMetadata(slots, [], [], self._native_rows(items, positions))
        else:
            meta = AttentionMetadata(slots, *self._torch_attention(items, pos))
        return meta, torch.tensor(ids, device=dev), positions

    def _native_rows(self, items: list[tuple[Sequence, int]], positions: torch.Tensor) -> NativeAttention:
        """Each token's block table and context (its position + 1: the step's own K/V are written first)."""
        width = max(len(s.block_table) for s, _ in items)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s, _ in items],
                              dtype=torch.int32)
        per_item = torch.tensor([n for _, n in items])
        rows = NativeAttention(tables.repeat_interleave(per_item, dim=0), (positions + 1).to(torch.int32))
        if self.tiled_prefill:
            rows.chunks, rows.decode_rows = self._chunks(items)
        return rows

    @staticmethod
    def _chunks(items: list[tuple[Sequence, int]]) -> tuple[torch.Tensor | None, int]:
        """The step's multi-token chunks as (first row, rows, first position) for the tiled kernel, and how many
        single-token rows (decodes, first in the step as `execute` orders them) go to the row kernel.

        Which kernel a token gets then depends on its chunk's size, and so on how a step was batched; in
        bfloat16 a token's arithmetic depends on that anyway (oneDNN picks its matmul kernels by the number of
        rows), and the exact batch invariance jitney promises is float32's, where the tiled kernel never runs."""
        decodes = sum(n == 1 for _, n in items)
        chunks, row = [], decodes
        for s, n in items[decodes:]:
            chunks.append([row, n, s.num_computed_tokens])
            row += n
        return (torch.tensor(chunks, dtype=torch.int32) if chunks else None), decodes

    def _torch_attention(self, items: list[tuple[Sequence, int]],
                         pos: list[int]) -> tuple[list[DecodeGroup], list[PrefillChunk]]:
        """Decode groups of similar context length, and one SDPA chunk per prompt chunk."""
        bs = self.block_size
        decodes = [s for s, n in items if n == 1]
        d = len(decodes)
        groups = [self._decode_group(decodes, pos, lo, hi) for lo, hi in decode_group_bounds(pos[:d], bs)]
        prefills, row = [], d
        for s, n in items[d:]:
            start, ctx_len = s.num_computed_tokens, s.num_computed_tokens + n
            if start == 0:
                prefills.append(PrefillChunk(row, row + n, ctx_len, None, None))
            else:  # continues a cached prefix: query i (position start + i) sees keys 0 .. start + i
                mask = torch.arange(ctx_len).unsqueeze(0) <= torch.arange(start, ctx_len).unsqueeze(1)
                prefills.append(PrefillChunk(row, row + n, ctx_len, self._kv_rows(s.block_table[: -(-ctx_len // bs)]),
                                             mask.to(self.device)))
            row += n
        return groups, prefills

    def _decode_group(self, decodes: list[Sequence], pos: list[int], lo: int, hi: int) -> DecodeGroup:
        """Block tables padded to the group's longest context, and the mask that hides the padding."""
        bs = self.block_size
        width = -(-(pos[hi - 1] + 1) // bs)
        tables = torch.tensor([s.block_table[:width] + [0] * (width - len(s.block_table[:width]))
                               for s in decodes[lo:hi]])
        last = torch.tensor(pos[lo:hi]).unsqueeze(1)
        bias = torch.zeros(hi - lo, width * bs).masked_fill_(torch.arange(width * bs) > last, float("-inf"))
        return DecodeGroup(lo, hi, self._kv_rows(tables), bias.view(1, hi - lo, 1, -1).to(self.device))

    def _kv_rows(self, blocks) -> torch.Tensor:
        """Rows of a layer's cache viewed as [2 * kv_heads * blocks, block_size * head_dim] holding these blocks,
        K then V, head by head (see attention.gather_kv)."""
        blocks = torch.as_tensor(blocks).view(1, -1)
        heads = torch.arange(2 * self.model_config.num_key_value_heads).view(-1, 1)
        return (heads * self.num_blocks + blocks).view(-1).to(self.device)


def decode_group_bounds(positions: list[int], block_size: int, max_groups: int = 8) -> list[tuple[int, int]]:
    """Splits decodes (sorted by position) where the context grows past ~1.25x the group's shortest, so a
    group's padding stays small; short contexts stay one group (each group costs a few ops per layer)."""
    bounds, lo = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or (len(bounds) < max_groups - 1 and
                                   positions[i] // block_size > 1.25 * (positions[lo] // block_size) + 1):
            bounds.append((lo, i))
            lo = i
    return bounds
