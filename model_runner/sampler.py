"""Turns a batch of next-token logits into token ids, each row with its own SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_runner import native
from model_runner.sampling_params import SamplingParams


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the native kernel's where it runs (float32 or bfloat16 logits on the CPU, rows in
    parallel), torch's otherwise; both give the first maximum, and a bfloat16 row's is its float32 cast's."""
    if (logits.is_cpu and logits.dtype in native.KERNEL_DTYPES and logits.dim() == 2 and logits.shape[1]
            and logits.stride(1) == 1 and native.library() is not None):
        return native.argmax(logits)
    return logits.argmax(-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The request's own generator, or None for an unseeded request (which then uses the sampler's shared one)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def padded_ids(token_histories: list[list[int]], vocab: int, device) -> torch.Tensor:
    """Ragged histories as one [B, W] tensor, padded with the id `vocab`: one column past the vocabulary, which
    the callers scatter into and then drop, so padding never counts as a real token."""
    width = max((len(h) for h in token_histories), default=0)
    return torch.tensor([list(h) + [vocab] * (width - len(h)) for h in token_histories], dtype=torch.long,
                        device=device).view(len(token_histories), width)


def apply_repetition_penalty(logits: torch.Tensor, penalties: torch.Tensor, token_histories: list[list[int]]) -> torch.Tensor:
    """HF/CTRL repetition penalty: a seen token's logit is divided by the row's penalty if > 0, else multiplied.

    logits [B, V] float, penalties [B], token_histories: B lists of token ids (ragged). Returns a new tensor.
    """
    if max((len(h) for h in token_histories), default=0) == 0:
        return logits
    vocab = logits.shape[1]
    ids = padded_ids(token_histories, vocab, logits.device)
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, ids, True)[:, :vocab]
    penalties = penalties.to(logits).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / penalties, logits * penalties)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                                     output_histories: list[list[int]]) -> torch.Tensor:
    """OpenAI's penalties: logit[j] -= frequency * count[j] + presence * (count[j] > 0), where count[j] is how
    often token j was generated so far in this row (the prompt does not count). Returns a new tensor.

    logits [B, V] float; presence, frequency [B]; output_histories: B ragged lists of generated token ids.
    """
    vocab = logits.shape[1]
    ids = padded_ids(output_histories, vocab, logits.device)
    counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :vocab]
    return (logits - frequency.to(logits).unsqueeze(1) * counts
            - presence.to(logits).unsqueeze(1) * (counts > 0).to(logits.dtype))


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """Adds each row's (token id, bias) pairs to its logits, in place; returns logits. One scatter for the batch."""
    rows = [r for r, pairs in enumerate(biases) for _ in pairs]
    if rows:
        cols = [t for pairs in biases for t, _ in pairs]
        vals = torch.tensor([b for pairs in biases for _, b in pairs], dtype=logits.dtype, device=logits.device)
        logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                          vals, accumulate=True)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """min-p: drop tokens whose probability is below min_p x the row's top probability; returns a new tensor.

    In logit space p_j < min_p * p_max is x_j - x_max < log(min_p): no softmax needed, and min_p = 0 gives a
    threshold of -inf, so rows with it off stay exactly as they are.
    """
    threshold = logits.amax(-1, keepdim=True) + min_p.to(logits).log().unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf; returns a new tensor.

    logits [B, V] float; top_k [B] int in [1, V] (V = off) or None; top_p [B] float in (0, 1] (1 = off) or None.
    One descending sort serves both filters; rows with a filter off are left exactly as they are.
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    # Mask by rank, not by value against the k-th logit, so exactly k tokens survive even when logits tie.
    drop = rank >= top_k.to(logits.device).unsqueeze(1) if top_k is not None else torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_p is not None:
        top_p = top_p.to(logits).unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep token j iff the mass strictly before it is < p: the smallest prefix whose mass reaches p.
        outside = (probs.cumsum(-1) - probs) >= top_p
        # Rows with p = 1 stay untouched: float rounding could otherwise push the cumulative mass of the tail to 1.
        drop |= outside & (top_p < 1)
    drop[:, 0] = False  # the top token always survives
    return torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))


@dataclass
class TokenLogprob:
    """One position's log-probabilities: the token that is there (sampled, or the prompt's) and the k likeliest."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), likeliest first; k of them


def gather_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """logprobs [B, V] float32 (log_softmax of the logits), chosen [B] token ids, ks[i] top entries for row i.
    One topk at the batch's largest k serves every row."""
    k = max(ks, default=0)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    picked = logprobs.gather(1, chosen.view(-1, 1).to(logprobs.device)).view(-1).tolist()
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    return [TokenLogprob(int(t), lp, list(zip(top_ids[i][:ks[i]], top_lp[i][:ks[i]])))
            for i, (t, lp) in enumerate(zip(chosen.tolist(), picked))]


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed  # seeds the shared generator that unseeded requests draw from; None = nondeterministic
        self._shared: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        # One per device, made lazily: a generator can only feed tensors on its own device.
        g = self._shared.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed)
            self._shared[device] = g
        return g

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        token_histories: list[list[int]] | None = None,
        output_histories: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Sample one token per row of logits [B, V]; returns int64 [B].

        generators[i] is row i's own generator (make_generator) or None for the shared one; token_histories[i] is
        row i's prompt + output ids, needed only for rows with repetition_penalty != 1; output_histories[i] is
        its generated ids, needed only for rows with a presence or frequency penalty.
        """
        if logits.dim() != 2 or not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(f"need logits [B, V] with B = len(params) = len(generators); got {tuple(logits.shape)}, "
                             f"{len(params)} params, {len(generators)} generators")
        device = logits.device
        logits = self._adjust(logits, params, token_histories, output_histories)

        tokens = greedy(logits)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:  # the common all-greedy decode step: no float copy, no sort, no randomness
            return tokens

        idx = torch.tensor(sampled, device=device)
        sp = [params[i] for i in sampled]
        x = logits[idx].float() / torch.tensor([p.temperature for p in sp], device=device).unsqueeze(1)
        if any(p.min_p > 0 for p in sp):
            x = apply_min_p(x, torch.tensor([p.min_p for p in sp], device=device))
        vocab = x.shape[1]
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in sp]
        x = apply_top_k_top_p(
            x,
            torch.tensor(ks, device=device) if any(k < vocab for k in ks) else None,
            torch.tensor([p.top_p for p in sp], device=device) if any(p.top_p < 1 for p in sp) else None,
        )
        tokens[idx] = self._exponential_race(x.softmax(-1), [generators[i] for i in sampled])
        return tokens

    @staticmethod
    def _adjust(logits: torch.Tensor, params: list[SamplingParams], token_histories: list[list[int]] | None,
                output_histories: list[list[int]] | None) -> torch.Tensor:
        """The processors that can change even a greedy row's token, in vLLM's order: logit bias, repetition
        penalty, presence/frequency penalties. Each touches only the rows that set it; with none set (the
        common case) the caller's logits come back as they are, with no copy."""
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        penalised = [i for i, p in enumerate(params) if p.has_penalties]
        if not (biased or repeated or penalised):
            return logits
        x = logits.to(torch.float32, copy=True)  # float32, and the caller's logits stay as they were
        if biased:
            apply_logit_bias(x, [p.logit_bias for p in params])
        if repeated:
            if token_histories is None:
                raise ValueError("token_histories is required when a row has repetition_penalty != 1")
            idx = torch.tensor(repeated, device=x.device)
            x[idx] = apply_repetition_penalty(x[idx], torch.tensor([params[i].repetition_penalty for i in repeated]),
                                              [list(token_histories[i]) for i in repeated])
        if penalised:
            if output_histories is None:
                raise ValueError("output_histories is required when a row has a presence or frequency penalty")
            idx = torch.tensor(penalised, device=x.device)
            x[idx] = apply_presence_frequency_penalty(
                x[idx], torch.tensor([params[i].presence_penalty for i in penalised]),
                torch.tensor([params[i].frequency_penalty for i in penalised]),
                [list(output_histories[i]) for i in penalised])
        return x

    def _exponential_race(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """argmax(p / E) with E ~ Exp(1) picks token j with probability p_j (the smallest E/p_j wins the race).

        Seeded rows draw their noise from their own generator, so their tokens don't depend on batch companions;
        the rest share one draw from the sampler's generator.
        """
        noise = torch.empty_like(probs).exponential_(generator=self._shared_generator(probs.device))
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        # Some backends can return an exact 0; 0/0 would be NaN, which argmax would pick.
        return probs.div_(noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(-1)
